//! Engine throughput, and its speed against `eio-reference`, from ONE run. Figures are printed,
//! never asserted (BENCHMARKS.md records a run and the machine it ran on).
//!
//! ```sh
//! cargo bench -p eio-accelerated --bench engine                       # CPU, f32
//! cargo bench -p eio-accelerated --bench engine -- --dtype f64 --iters 1
//! cargo bench -p eio-accelerated --features cuda --bench engine -- --device cuda
//! ```
//!
//! Flags (all optional): `--device cpu|cuda|cuda:N`, `--dtype f32|f64`, `--batch N` (EIO and
//! clean step), `--iters N` (timed repetitions of every full-size measurement), `--warmup N`,
//! `--pgd-batch N`, `--pgd-steps N`, `--ratio-iters N`, `--cifar-iters N` (timed repetitions
//! at CIFAR shape, default 2), `--ratio-engines reference,f64,f32` (a
//! subset, e.g. to profile one engine), `--ratio-full-clean` (the ratio of the clean step
//! at the full size too), `--skip-ratio-cifar`, `--skip-full`, `--skip-ratio`, `--ops` (adds the
//! op-class profile below).
//!
//! Two sections:
//! * **full**: the accelerated engine on the official preset (ResNet-20, n = 2, p = 3,
//!   10 distillation steps) at CIFAR shape: one EIO iteration (`eq4_iteration` with the spec's
//!   draws), one clean training step (`pretrain_iteration`) and a 50-step eval-mode CE PGD
//!   (eps 0.03, step 0.006), as images per second (median over the timed repetitions).
//! * **ratio**: a small config both engines can run (ResNet-8, width 0.5, 16x16, batch 16,
//!   n = 2, p = 2, 3 distillation steps), on the CPU: the reference (f64) against the
//!   accelerated engine in f64 and f32, on identical data, draws and random streams; then the
//!   same at CIFAR shape and full width (ResNet-8, 3x32x32, batch 32; 1 warm-up and 2 timed
//!   repetitions by default, the reference's EIO iteration takes 10-30 s there).
//! * **ops** (with `--ops`): where one clean training step spends its time, by op class. Each op
//!   of one forward and backward pass along one path is re-run alone, with the arguments
//!   `model::forward` / `model::backward` give it, and timed (median of repetitions). Run on
//!   the small config (CPU) and on the full one.

use std::error::Error;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eio_accelerated::attack::{pgd, AttackSettings, Target};
use eio_accelerated::eio::{eq4_iteration, pretrain_iteration, EioBatch};
use eio_accelerated::optim::{Sgd, SgdConfig};
use eio_accelerated::state::ModelState;
use eio_spec::config::{AttackLoss, BnMode, Config};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::sampler::{draw_iteration, IterationDraw};
use eio_spec::{Path, Plan, Preset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Seed of the benchmark's random images and labels (not a training stream).
const DATA_SEED: u64 = 2024;

#[derive(Debug, Clone)]
struct Args {
    device: String,
    dtype: String,
    batch: usize,
    iters: Option<usize>,
    warmup: Option<usize>,
    pgd_batch: Option<usize>,
    pgd_steps: usize,
    ratio_iters: usize,
    cifar_iters: usize,
    ratio_engines: String,
    ratio_full_clean: bool,
    skip_ratio_cifar: bool,
    skip_full: bool,
    skip_ratio: bool,
    ops: bool,
}

fn parse_args() -> BenchResult<Args> {
    let mut args = Args {
        device: "cpu".into(),
        dtype: "f32".into(),
        batch: 128,
        iters: None,
        warmup: None,
        pgd_batch: None,
        pgd_steps: 50,
        ratio_iters: 5,
        cifar_iters: 2,
        ratio_engines: "reference,f64,f32".into(),
        ratio_full_clean: false,
        skip_ratio_cifar: false,
        skip_full: false,
        skip_ratio: false,
        ops: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> BenchResult<String> {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value").into())
        };
        match flag.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--device" => args.device = value()?,
            "--dtype" => args.dtype = value()?,
            "--batch" => args.batch = value()?.parse()?,
            "--iters" => args.iters = Some(value()?.parse()?),
            "--warmup" => args.warmup = Some(value()?.parse()?),
            "--pgd-batch" => args.pgd_batch = Some(value()?.parse()?),
            "--pgd-steps" => args.pgd_steps = value()?.parse()?,
            "--ratio-iters" => args.ratio_iters = value()?.parse()?,
            "--cifar-iters" => args.cifar_iters = value()?.parse()?,
            "--ratio-engines" => args.ratio_engines = value()?,
            "--ratio-full-clean" => args.ratio_full_clean = true,
            "--skip-ratio-cifar" => args.skip_ratio_cifar = true,
            "--skip-full" => args.skip_full = true,
            "--skip-ratio" => args.skip_ratio = true,
            "--ops" => args.ops = true,
            other => return Err(format!("unknown flag {other:?} (see benches/engine.rs)").into()),
        }
    }
    Ok(args)
}

fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Runs `f` between two device synchronisations; returns its value and the seconds it took.
fn timed<T>(
    device: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<(T, f64)> {
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((out, start.elapsed().as_secs_f64()))
}

/// Random CIFAR-like host data: images uniform in [0, 1), labels uniform over the classes.
struct HostData {
    dims: (usize, usize, usize, usize),
    source: Vec<f64>,
    target: Vec<f64>,
    labels: Vec<u32>,
}

impl HostData {
    fn new(n: usize, c: usize, size: usize, classes: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let len = n * c * size * size;
        let source = (0..len).map(|_| rng.random::<f64>()).collect();
        let target = (0..len).map(|_| rng.random::<f64>()).collect();
        let labels = (0..n)
            .map(|_| rng.random_range(0..classes as u32))
            .collect();
        HostData {
            dims: (n, c, size, size),
            source,
            target,
            labels,
        }
    }

    fn images(
        values: &[f64],
        dims: (usize, usize, usize, usize),
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        match dtype {
            DType::F32 => {
                Tensor::from_vec(values.iter().map(|&v| v as f32).collect(), dims, device)
            }
            _ => Tensor::from_vec(values.to_vec(), dims, device)?.to_dtype(dtype),
        }
    }

    fn batch(&self, device: &Device, dtype: DType) -> candle_core::Result<EioBatch> {
        Ok(EioBatch {
            source: Self::images(&self.source, self.dims, device, dtype)?,
            labels: Tensor::from_vec(self.labels.clone(), self.dims.0, device)?,
            target: Self::images(&self.target, self.dims, device, dtype)?,
        })
    }

    fn reference_batch(&self) -> BenchResult<eio_reference::eio::EioBatch> {
        Ok(eio_reference::eio::EioBatch {
            source: ndarray::Array4::from_shape_vec(self.dims, self.source.clone())?,
            labels: self.labels.iter().map(|&y| y as usize).collect(),
            target: ndarray::Array4::from_shape_vec(self.dims, self.target.clone())?,
        })
    }
}

fn sgd_config(config: &Config) -> SgdConfig {
    SgdConfig {
        lr: config.train.lr,
        momentum: config.train.momentum,
        weight_decay: config.train.weight_decay,
        nesterov: config.train.nesterov,
    }
}

fn reference_sgd(config: &Config) -> eio_reference::optim::Sgd {
    eio_reference::optim::Sgd::new(eio_reference::optim::SgdConfig {
        lr: config.train.lr,
        momentum: config.train.momentum,
        weight_decay: config.train.weight_decay,
        nesterov: config.train.nesterov,
    })
}

/// The spec's draws of iteration `i` (epoch 0) and the random stream of its distillations.
fn draw(
    plan: &Plan,
    config: &Config,
    seeds: &Seeds,
    i: u64,
) -> BenchResult<(IterationDraw, ChaCha8Rng)> {
    let d = draw_iteration(plan, &config.eio, seeds, 0, i)?;
    Ok((d, seeds.stream(Stream::DistillStart, i)))
}

/// The pre-training path of clean step `i` (Algorithm 1 line 4).
fn clean_path(plan: &Plan, seeds: &Seeds, i: u64) -> Path {
    plan.path_space()
        .sample(&mut seeds.stream(Stream::Gates, i))
}

fn describe(config: &Config, plan: &Plan, batch: usize) -> String {
    let m = &config.model;
    format!(
        "{} width {} n={} sharing={:?} K={} L={} params={} | input {}x{}x{} classes {} batch {} | \
         p={} ({:?}) loss_scale={:?} unused={:?} adversarial_term={} | distill steps={} eps={} bn={:?} feature={:?}",
        m.name(),
        m.width,
        m.n,
        m.sharing,
        plan.k(),
        plan.l(),
        plan.parameter_count(),
        m.in_channels,
        m.input_size,
        m.input_size,
        m.classes,
        batch,
        config.eio.p,
        config.eio.infeasible,
        config.eio.loss_scale,
        config.eio.unused_params,
        config.eio.adversarial_term,
        config.distill.steps,
        config.distill.eps,
        config.distill.bn_mode,
        config.distill.feature,
    )
}

fn full(args: &Args) -> BenchResult<()> {
    let device = eio_accelerated::device::select(&args.device)?;
    let dtype = eio_accelerated::device::dtype(&args.dtype)?;
    let on_cpu = device.is_cpu();
    let warmup = args.warmup.unwrap_or(if on_cpu { 1 } else { 2 });
    let (eio_iters, clean_iters, pgd_iters) = match args.iters {
        Some(n) => (n, n, n),
        None if on_cpu => (2, 3, 1),
        None => (10, 20, 3),
    };
    let pgd_batch = args.pgd_batch.unwrap_or(if on_cpu { 32 } else { 500 });

    let config = Preset::Official
        .config()?
        .with_overrides(&[format!("train.batch_size={}", args.batch)])?;
    let plan = config.plan()?;
    let seeds = Seeds::new(config.seed);
    let m = &config.model;
    println!("== full: accelerated engine, official preset at CIFAR shape ==");
    println!("device {} dtype {:?}", args.device, dtype);
    println!("config: {}", describe(&config, &plan, args.batch));

    let data = HostData::new(
        args.batch,
        m.in_channels,
        m.input_size,
        m.classes,
        DATA_SEED,
    );
    let batch = data.batch(&device, dtype)?;
    let mut state = ModelState::init(&plan, &seeds, 0, &device, dtype)?;
    let mut optimiser = Sgd::new(sgd_config(&config));

    // One EIO iteration: p distillations of 10 steps, p(p-1) cross-training passes, one SGD step.
    let mut eio_times = Vec::new();
    for i in 0..(warmup + eio_iters) {
        let (d, mut rng) = draw(&plan, &config, &seeds, i as u64)?;
        let (report, secs) = timed(&device, || {
            eq4_iteration(
                &plan,
                &mut state,
                &mut optimiser,
                &config,
                &batch,
                &d,
                &mut rng,
            )
        })?;
        let kind = if i < warmup { "warm-up" } else { "timed" };
        println!(
            "  eio_iteration {i} ({kind}): layer {:2} paths {} -> {:.3} s ({:.1} images/s) losses {:?}",
            report.layer,
            report.paths.len(),
            secs,
            args.batch as f64 / secs,
            report.path_losses
        );
        if i >= warmup {
            eio_times.push(secs);
        }
    }

    // One clean training step along one path (forward + backward + SGD).
    let mut clean_times = Vec::new();
    for i in 0..(warmup + clean_iters) {
        let path = clean_path(&plan, &seeds, i as u64);
        let (_, secs) = timed(&device, || {
            pretrain_iteration(
                &plan,
                &mut state,
                &mut optimiser,
                &path,
                &batch.source,
                &batch.labels,
                config.eio.unused_params,
            )
        })?;
        if i >= warmup {
            clean_times.push(secs);
        }
    }

    // A 50-step eval-mode CE PGD against one path.
    let pgd_data = HostData::new(
        pgd_batch,
        m.in_channels,
        m.input_size,
        m.classes,
        DATA_SEED + 1,
    );
    let pgd_batch_t = pgd_data.batch(&device, dtype)?;
    let path = clean_path(&plan, &seeds, u64::MAX);
    let target = Target::Path {
        plan: &plan,
        state: &state,
        path: &path,
        mode: BnMode::Eval,
    };
    let settings = AttackSettings {
        eps: 0.03,
        step_size: 0.006,
        steps: args.pgd_steps,
        random_start: true,
        loss: AttackLoss::Ce,
        cw_kappa: config.eval.cw_kappa,
        momentum: None,
        input_diversity: None,
        skip_gradient: None,
    };
    // The CPU warms up with a 2-step attack (a full one costs minutes there).
    let warm_settings = AttackSettings {
        steps: if on_cpu {
            settings.steps.min(2)
        } else {
            settings.steps
        },
        ..settings.clone()
    };
    let mut pgd_times = Vec::new();
    for i in 0..(warmup + pgd_iters) {
        let s = if i < warmup {
            &warm_settings
        } else {
            &settings
        };
        let mut rng = seeds.stream(Stream::AttackStart, i as u64);
        let (_, secs) = timed(&device, || {
            pgd(
                &target,
                &pgd_batch_t.source,
                &pgd_batch_t.labels,
                s,
                &mut rng,
            )
        })?;
        if i >= warmup {
            pgd_times.push(secs);
        }
    }

    let eio = median(&eio_times);
    let clean = median(&clean_times);
    let attack = median(&pgd_times);
    println!(
        "RESULT full eio_iteration   : {:9.4} s/iter  {:10.1} images/s  (batch {}, median of {}, {} warm-up)",
        eio,
        args.batch as f64 / eio,
        args.batch,
        eio_times.len(),
        warmup
    );
    println!(
        "RESULT full clean_step      : {:9.4} s/iter  {:10.1} images/s  (batch {}, median of {}, {} warm-up)",
        clean,
        args.batch as f64 / clean,
        args.batch,
        clean_times.len(),
        warmup
    );
    println!(
        "RESULT full pgd{}_eval_ce   : {:9.4} s/attack {:9.1} images/s  (batch {}, {:.4} s/step, median of {}, {} warm-up{})",
        settings.steps,
        attack,
        pgd_batch as f64 / attack,
        pgd_batch,
        attack / settings.steps as f64,
        pgd_times.len(),
        warmup,
        if on_cpu { " of 2 steps" } else { "" }
    );
    Ok(())
}

/// Seconds per EIO iteration and per clean step of one engine, plus the losses of iteration 0.
struct EngineTimes {
    eio: Vec<f64>,
    clean: Vec<f64>,
    first_losses: Vec<f64>,
}

fn small_config() -> BenchResult<Config> {
    Ok(Preset::Official.config()?.with_overrides(&[
        "model.depth=8",
        "model.width=0.5",
        "model.input_size=16",
        "model.n=2",
        "eio.p=2",
        "distill.steps=3",
        "train.batch_size=16",
    ])?)
}

fn run_reference(
    config: &Config,
    plan: &Plan,
    data: &HostData,
    iters: usize,
    with_eio: bool,
) -> BenchResult<EngineTimes> {
    use eio_reference::eio::{eq4_iteration, pretrain_iteration};
    let seeds = Seeds::new(config.seed);
    let batch = data.reference_batch()?;
    let mut state = eio_reference::state::ModelState::init(plan, &seeds, 0);
    let mut optimiser = reference_sgd(config);
    let mut out = EngineTimes {
        eio: vec![],
        clean: vec![],
        first_losses: vec![],
    };
    for i in (0..=iters).filter(|_| with_eio) {
        let (d, mut rng) = draw(plan, config, &seeds, i as u64)?;
        let start = Instant::now();
        let report = eq4_iteration(
            plan,
            &mut state,
            &mut optimiser,
            config,
            &batch,
            &d,
            &mut rng,
        );
        let secs = start.elapsed().as_secs_f64();
        if i == 0 {
            out.first_losses = report.path_losses;
        } else {
            out.eio.push(secs);
        }
    }
    for i in 0..=iters {
        let path = clean_path(plan, &seeds, i as u64);
        let start = Instant::now();
        pretrain_iteration(
            plan,
            &mut state,
            &mut optimiser,
            &path,
            &batch.source,
            &batch.labels,
            config.eio.unused_params,
        );
        if i > 0 {
            out.clean.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

fn run_accelerated(
    config: &Config,
    plan: &Plan,
    data: &HostData,
    dtype: DType,
    iters: usize,
    with_eio: bool,
) -> BenchResult<EngineTimes> {
    let device = Device::Cpu;
    let seeds = Seeds::new(config.seed);
    let batch = data.batch(&device, dtype)?;
    let mut state = ModelState::init(plan, &seeds, 0, &device, dtype)?;
    let mut optimiser = Sgd::new(sgd_config(config));
    let mut out = EngineTimes {
        eio: vec![],
        clean: vec![],
        first_losses: vec![],
    };
    for i in (0..=iters).filter(|_| with_eio) {
        let (d, mut rng) = draw(plan, config, &seeds, i as u64)?;
        let (report, secs) = timed(&device, || {
            eq4_iteration(
                plan,
                &mut state,
                &mut optimiser,
                config,
                &batch,
                &d,
                &mut rng,
            )
        })?;
        if i == 0 {
            out.first_losses = report.path_losses;
        } else {
            out.eio.push(secs);
        }
    }
    for i in 0..=iters {
        let path = clean_path(plan, &seeds, i as u64);
        let (_, secs) = timed(&device, || {
            pretrain_iteration(
                plan,
                &mut state,
                &mut optimiser,
                &path,
                &batch.source,
                &batch.labels,
                config.eio.unused_params,
            )
        })?;
        if i > 0 {
            out.clean.push(secs);
        }
    }
    Ok(out)
}

/// The second shared config: the small one at CIFAR shape and full width (ResNet-8, width 1,
/// 3x32x32, batch 32), where the convolutions, not per-op overheads, dominate a step.
fn cifar_config() -> BenchResult<Config> {
    Ok(small_config()?.with_overrides(&[
        "model.width=1",
        "model.input_size=32",
        "train.batch_size=32",
    ])?)
}

fn ratio(args: &Args) -> BenchResult<()> {
    ratio_on("ratio", "small config", &small_config()?, None, true, args)?;
    if !args.skip_ratio_cifar {
        ratio_on(
            "ratio-cifar",
            "ResNet-8 at CIFAR shape",
            &cifar_config()?,
            Some(args.cifar_iters),
            true,
            args,
        )?;
    }
    if args.ratio_full_clean {
        let official = Preset::Official
            .config()?
            .with_overrides(&[format!("train.batch_size={}", args.batch)])?;
        ratio_on(
            "ratio-full",
            "official preset at CIFAR shape, clean step only",
            &official,
            Some(args.ratio_iters.min(1)),
            false,
            args,
        )?;
    }
    Ok(())
}

/// Times the engines of `--ratio-engines` on `config` (on the CPU) and prints their speed
/// against the reference.
fn ratio_on(
    label: &str,
    what: &str,
    config: &Config,
    iters: Option<usize>,
    with_eio: bool,
    args: &Args,
) -> BenchResult<()> {
    let plan = config.plan()?;
    let m = &config.model;
    let n = config.train.batch_size;
    println!("== {label}: accelerated vs reference on the CPU, {what} ==");
    println!("config: {}", describe(config, &plan, n));
    let data = HostData::new(n, m.in_channels, m.input_size, m.classes, DATA_SEED);
    let iters = iters.unwrap_or(args.ratio_iters).max(1);
    let wanted: Vec<&str> = args.ratio_engines.split(',').map(str::trim).collect();
    let mut rows: Vec<(&str, EngineTimes)> = Vec::new();
    for engine in &wanted {
        let times = match *engine {
            "reference" => run_reference(config, &plan, &data, iters, with_eio)?,
            "f64" => run_accelerated(config, &plan, &data, DType::F64, iters, with_eio)?,
            "f32" => run_accelerated(config, &plan, &data, DType::F32, iters, with_eio)?,
            other => return Err(format!("unknown engine {other:?} in --ratio-engines").into()),
        };
        let name = match *engine {
            "reference" => "reference f64",
            "f64" => "accelerated f64",
            _ => "accelerated f32",
        };
        if with_eio {
            println!(
                "  iteration-0 path losses, {name}: {:?}",
                times.first_losses
            );
        }
        rows.push((name, times));
    }
    let reference = rows
        .iter()
        .find(|(name, _)| *name == "reference f64")
        .map(|(_, t)| (median(&t.eio), median(&t.clean)));
    for (name, t) in &rows {
        let (e, c) = (median(&t.eio), median(&t.clean));
        let versus = |r: f64, x: f64| format!("{:6.2}x reference", r / x);
        let (ve, vc) = match reference {
            Some((re, rc)) => (versus(re, e), versus(rc, c)),
            None => ("no reference run".into(), "no reference run".into()),
        };
        let eio = if t.eio.is_empty() {
            "eio_iteration not timed".to_string()
        } else {
            format!("eio_iteration {:9.2} ms ({ve})", e * 1e3)
        };
        println!(
            "RESULT {label} {name:16}: {eio}  clean_step {:8.2} ms ({vc})  (median of {}, 1 warm-up)",
            c * 1e3,
            t.clean.len()
        );
    }
    Ok(())
}

/// Median seconds of `reps` runs of `f` after one warm-up run.
fn median_time<T>(
    device: &Device,
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<T>,
) -> candle_core::Result<f64> {
    timed(device, &mut f)?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        samples.push(timed(device, &mut f)?.1);
    }
    Ok(median(&samples))
}

/// The op-class profile of one clean training step (see the module documentation).
fn op_profile(
    label: &str,
    config: &Config,
    plan_batch: usize,
    device: &Device,
    dtype: DType,
    reps: usize,
) -> BenchResult<()> {
    use eio_accelerated::model::{backward, forward, logits};
    use eio_accelerated::ops;
    use eio_spec::plan::Op;
    use std::collections::BTreeMap;

    let plan = config.plan()?;
    let seeds = Seeds::new(config.seed);
    let m = &config.model;
    println!(
        "== ops ({label}): one clean step by op class, {device:?} {dtype:?}, median of {reps} =="
    );
    println!("config: {}", describe(config, &plan, plan_batch));
    let data = HostData::new(
        plan_batch,
        m.in_channels,
        m.input_size,
        m.classes,
        DATA_SEED,
    );
    let batch = data.batch(device, dtype)?;
    let state = ModelState::init(&plan, &seeds, 0, device, dtype)?;
    let path = clean_path(&plan, &seeds, 0);
    let end = plan.logits();

    // Whole phases of pretrain_iteration.
    // The training step's pass (`logits`: fused, lean); the op-by-op part below reads a full
    // trace.
    let t_forward = median_time(device, reps, || {
        logits(&plan, &state, &path, &batch.source, BnMode::Train)
    })?;
    let (out, _) = logits(&plan, &state, &path, &batch.source, BnMode::Train)?;
    let trace = forward(&plan, &state, &path, &batch.source, BnMode::Train, end)?;
    let t_ce = median_time(device, reps, || ops::cross_entropy(&out, &batch.labels))?;
    let (_, grad) = ops::cross_entropy(&out, &batch.labels)?;
    let seeds_at = [(end, grad)];
    let t_backward = median_time(device, reps, || backward(&plan, &state, &trace, &seeds_at))?;
    let grads = backward(&plan, &state, &trace, &seeds_at)?;
    let t_sgd = {
        let mut st = state.clone();
        let mut opt = Sgd::new(sgd_config(config));
        median_time(device, reps, || {
            eio_accelerated::eio::sgd_step(
                &plan,
                &mut st,
                &mut opt,
                &grads,
                config.eio.unused_params,
            )
        })?
    };
    let t_step = {
        let mut st = state.clone();
        let mut opt = Sgd::new(sgd_config(config));
        median_time(device, reps, || {
            pretrain_iteration(
                &plan,
                &mut st,
                &mut opt,
                &path,
                &batch.source,
                &batch.labels,
                config.eio.unused_params,
            )
        })?
    };

    // Op by op. The upstream gradient of a node is stood in for by its own output (same shape).
    let mut classes: BTreeMap<&'static str, (f64, usize)> = BTreeMap::new();
    let mut record = |class: &'static str, secs: f64| {
        let e = classes.entry(class).or_insert((0.0, 0));
        e.0 += secs;
        e.1 += 1;
    };
    for (id, node) in plan.nodes[..=end].iter().enumerate() {
        let x = |k: usize| trace.output(node.inputs[k]);
        let g = trace.output(id);
        match &node.op {
            Op::Input | Op::Flatten => {}
            Op::Normalize { mean, std } => {
                let (mean, std) = (state.tensor(mean), state.tensor(std));
                record(
                    "normalize fwd",
                    median_time(device, reps, || ops::normalize(x(0), mean, std))?,
                );
                record(
                    "normalize bwd",
                    median_time(device, reps, || ops::normalize_backward(std, g))?,
                );
            }
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => {
                let (s, p) = (*stride, *padding);
                let w = state.tensor(weight.select(&path));
                record(
                    "conv fwd (conv2d)",
                    median_time(device, reps, || ops::conv2d(x(0), w, s, p))?,
                );
                record(
                    "conv bwd (dL/dx and dL/dw)",
                    median_time(device, reps, || ops::conv2d_backward(x(0), w, g, s, p))?,
                );
                record(
                    "conv bwd dL/dx alone (PGD, Eq. 2)",
                    median_time(device, reps, || {
                        ops::conv2d_backward_input(x(0), w, g, s, p)
                    })?,
                );
            }
            Op::BatchNorm { params, .. } => {
                let names = params.select(&path);
                let (gamma, beta) = (state.tensor(&names.weight), state.tensor(&names.bias));
                let (rm, rv) = (
                    state.tensor(&names.running_mean),
                    state.tensor(&names.running_var),
                );
                record(
                    "batchnorm fwd (train)",
                    median_time(device, reps, || {
                        ops::batch_norm(x(0), gamma, beta, rm, rv, true)
                    })?,
                );
                let saved = &trace.bn[&id];
                record(
                    "batchnorm running update",
                    median_time(device, reps, || {
                        ops::batch_norm_running_update(rm, rv, saved, 0)
                    })?,
                );
                record(
                    "batchnorm bwd (train)",
                    median_time(device, reps, || {
                        ops::batch_norm_backward(gamma, saved, g, true)
                    })?,
                );
            }
            Op::Relu => {
                record("relu fwd", median_time(device, reps, || ops::relu(x(0)))?);
                record(
                    "relu bwd",
                    median_time(device, reps, || ops::relu_backward(x(0), g))?,
                );
            }
            Op::LeakyRelu { slope } => {
                record(
                    "relu fwd",
                    median_time(device, reps, || ops::leaky_relu(x(0), *slope))?,
                );
                record(
                    "relu bwd",
                    median_time(device, reps, || ops::leaky_relu_backward(x(0), *slope, g))?,
                );
            }
            Op::Add => {
                record(
                    "residual add (fwd; bwd sums)",
                    median_time(device, reps, || x(0) + x(1))?,
                );
            }
            Op::MaxPool2 => {
                record(
                    "maxpool fwd",
                    median_time(device, reps, || ops::max_pool2(x(0)))?,
                );
                record(
                    "maxpool bwd",
                    median_time(device, reps, || ops::max_pool2_backward(x(0), g))?,
                );
            }
            Op::GlobalAvgPool => {
                let dims = x(0).dims4()?;
                record(
                    "avgpool fwd+bwd",
                    median_time(device, reps, || ops::global_avg_pool(x(0)))?,
                );
                record(
                    "avgpool fwd+bwd",
                    median_time(device, reps, || ops::global_avg_pool_backward(dims, g))?,
                );
            }
            Op::Linear { params, .. } => {
                let names = params.select(&path);
                let (w, b) = (state.tensor(&names.weight), state.tensor(&names.bias));
                record(
                    "linear fwd+bwd",
                    median_time(device, reps, || ops::linear(x(0), w, b))?,
                );
                record(
                    "linear fwd+bwd",
                    median_time(device, reps, || ops::linear_backward(x(0), w, g))?,
                );
            }
        }
    }
    let total: f64 = classes.values().map(|(t, _)| t).sum();
    let mut rows: Vec<_> = classes.into_iter().collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (class, (secs, calls)) in rows {
        println!(
            "OPS {label:5} {class:36} {:9.3} ms  {:5.1}%  ({calls} calls)",
            secs * 1e3,
            100.0 * secs / total
        );
    }
    println!(
        "OPS {label:5} sum of ops {:.3} ms | phases: forward {:.3} ms, cross-entropy {:.3} ms, backward {:.3} ms, sgd_step {:.3} ms | pretrain_iteration {:.3} ms",
        total * 1e3,
        t_forward * 1e3,
        t_ce * 1e3,
        t_backward * 1e3,
        t_sgd * 1e3,
        t_step * 1e3
    );
    Ok(())
}

fn main() {
    // On a worker of the kernels' pool, as the `eio` command runs (see `device::on_cpu_pool`).
    if let Err(e) = eio_accelerated::device::on_cpu_pool(|| run().map_err(|e| e.to_string())) {
        eprintln!("eio engine bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> BenchResult<()> {
    let args = parse_args()?;
    // The engine's CPU kernels run on rayon's global pool (see eio_accelerated::ops).
    println!(
        "eio engine bench: {} rayon threads, avx {}, cuda build {}, RAYON_NUM_THREADS={}",
        rayon::current_num_threads(),
        candle_core::utils::with_avx(),
        candle_core::utils::cuda_is_available(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    if !args.skip_ratio {
        ratio(&args)?;
    }
    if !args.skip_full {
        full(&args)?;
    }
    if args.ops {
        let device = eio_accelerated::device::select(&args.device)?;
        let dtype = eio_accelerated::device::dtype(&args.dtype)?;
        let small = small_config()?;
        let reps = args.iters.unwrap_or(5).max(1);
        op_profile(
            "small",
            &small,
            small.train.batch_size,
            &Device::Cpu,
            dtype,
            reps,
        )?;
        let official = Preset::Official.config()?;
        op_profile("full", &official, args.batch, &device, dtype, reps)?;
    }
    Ok(())
}

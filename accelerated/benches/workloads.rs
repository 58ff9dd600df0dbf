//! PyTorch's workloads, run by the accelerated engine: the same four measurements, with the
//! same parameters, as `torch_eio.py` (the PyTorch speed baseline; `bench/compare-pytorch.sh`
//! runs both back to back and prints the ratios). Figures are printed (and written as JSON with
//! `--json`), never asserted.
//!
//! ```sh
//! cargo bench -p eio-accelerated --bench workloads                                  # all four
//! cargo bench -p eio-accelerated --bench workloads -- --workloads eio_step --iters 20
//! ```
//!
//! | workload | one timed iteration | images |
//! |---|---|---|
//! | `baseline_step` | plain ResNet-20 (n = 1), train mode: forward, CE, backward, one SGD step | `--batch` |
//! | `eio_step` | one EIO iteration (official preset: n = 2 shared-conv, p = 3, 10 distillation steps, eval-mode BN distillation), its layer from the stratified schedule | `--batch` |
//! | `pgd50_eval` | a 50-step L-inf CE PGD (eps 0.03, step 0.006, random start) against plain ResNet-20 in eval mode, input gradient only | `--eval-batch` |
//! | `rgn_forward_eval` | RGN (n = 2 shared-conv) eval-mode logits without a trace, a new random path per batch | `--eval-batch` |
//!
//! The EIO layer schedule (`--distill-layer 0`, the default) is `torch_eio.py`'s: every layer
//! 1..=20 once per 20 iterations in a shuffled order, warm-up and timed iterations each from a
//! schedule of their own, so 20 timed iterations cover every layer once and their **mean** is
//! the expected cost under a uniform layer. `--distill-layer L` fixes the layer.
//!
//! Each workload reports the median, mean and best time per iteration, images per second (from
//! the mean for `eio_step`, where layers differ; the median otherwise, as the comparison
//! script reads them), and the process's peak resident memory during the workload (the
//! kernel's high-water mark, reset before each workload through `/proc/self/clear_refs`).
//!
//! Flags (`--help` lists them): `--workloads a,b`, `--batch 128`, `--eval-batch 100`, `--iters 20`, `--warmup 5`,
//! `--eio-iters N` / `--pgd-iters N` / `--eio-warmup N` / `--pgd-warmup N` (per-workload
//! overrides), `--distill-layer 0`, `--pgd-steps 50`, `--dtype f32|f64`, `--device cpu|cuda`,
//! `--seed 0`, `--json PATH`, `--path-batching auto|sequential|batched` (how `eio_step` schedules
//! its paths; `auto` is the device's default), `--malloc-default` (leave glibc's allocator settings as they are
//! instead of `device::keep_freed_memory`, to measure what that does), `--phases` (with
//! `eio_step`: where its time goes, see [`phases`]).

use std::error::Error;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eio_accelerated::attack::{pgd, AttackSettings, Target};
use eio_accelerated::eio::{eq4_iteration_with, pretrain_iteration, EioBatch};
use eio_accelerated::model::{backward, eval_logits, forward, input_gradient, logits};
use eio_accelerated::ops;
use eio_accelerated::optim::{Sgd, SgdConfig};
use eio_accelerated::path_batching::PathBatching;
use eio_accelerated::state::ModelState;
use eio_spec::config::{AttackLoss, BnMode, Config};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::sampler::{sample_paths, IterationDraw};
use eio_spec::{Plan, Preset};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The workloads, by `torch_eio.py`'s names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[clap(rename_all = "snake_case")]
enum Workload {
    BaselineStep,
    EioStep,
    Pgd50Eval,
    RgnForwardEval,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::BaselineStep => "baseline_step",
            Workload::EioStep => "eio_step",
            Workload::Pgd50Eval => "pgd50_eval",
            Workload::RgnForwardEval => "rgn_forward_eval",
        }
    }
}

/// PyTorch's workloads (`torch_eio.py`), run by the accelerated engine.
#[derive(Debug, Clone, clap::Parser)]
struct Args {
    /// The workloads to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline_step,eio_step,pgd50_eval,rgn_forward_eval"
    )]
    workloads: Vec<Workload>,
    /// Training batch (baseline_step, eio_step).
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Batch of pgd50_eval and rgn_forward_eval.
    #[arg(long, default_value_t = 100)]
    eval_batch: usize,
    /// Timed iterations per workload.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed warm-up iterations per workload.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed iterations of eio_step (and --phases), instead of --iters.
    #[arg(long)]
    eio_iters: Option<usize>,
    /// Warm-up iterations of eio_step, instead of --warmup.
    #[arg(long)]
    eio_warmup: Option<usize>,
    /// Timed iterations of pgd50_eval, instead of --iters.
    #[arg(long)]
    pgd_iters: Option<usize>,
    /// Warm-up iterations of pgd50_eval, instead of --warmup.
    #[arg(long)]
    pgd_warmup: Option<usize>,
    /// EIO distillation layer: 0 = every layer once per L iterations, shuffled; L = that layer.
    #[arg(long, default_value_t = 0)]
    distill_layer: usize,
    /// PGD steps of pgd50_eval.
    #[arg(long, default_value_t = 50)]
    pgd_steps: usize,
    /// f32 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the weights, data and draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<String>,
    /// Leave glibc's allocator settings as they are (no `device::keep_freed_memory`).
    #[arg(long)]
    malloc_default: bool,
    /// Where an eio_step iteration's time goes, phase by phase, instead of the workloads.
    #[arg(long)]
    phases: bool,
    /// How eio_step schedules its paths: `auto` (the device's default,
    /// `PathBatching::for_device`), `sequential` or `batched` (the same results).
    #[arg(long, default_value = "auto")]
    path_batching: Batching,
    /// Passed by `cargo bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `--path-batching`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Batching {
    Auto,
    Sequential,
    Batched,
}

impl Batching {
    fn on(self, device: &Device) -> PathBatching {
        match self {
            Batching::Auto => PathBatching::for_device(device),
            Batching::Sequential => PathBatching::Sequential,
            Batching::Batched => PathBatching::Batched,
        }
    }
}

/// The kernel's peak resident set of this process, reset and read through procfs (Linux).
mod peak_rss {
    /// Resets the high-water mark (`VmHWM`) to the current resident set.
    pub fn reset() {
        // "5" resets the peak RSS (Documentation/filesystems/proc.rst); unavailable elsewhere.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }

    /// `VmHWM` in MiB, if the kernel reports it.
    pub fn mib() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }
}

/// Seconds per timed iteration of `step(i)`, after `warmup` untimed ones.
fn time_loop(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut step: impl FnMut(usize) -> BenchResult<()>,
) -> BenchResult<Vec<f64>> {
    for i in 0..warmup {
        step(i)?;
    }
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        device.synchronize()?;
        let start = Instant::now();
        step(warmup + i)?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// Median, mean and best of `times`.
fn stats(times: &[f64]) -> (f64, f64, f64) {
    let mut s = times.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    };
    (median, s.iter().sum::<f64>() / s.len() as f64, s[0])
}

/// Random images uniform in [0, 1) and labels, `count` batches of `batch` (the bench data).
fn images(
    rng: &mut ChaCha8Rng,
    batch: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..batch * 3 * 32 * 32).map(|_| rng.random()).collect();
    Tensor::from_vec(v, (batch, 3, 32, 32), device)?.to_dtype(dtype)
}

fn labels(rng: &mut ChaCha8Rng, batch: usize, device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10)).collect();
    Tensor::from_vec(v, batch, device)
}

struct Bench {
    args: Args,
    device: Device,
    dtype: DType,
    data: ChaCha8Rng,
}

/// The official preset at batch `batch`, with `model.n` overridden (1: plain ResNet-20).
fn config(batch: usize, n: usize) -> BenchResult<(Config, Plan)> {
    let config = Preset::Official
        .config()?
        .with_overrides(&[format!("train.batch_size={batch}"), format!("model.n={n}")])?;
    let plan = config.plan()?;
    Ok((config, plan))
}

fn sgd(config: &Config) -> Sgd {
    Sgd::new(SgdConfig {
        lr: config.train.lr,
        momentum: config.train.momentum,
        weight_decay: config.train.weight_decay,
        nesterov: config.train.nesterov,
    })
}

/// `torch_eio.py`'s layer schedule: layer `fixed`, or (0) every layer 1..=L once per L
/// iterations in a shuffled order.
fn layer_schedule(rng: &mut ChaCha8Rng, l: usize, fixed: usize, count: usize) -> Vec<usize> {
    if fixed > 0 {
        return vec![fixed; count];
    }
    let mut out = Vec::with_capacity(count + l);
    while out.len() < count {
        let mut perm: Vec<usize> = (1..=l).collect();
        perm.shuffle(rng);
        out.extend(perm);
    }
    out.truncate(count);
    out
}

/// The draws of `count` EIO iterations: each layer from [`layer_schedule`], then p paths with
/// distinct prefixes at its depth (Algorithm 1 lines 11-12).
fn iteration_draws(
    plan: &Plan,
    config: &Config,
    rng: &mut ChaCha8Rng,
    fixed_layer: usize,
    count: usize,
) -> BenchResult<Vec<IterationDraw>> {
    layer_schedule(rng, plan.l(), fixed_layer, count)
        .into_iter()
        .map(|layer| {
            let paths = sample_paths(
                &plan.path_space(),
                plan.layer(layer).depth,
                config.eio.p,
                config.eio.infeasible,
                rng,
            )?;
            Ok(IterationDraw { layer, paths })
        })
        .collect()
}

/// A workload's outcome: seconds per timed iteration, images per iteration, and extras.
struct Outcome {
    times: Vec<f64>,
    images: usize,
    extra: serde_json::Value,
}

impl Bench {
    fn baseline_step(&mut self) -> BenchResult<Outcome> {
        let a = self.args.clone();
        let (config, plan) = config(a.batch, 1)?;
        let seeds = Seeds::new(a.seed);
        let mut state = ModelState::init(&plan, &seeds, 0, &self.device, self.dtype)?;
        let mut optimiser = sgd(&config);
        let path = plan
            .path_space()
            .sample(&mut seeds.stream(Stream::Gates, 0));
        let xs = (0..4)
            .map(|_| images(&mut self.data, a.batch, &self.device, self.dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ys = (0..4)
            .map(|_| labels(&mut self.data, a.batch, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let times = time_loop(&self.device, a.warmup, a.iters, |i| {
            pretrain_iteration(
                &plan,
                &mut state,
                &mut optimiser,
                &path,
                &xs[i % 4],
                &ys[i % 4],
                config.eio.unused_params,
            )?;
            Ok(())
        })?;
        Ok(Outcome {
            times,
            images: a.batch,
            extra: json!({ "params": plan.parameter_count() }),
        })
    }

    fn eio_step(&mut self) -> BenchResult<Outcome> {
        let a = self.args.clone();
        let (config, plan) = config(a.batch, 2)?;
        let seeds = Seeds::new(a.seed);
        let mut state = ModelState::init(&plan, &seeds, 0, &self.device, self.dtype)?;
        let mut optimiser = sgd(&config);
        let (warmup, iters) = (
            a.eio_warmup.unwrap_or(a.warmup),
            a.eio_iters.unwrap_or(a.iters),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed + 1);
        // Warm-up and timed iterations each from a schedule of their own, as torch_eio.py.
        let mut draws = iteration_draws(&plan, &config, &mut rng, a.distill_layer, warmup)?;
        draws.extend(iteration_draws(
            &plan,
            &config,
            &mut rng,
            a.distill_layer,
            iters,
        )?);
        let batches = (0..4)
            .map(|_| {
                Ok(EioBatch {
                    source: images(&mut self.data, a.batch, &self.device, self.dtype)?,
                    labels: labels(&mut self.data, a.batch, &self.device)?,
                    target: images(&mut self.data, a.batch, &self.device, self.dtype)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let batching = a.path_batching.on(&self.device);
        let times = time_loop(&self.device, warmup, iters, |i| {
            let mut start = seeds.stream(Stream::DistillStart, i as u64);
            eq4_iteration_with(
                &plan,
                &mut state,
                &mut optimiser,
                &config,
                &batches[i % 4],
                &draws[i],
                batching,
                &mut start,
            )?;
            Ok(())
        })?;
        let timed = &draws[warmup..];
        Ok(Outcome {
            times,
            images: a.batch,
            extra: json!({
                "layers_timed": timed.iter().map(|d| d.layer).collect::<Vec<_>>(),
                "paths_per_iter_timed": timed.iter().map(|d| d.paths.len()).collect::<Vec<_>>(),
                "warmup_iters_used": warmup,
                "path_batching": format!("{batching:?}"),
            }),
        })
    }

    /// Where an `eio_step` iteration's time goes: the passes of `eq4_iteration` on the same
    /// draws and data, re-run phase by phase with a clock around each (the same ops in the same
    /// order, without the bookkeeping between them). Per path: the eval-mode target pass, then
    /// for each distillation step the forward pass to layer l, the MSE and input-gradient
    /// backward, and the sign step with its projection; then the p(p−1) train-mode
    /// cross-training passes (forward, CE, backward with parameter gradients, their sum) and
    /// the SGD step. Prints the mean per iteration of each phase over the timed iterations.
    fn phases(&mut self) -> BenchResult<()> {
        let a = self.args.clone();
        let (config, plan) = config(a.batch, 2)?;
        let seeds = Seeds::new(a.seed);
        let mut state = ModelState::init(&plan, &seeds, 0, &self.device, self.dtype)?;
        let mut optimiser = sgd(&config);
        let iters = a.eio_iters.unwrap_or(a.iters);
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed + 1);
        let draws = iteration_draws(&plan, &config, &mut rng, a.distill_layer, iters)?;
        let source = images(&mut self.data, a.batch, &self.device, self.dtype)?;
        let target = images(&mut self.data, a.batch, &self.device, self.dtype)?;
        let labels = labels(&mut self.data, a.batch, &self.device)?;
        let d = &config.distill;
        let names = [
            "distillation target pass (once per path)",
            "distillation forward to layer l",
            "distillation MSE + input-gradient backward",
            "distillation sign step + projection",
            "cross-training forward + CE (train mode)",
            "cross-training backward (parameter gradients)",
            "gradient sum over paths",
            "SGD step",
        ];
        let mut totals = [0.0f64; 8];
        let clock = |device: &Device, t: &mut f64, start: Instant| -> BenchResult<()> {
            device.synchronize()?;
            *t += start.elapsed().as_secs_f64();
            Ok(())
        };
        let mut wall = 0.0;
        for IterationDraw { layer, paths } in &draws {
            let layer = *layer;
            let feature = plan.feature_node(layer, d.feature, d.first_layer_before_relu);
            let iteration = Instant::now();
            let mut distilled = Vec::new();
            for path in paths {
                let t = Instant::now();
                let goal = forward(&plan, &state, path, &target, BnMode::Eval, feature)?
                    .output(feature)
                    .clone();
                clock(&self.device, &mut totals[0], t)?;
                let mut z = source.clone();
                for _ in 0..d.steps {
                    let t = Instant::now();
                    let pass = forward(&plan, &state, path, &z, BnMode::Eval, feature)?;
                    clock(&self.device, &mut totals[1], t)?;
                    let t = Instant::now();
                    let (_, grad) = ops::mse(pass.output(feature), &goal)?;
                    let grad = input_gradient(&plan, &state, &pass, &[(feature, grad)])?;
                    clock(&self.device, &mut totals[2], t)?;
                    let t = Instant::now();
                    let stepped = (&z - (ops::sign(&grad)? * d.step_size())?)?;
                    z = stepped
                        .minimum(&(&source + d.eps)?)?
                        .maximum(&(&source - d.eps)?)?
                        .clamp(0.0, 1.0)?;
                    clock(&self.device, &mut totals[3], t)?;
                }
                distilled.push(z);
            }
            let scale = 1.0 / paths.len() as f64;
            let mut total = eio_accelerated::model::Gradients::default();
            for (i, path) in paths.iter().enumerate() {
                for (j, x) in distilled.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    let t = Instant::now();
                    let (out, trace) = logits(&plan, &state, path, x, BnMode::Train)?;
                    state.commit(&trace);
                    let (_, grad) = ops::cross_entropy(&out, &labels)?;
                    clock(&self.device, &mut totals[4], t)?;
                    let t = Instant::now();
                    let grads =
                        backward(&plan, &state, &trace, &[(plan.logits(), (grad * scale)?)])?;
                    clock(&self.device, &mut totals[5], t)?;
                    let t = Instant::now();
                    total.add(grads)?;
                    clock(&self.device, &mut totals[6], t)?;
                }
            }
            let t = Instant::now();
            eio_accelerated::eio::sgd_step(
                &plan,
                &mut state,
                &mut optimiser,
                &total,
                config.eio.unused_params,
            )?;
            clock(&self.device, &mut totals[7], t)?;
            wall += iteration.elapsed().as_secs_f64();
        }
        let n = draws.len() as f64;
        println!(
            "eio_step phases: mean per iteration over {} iterations (layers {:?}), {:.1} ms in all",
            draws.len(),
            draws.iter().map(|d| d.layer).collect::<Vec<_>>(),
            wall / n * 1e3
        );
        let timed: f64 = totals.iter().sum();
        for (name, t) in names.iter().zip(totals) {
            println!(
                "  {name:<48} {:9.1} ms  {:5.1}%",
                t / n * 1e3,
                100.0 * t / timed
            );
        }
        println!(
            "  {:<48} {:9.1} ms",
            "between phases (loop, draws)",
            (wall - timed) / n * 1e3
        );
        Ok(())
    }

    fn pgd50_eval(&mut self) -> BenchResult<Outcome> {
        let a = self.args.clone();
        let (config, plan) = config(a.eval_batch, 1)?;
        let seeds = Seeds::new(a.seed);
        let state = ModelState::init(&plan, &seeds, 0, &self.device, self.dtype)?;
        let path = plan
            .path_space()
            .sample(&mut seeds.stream(Stream::Gates, 0));
        let target = Target::Path {
            plan: &plan,
            state: &state,
            path: &path,
            mode: BnMode::Eval,
        };
        let settings = AttackSettings {
            eps: 0.03,
            step_size: 0.006,
            steps: a.pgd_steps,
            random_start: true,
            loss: AttackLoss::Ce,
            cw_kappa: config.eval.cw_kappa,
            momentum: None,
            input_diversity: None,
            skip_gradient: None,
        };
        let xs = (0..2)
            .map(|_| images(&mut self.data, a.eval_batch, &self.device, self.dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ys = (0..2)
            .map(|_| labels(&mut self.data, a.eval_batch, &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (warmup, iters) = (
            a.pgd_warmup.unwrap_or(a.warmup),
            a.pgd_iters.unwrap_or(a.iters),
        );
        let times = time_loop(&self.device, warmup, iters, |i| {
            let mut rng = seeds.stream(Stream::AttackStart, i as u64);
            pgd(&target, &xs[i % 2], &ys[i % 2], &settings, &mut rng)?;
            Ok(())
        })?;
        Ok(Outcome {
            times,
            images: a.eval_batch,
            extra: json!({ "pgd_eps": 0.03, "pgd_step": 0.006, "pgd_steps": a.pgd_steps }),
        })
    }

    fn rgn_forward_eval(&mut self) -> BenchResult<Outcome> {
        let a = self.args.clone();
        let (_, plan) = config(a.eval_batch, 2)?;
        let seeds = Seeds::new(a.seed);
        let state = ModelState::init(&plan, &seeds, 0, &self.device, self.dtype)?;
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed + 2);
        let paths: Vec<_> = (0..a.warmup + a.iters)
            .map(|_| plan.path_space().sample(&mut rng))
            .collect();
        let xs = (0..2)
            .map(|_| images(&mut self.data, a.eval_batch, &self.device, self.dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let times = time_loop(&self.device, a.warmup, a.iters, |i| {
            eval_logits(&plan, &state, &paths[i], &xs[i % 2])?;
            Ok(())
        })?;
        Ok(Outcome {
            times,
            images: a.eval_batch,
            extra: json!({}),
        })
    }
}

fn main() -> BenchResult<()> {
    let args = <Args as clap::Parser>::parse();
    if args.iters == 0 || args.eio_iters == Some(0) || args.pgd_iters == Some(0) {
        return Err("--iters, --eio-iters and --pgd-iters must be at least 1".into());
    }
    if !args.malloc_default {
        eio_accelerated::device::keep_freed_memory();
    }
    let device = eio_accelerated::device::select(&args.device)?;
    let dtype = eio_accelerated::device::dtype(&args.dtype)?;
    println!(
        "eio workloads | device {} dtype {:?} | threads {} | batch {} eval-batch {}",
        args.device,
        dtype,
        rayon::current_num_threads(),
        args.batch,
        args.eval_batch
    );
    let mut bench = Bench {
        device,
        dtype,
        data: ChaCha8Rng::seed_from_u64(args.seed),
        args: args.clone(),
    };
    if args.phases {
        return eio_accelerated::device::on_cpu_pool(|| bench.phases());
    }
    let mut results = serde_json::Map::new();
    for &workload in &args.workloads {
        peak_rss::reset();
        let name = workload.name();
        let outcome = eio_accelerated::device::on_cpu_pool(|| match workload {
            Workload::BaselineStep => bench.baseline_step(),
            Workload::EioStep => bench.eio_step(),
            Workload::Pgd50Eval => bench.pgd50_eval(),
            Workload::RgnForwardEval => bench.rgn_forward_eval(),
        })?;
        let peak = peak_rss::mib();
        let (median, mean, best) = stats(&outcome.times);
        let per_s = |t: f64| outcome.images as f64 / t;
        println!(
            "{name:<17} median {:9.2} ms  min {:9.2} ms  mean {:9.2} ms | {:8.1} img/s (median) {:8.1} img/s (mean) | batch {} | peak RSS {}",
            median * 1e3,
            best * 1e3,
            mean * 1e3,
            per_s(median),
            per_s(mean),
            outcome.images,
            peak.map_or("n/a".into(), |m| format!("{m:.0} MiB")),
        );
        results.insert(
            name.to_string(),
            json!({
                "median_ms": median * 1e3,
                "mean_ms": mean * 1e3,
                "min_ms": best * 1e3,
                "images_per_iter": outcome.images,
                "images_per_s_median": per_s(median),
                "images_per_s_mean": per_s(mean),
                "images_per_s_best": per_s(best),
                "peak_rss_mib": peak,
                "per_iter_ms": outcome.times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
                "extra": outcome.extra,
            }),
        );
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "engine": "eio",
            "dtype": args.dtype,
            "device": args.device,
            "threads": rayon::current_num_threads(),
            "batch": args.batch,
            "eval_batch": args.eval_batch,
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

//! `eio`: train, derive and evaluate Ensemble-in-One networks (and their baselines) from the
//! command line. A thin layer: it parses arguments, shows progress and calls
//! `eio_accelerated::experiment`, where every stage lives.

use std::io::IsTerminal;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use eio_accelerated::checkpoint::{Checkpoint, Phase};
use eio_accelerated::experiment::{
    self, Deployment, EvalReport, Evaluated, PipelineDisplay, RunDir,
};
use eio_accelerated::train::{self, BatchEvent, EpochRecord, Flow, Observer, Outcome, TrainError};
use eio_spec::config::{AttackLoss, Config, Preset};
use eio_spec::rng::{Seeds, Stream};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "eio",
    version,
    about = "Ensemble-in-One: random gated networks, trained, derived and attacked"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a baseline ensemble, an EIO random gated network, or a PGD-AT model.
    Train(TrainArgs),
    /// Derive single-path networks from a trained RGN, fine-tune and optionally fold BN.
    Derive(DeriveArgs),
    /// Clean, white-box PGD and transfer accuracy, all-or-nothing.
    Eval(EvalArgs),
    /// The whole pipeline of a config: baseline, EIO, derive, evaluate, report.md.
    Run(RunArgs),
    /// Import a PyTorch checkpoint (the authors' released RGN, a DVERGE ResNet state dict).
    Import(ImportArgs),
    /// Export a model under PyTorch names as safetensors (DVERGE's ResNet or the authors' RGN).
    Export(ExportArgs),
}

#[derive(Args)]
struct ImportArgs {
    /// A PyTorch checkpoint: legacy or zip serialization (or safetensors).
    file: PathBuf,
    /// The eio checkpoint to write.
    #[arg(long)]
    out: PathBuf,
    /// Architecture: resnet20, resnet32, ... (ResNet-(6k+2)).
    #[arg(long, default_value = "resnet20")]
    arch: String,
    /// How candidates share weights: shared-conv (the authors' release) or independent.
    #[arg(long, default_value = "shared-conv")]
    sharing: String,
    /// The config the model belongs to (default: the `official` preset).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Take model.mean / model.std from the file instead of checking them against the config.
    #[arg(long)]
    normalizer_from_file: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct ExportArgs {
    /// An eio checkpoint or model.
    checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// For an RGN: the path to export as DVERGE's ResNet.
    #[arg(long, conflicts_with = "authors")]
    path: Option<String>,
    /// Export the whole RGN under the authors' `net.model.*` keys.
    #[arg(long)]
    authors: bool,
}

#[derive(Args)]
struct Common {
    /// cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Float precision of the engine: f32 or f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// No progress bars or per-epoch lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct ConfigArgs {
    /// A TOML config (see configs/).
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A shipped preset: paper, official, dverge, quick.
    #[arg(long)]
    preset: Option<String>,
    /// Override a setting: --set train.epochs=10 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Run folder: config.toml, checkpoint.safetensors, model.safetensors, metrics.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out where it stopped.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct DeriveArgs {
    /// The trained RGN (a model.safetensors or checkpoint.safetensors of `eio train`).
    #[arg(long)]
    from: PathBuf,
    /// Gate vector to derive, e.g. 0101...; repeat for an ensemble of paths.
    #[arg(long = "path", conflicts_with = "random")]
    paths: Vec<String>,
    /// Derive a uniformly drawn path (Eq. 1) instead.
    #[arg(long)]
    random: bool,
    /// Seed of --random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fine-tuning epochs (default: the RGN config's derive.finetune_epochs).
    #[arg(long)]
    finetune_epochs: Option<usize>,
    /// Fold conv+BN pairs into folded.safetensors (checked against the unfolded logits).
    #[arg(long)]
    fold_bn: bool,
    /// Override data settings for fine-tuning, e.g. --set data.path=...
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run folder of the derived model.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct EvalArgs {
    /// Model(s) to evaluate; several form an ensemble (mean softmax).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Gate vector for an RGN model.
    #[arg(long)]
    path: Option<String>,
    /// Deploy an RGN with random gates at test time (attacked with EOT).
    #[arg(long)]
    random_gates: bool,
    /// Paths averaged per gradient under --random-gates.
    #[arg(long)]
    eot: Option<usize>,
    /// The attack (PGD, L-inf).
    #[arg(long, default_value = "pgd")]
    attack: String,
    /// Losses: ce, cw (comma separated).
    #[arg(long, value_delimiter = ',')]
    loss: Vec<String>,
    /// Radii in [0, 1] pixel units (comma separated).
    #[arg(long, value_delimiter = ',')]
    eps: Vec<f64>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    restarts: Option<usize>,
    /// Test images (a fixed seeded subset).
    #[arg(long)]
    images: Option<usize>,
    /// Models the transfer examples are made on (an ensemble when several).
    #[arg(long = "transfer-from")]
    transfer_from: Vec<PathBuf>,
    /// Override settings, e.g. --set data.path=... or --set eval.batch_size=100.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Where eval.json and eval.csv go (default: beside the first model).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct RunArgs {
    /// A TOML config (see configs/).
    config: PathBuf,
    /// Output folder (default: runs/<config file stem>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    common: Common,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Every command runs on a worker of the CPU kernels' pool (see `device::on_cpu_pool`).
    match eio_accelerated::device::on_cpu_pool(|| run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<std::process::ExitCode> {
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupt);
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: saving a checkpoint after this batch (Ctrl-C again to abort)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let finished = match cli.command {
        Command::Train(a) => train_cmd(a, &interrupt)?,
        Command::Derive(a) => derive_cmd(a, &interrupt)?,
        Command::Eval(a) => eval_cmd(a)?,
        Command::Run(a) => run_cmd(a, &interrupt)?,
        Command::Import(a) => import_cmd(a)?,
        Command::Export(a) => export_cmd(a)?,
    };
    Ok(if finished {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("stopped; continue with the same command and --resume");
        std::process::ExitCode::from(130)
    })
}

fn load_config(args: &ConfigArgs) -> Result<Config> {
    let config = match (&args.config, &args.preset) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(name)) => Preset::from_name(name)
            .with_context(|| format!("no preset {name:?} (paper, official, dverge, quick)"))?
            .config()?,
        (None, None) => bail!("give --config FILE or --preset NAME"),
    };
    Ok(config.with_overrides(&args.set)?)
}

fn engine(common: &Common) -> Result<(Device, DType)> {
    Ok((
        eio_accelerated::device::select(&common.device)?,
        eio_accelerated::device::dtype(&common.dtype)?,
    ))
}

fn load_data(config: &Config, quiet: bool) -> Result<eio_data::DataSplits> {
    let started = Instant::now();
    let data = eio_data::load(config, &Seeds::new(config.seed))?;
    if !quiet {
        eprintln!(
            "data: {} ({} train, {} validation, {} test) in {:.1} s",
            data.source,
            data.train.len(),
            data.validation.len(),
            data.test.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(data)
}

/// Progress bars (only on a terminal) and one line per epoch on stderr (unless quiet).
struct Display {
    bar: ProgressBar,
    quiet: bool,
    terminal: bool,
    phase: Phase,
    epochs: usize,
}

impl Display {
    fn new(quiet: bool) -> Self {
        let terminal = std::io::stderr().is_terminal() && !quiet;
        Display {
            bar: ProgressBar::hidden(),
            quiet,
            terminal,
            phase: Phase::Main,
            epochs: 0,
        }
    }

    fn new_bar(&mut self, len: usize, prefix: String) {
        self.bar.finish_and_clear();
        self.bar = if self.terminal {
            let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(prefix);
            bar
        } else {
            ProgressBar::hidden()
        };
    }
}

impl Observer for Display {
    fn phase(&mut self, phase: Phase, epoch: usize, epochs: usize, batches: usize) {
        self.phase = phase;
        self.epochs = epochs;
        self.new_bar(batches, format!("{phase:?} epoch {}/{epochs}", epoch + 1));
    }

    fn batch(&mut self, e: &BatchEvent) {
        if e.batch == 0 || self.bar.position() as usize > e.batch {
            self.new_bar(
                e.batches,
                format!("{:?} epoch {}/{}", e.phase, e.epoch + 1, self.epochs),
            );
        }
        self.bar.set_position(e.batch as u64 + 1);
        let acc = e
            .accuracy
            .map(|a| format!(" acc {:.1}%", 100.0 * a))
            .unwrap_or_default();
        self.bar.set_message(format!(
            "loss {:.4}{acc} {:.0} img/s",
            e.loss, e.images_per_second
        ));
    }

    fn epoch(&mut self, r: &EpochRecord) -> Result<Flow, TrainError> {
        self.bar.finish_and_clear();
        if !self.quiet {
            let fmt = |v: Option<f64>| v.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a));
            eprintln!(
                "{:?} epoch {}/{}: loss {:.4}, train acc {}, val acc {}, lr {:.3e}, {:.0} img/s, {:.1} s",
                r.phase,
                r.epoch + 1,
                self.epochs,
                r.loss,
                fmt(r.train_accuracy),
                fmt(r.validation_accuracy),
                r.lr,
                r.images_per_second,
                r.seconds
            );
        }
        Ok(Flow::Continue)
    }
}

impl PipelineDisplay for Display {
    fn stage(&mut self, name: &str, detail: &str) {
        if !self.quiet {
            eprintln!("== {name}: {detail}");
        }
    }
    fn observer(&mut self) -> &mut dyn Observer {
        self
    }
    fn eval_progress(&mut self, attack: &str, batch: usize, batches: usize) {
        if batch == 1 {
            self.new_bar(batches, format!("evaluate ({attack})"));
        }
        self.bar.set_position(batch as u64);
        if batch == batches {
            self.bar.finish_and_clear();
        }
    }
}

fn train_cmd(a: TrainArgs, interrupt: &AtomicBool) -> Result<bool> {
    let config = load_config(&a.config)?;
    let (device, dtype) = engine(&a.common)?;
    let dir = RunDir::new(&a.out);
    let checkpoint = experiment::open_run(&dir, &config, a.resume, &device, || {
        Ok(train::start(&config, &device, dtype)?)
    })?;
    let data = load_data(&config, a.common.quiet)?;
    let mut display = Display::new(a.common.quiet);
    let (outcome, _) =
        experiment::train_in(&dir, checkpoint, &data, &device, &mut display, interrupt)?;
    if outcome == Outcome::Finished && !a.common.quiet {
        eprintln!("done: {}", dir.model().display());
    }
    Ok(outcome == Outcome::Finished)
}

fn derive_cmd(a: DeriveArgs, interrupt: &AtomicBool) -> Result<bool> {
    let (device, dtype) = engine(&a.common)?;
    let dir = RunDir::new(&a.out);
    let rgn = Checkpoint::load(&a.from, &device, Some(dtype))
        .with_context(|| format!("reading the RGN {}", a.from.display()))?;
    let plan = rgn.plan()?;
    let space = plan.path_space();
    let paths = if a.random {
        vec![space.sample(&mut Seeds::new(a.seed).stream(Stream::Gates, experiment::DERIVE_GATES))]
    } else if a.paths.is_empty() {
        bail!("give --path <gates> (repeatable) or --random");
    } else {
        a.paths
            .iter()
            .map(|p| space.parse(p).with_context(|| format!("--path {p}")))
            .collect::<Result<Vec<_>>>()?
    };
    let checkpoint = if dir.checkpoint().exists() {
        if !a.resume {
            bail!(
                "{} already holds a derivation; pass --resume to continue it",
                dir.root.display()
            );
        }
        Checkpoint::load(&dir.checkpoint(), &device, None)?
    } else {
        experiment::derive(&rgn, &a.from, &paths, dtype, |config| {
            let mut config = config
                .with_overrides(&a.set)
                .map_err(|e| experiment::ExperimentError::Usage(e.to_string()))?;
            if let Some(n) = a.finetune_epochs {
                config.derive.finetune_epochs = n;
            }
            Ok(config)
        })?
    };
    let config = checkpoint.meta.config.clone();
    eprintln!(
        "derived path(s): {}",
        paths
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let data = load_data(&config, a.common.quiet)?;
    let mut display = Display::new(a.common.quiet);
    let (outcome, checkpoint) =
        experiment::train_in(&dir, checkpoint, &data, &device, &mut display, interrupt)?;
    if outcome != Outcome::Finished {
        return Ok(false);
    }
    if a.fold_bn {
        let (folded, diff) = experiment::fold(&checkpoint, &data.test, &device)?;
        folded.save(&dir.folded())?;
        eprintln!(
            "folded {} conv+BN pairs into {} (largest logit difference to the unfolded model: {diff:.2e})",
            folded.summary().folded_pairs,
            dir.folded().display()
        );
    }
    eprintln!("done: {}", dir.model().display());
    Ok(true)
}

fn load_models(
    paths: &[PathBuf],
    device: &Device,
    dtype: DType,
    path: Option<&str>,
) -> Result<Vec<Evaluated>> {
    paths
        .iter()
        .map(|p| {
            let checkpoint = Checkpoint::load(p, device, Some(dtype))
                .with_context(|| format!("reading model {}", p.display()))?;
            let gates = match path {
                Some(text) => Some(
                    checkpoint
                        .plan()?
                        .path_space()
                        .parse(text)
                        .with_context(|| format!("--path {text}"))?,
                ),
                None => None,
            };
            Ok(Evaluated {
                name: p.display().to_string(),
                checkpoint,
                path: gates,
            })
        })
        .collect()
}

fn eval_cmd(a: EvalArgs) -> Result<bool> {
    let (device, dtype) = engine(&a.common)?;
    if a.attack != "pgd" {
        bail!("--attack {:?}: only pgd is available", a.attack);
    }
    let models = load_models(&a.models, &device, dtype, a.path.as_deref())?;
    let sources = load_models(&a.transfer_from, &device, dtype, None)?;
    let mut config = models[0]
        .checkpoint
        .meta
        .config
        .clone()
        .with_overrides(&a.set)?;
    let e = &mut config.eval;
    if !a.loss.is_empty() {
        e.losses = a
            .loss
            .iter()
            .map(|l| match l.as_str() {
                "ce" => Ok(AttackLoss::Ce),
                "cw" => Ok(AttackLoss::Cw),
                other => bail!("--loss {other:?}: expected ce or cw"),
            })
            .collect::<Result<_>>()?;
    }
    if !a.eps.is_empty() {
        e.eps = a.eps.clone();
    }
    if let Some(s) = a.steps {
        e.steps = s;
    }
    if let Some(r) = a.restarts {
        e.restarts = r;
    }
    if let Some(n) = a.images {
        e.images = n;
    }
    if let Some(k) = a.eot {
        e.eot_samples = k;
    }
    config
        .validate()
        .map_err(|errors| anyhow::anyhow!("invalid evaluation settings:\n{errors}"))?;
    let data = load_data(&config, a.common.quiet)?;
    let images = experiment::eval_images(&config, &data);
    let deployment = if a.random_gates {
        Deployment::RandomGates {
            eot: config.eval.eot_samples,
        }
    } else {
        Deployment::Fixed
    };
    let (plans, paths) = experiment::plans_and_paths(&models, a.random_gates)?;
    let target = experiment::target(&models, &plans, &paths, deployment)?;
    let (splans, spaths) = experiment::plans_and_paths(&sources, false)?;
    let source = if sources.is_empty() {
        None
    } else {
        Some(experiment::target(
            &sources,
            &splans,
            &spaths,
            Deployment::Fixed,
        )?)
    };
    let source_name = sources
        .iter()
        .map(|s| s.name.clone())
        .collect::<Vec<_>>()
        .join(" + ");
    let name = models
        .iter()
        .map(|m| m.name.clone())
        .collect::<Vec<_>>()
        .join(" + ");
    let name = match (&a.path, a.random_gates) {
        (Some(p), _) => format!("{name} path {p}"),
        (None, true) => format!("{name} random gates, EOT {}", config.eval.eot_samples),
        _ => name,
    };
    let mut display = Display::new(a.common.quiet);
    let started = Instant::now();
    let reports = experiment::evaluate(
        &name,
        &target,
        source.as_ref().map(|s| (source_name.as_str(), s)),
        &images,
        &config.eval,
        config.seed,
        &device,
        dtype,
        &mut |attack, b, n| display.eval_progress(attack, b, n),
    )?;
    let out = a.out.clone().unwrap_or_else(|| {
        a.models[0]
            .parent()
            .map_or_else(|| PathBuf::from("."), FsPath::to_path_buf)
    });
    EvalReport::write(&reports, &out)?;
    println!("{}", EvalReport::table(&reports));
    eprintln!(
        "{} images in {:.1} s; wrote {} and {}",
        images.len(),
        started.elapsed().as_secs_f64(),
        out.join("eval.json").display(),
        out.join("eval.csv").display()
    );
    Ok(true)
}

fn run_cmd(a: RunArgs, interrupt: &AtomicBool) -> Result<bool> {
    let config = Config::load(&a.config)?.with_overrides(&a.set)?;
    let (device, dtype) = engine(&a.common)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(a.config.file_stem().unwrap_or_default()));
    let started = Instant::now();
    let data = load_data(&config, a.common.quiet)?;
    let mut display = Display::new(a.common.quiet);
    let report = experiment::run_pipeline(
        &config,
        &data,
        &out,
        &device,
        dtype,
        a.resume,
        &mut display,
        interrupt,
    )?;
    let Some(report) = report else {
        return Ok(false);
    };
    println!("{}", EvalReport::table(&report.reports));
    println!(
        "wall time {:.1} s; report: {}",
        started.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(true)
}

fn import_cmd(a: ImportArgs) -> Result<bool> {
    let (device, dtype) = engine(&a.common)?;
    let base = match &a.config {
        Some(path) => Config::load(path)?,
        None => Preset::Official.config()?,
    };
    let depth = a
        .arch
        .strip_prefix("resnet")
        .and_then(|d| d.parse::<usize>().ok())
        .with_context(|| format!("--arch {:?}: expected resnetN, e.g. resnet20", a.arch))?;
    let mut set = vec![
        "model.arch=\"resnet\"".to_string(),
        format!("model.depth={depth}"),
        format!("model.sharing=\"{}\"", a.sharing),
    ];
    set.extend(a.set.iter().cloned());
    let config = base.with_overrides(&set)?;
    let (checkpoint, summary) =
        eio_accelerated::pytorch::import(&a.file, &config, a.normalizer_from_file, &device, dtype)
            .with_context(|| format!("importing {}", a.file.display()))?;
    checkpoint.save(&a.out)?;
    eprintln!(
        "imported {} ({} layout, {} tensors{}{}) -> {}",
        a.file.display(),
        summary.layout,
        summary.tensors,
        if summary.ignored.is_empty() {
            String::new()
        } else {
            format!(", skipped {}", summary.ignored.join(" "))
        },
        if summary.normalizer_from_file {
            ", normaliser from the file"
        } else {
            ""
        },
        a.out.display()
    );
    Ok(true)
}

fn export_cmd(a: ExportArgs) -> Result<bool> {
    let checkpoint = Checkpoint::load(&a.checkpoint, &Device::Cpu, None)
        .with_context(|| format!("reading {}", a.checkpoint.display()))?;
    let path = match &a.path {
        Some(text) => Some(
            checkpoint
                .plan()?
                .path_space()
                .parse(text)
                .with_context(|| format!("--path {text}"))?,
        ),
        None => None,
    };
    let bytes = eio_accelerated::pytorch::export(&checkpoint, path.as_ref(), a.authors)?;
    eio_accelerated::checkpoint::write_atomically(&a.out, &bytes)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(true)
}

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
use eio_accelerated::sweep::{self, Sweep};
use eio_accelerated::train::{self, BatchEvent, EpochRecord, Flow, Observer, Outcome, TrainError};
use eio_spec::blackbox::Shard;
use eio_spec::config::{AttackLoss, Config, Preset};
use eio_spec::figure::Source;
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
    /// Import a PyTorch checkpoint (the authors' released RGN, a DVERGE ResNet state dict, a
    /// DVERGE ensemble file).
    Import(ImportArgs),
    /// Export a model under PyTorch names as safetensors (DVERGE's ResNet or the authors' RGN).
    Export(ExportArgs),
    /// The black-box transfer suite: train surrogates, generate versions, check a folder.
    Blackbox(BlackboxArgs),
    /// Run a paper figure's runs (configs/figures/), or one shard of them; finished runs are
    /// skipped and interrupted ones resumed by the same command.
    Sweep(SweepArgs),
    /// Draw a sweep folder's finished runs: SVG and PNG panels, figure.md, CSV.
    Plot(PlotArgs),
    /// Check a file or a folder tree (runs, suites, sweeps): what is complete, partial, corrupt.
    Verify(VerifyArgs),
}

#[derive(Args)]
struct SweepArgs {
    /// A shipped figure (fig3, fig4, fig4-vgg16, fig5, fig6, fig7, fig8) or a figure file (.toml).
    figure: String,
    /// The figure's scale: cpu (each figure about 90 minutes on 2 cores, reduced as its note
    /// says) or paper (the paper's settings, for GPUs).
    #[arg(long, default_value = "cpu")]
    scale: String,
    /// The sweep folder (default: runs/<figure>-<scale>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a setting of every run, after the scale's: --set data.path=cifar10.tar.gz.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the runs, their shard and status, and exit.
    #[arg(long)]
    list: bool,
    /// Run only task I of N (0 <= I < N): runs I, I+N, I+2N, ... Default: SLURM_ARRAY_TASK_ID
    /// of SLURM_ARRAY_TASK_COUNT when set (`sbatch --array=0-N-1`), else every run.
    #[arg(long, value_name = "I", requires = "tasks")]
    task: Option<usize>,
    /// The number of tasks the runs are split over (with --task).
    #[arg(long, value_name = "N", requires = "task")]
    tasks: Option<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct PlotArgs {
    /// A sweep folder (of `eio sweep`).
    dir: PathBuf,
    /// Where the plots, figure.md and CSV files go (default: DIR).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    /// A file (checkpoint, model, metrics.jsonl, eval.json, ...) or a folder, walked recursively.
    path: PathBuf,
}

#[derive(Args)]
struct ImportArgs {
    /// A PyTorch checkpoint: legacy or zip serialization (or safetensors). A DVERGE ensemble
    /// file (`{'model_0': ..., 'model_1': ...}`) becomes one checkpoint of all its members
    /// (`model.n = 1`, `train.method = "baseline"` unless the config names another ensemble
    /// method, `train.ensemble_size` = the member count).
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
    /// Import only model I (`model_<I>`) of an ensemble file, as one model.
    #[arg(long, value_name = "I")]
    member: Option<usize>,
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
    /// A shipped preset: paper, official, dverge, quick, vgg16 (configs/; sources in
    /// spec/SPEC.md, "Presets and their sources").
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
    /// Gate vector for an RGN model, e.g. 0101... (repeatable with --transfer-matrix: one
    /// source per path).
    #[arg(long)]
    path: Vec<String>,
    /// Deploy an RGN with random gates at test time (attacked with EOT).
    #[arg(long)]
    random_gates: bool,
    /// Paths averaged per gradient under --random-gates (default eval.eot_samples).
    #[arg(long)]
    eot: Option<usize>,
    /// Clean accuracy only (also what `eio eval` does without --eps, --blackbox and
    /// --convergence-check); on every test image unless --images is given.
    #[arg(long)]
    clean: bool,
    /// White-box PGD losses: ce, cw, cw-dverge (comma separated; default eval.losses).
    #[arg(long, value_delimiter = ',')]
    loss: Vec<String>,
    /// White-box PGD radii in [0, 1] pixel units (comma separated); without --eps no PGD runs.
    #[arg(long, value_delimiter = ',')]
    eps: Vec<f64>,
    /// White-box PGD steps (default eval.steps).
    #[arg(long)]
    steps: Option<usize>,
    /// White-box PGD random restarts, all-or-nothing (default eval.restarts).
    #[arg(long)]
    restarts: Option<usize>,
    /// Test images (a fixed seeded subset; default eval.images, every image with --clean).
    #[arg(long)]
    images: Option<usize>,
    /// Models the transfer PGD examples are made on (an ensemble when several); needs --eps.
    #[arg(long = "transfer-from")]
    transfer_from: Vec<PathBuf>,
    /// Score on the black-box transfer suite in this folder (made by `eio blackbox generate`).
    #[arg(long)]
    blackbox: Option<PathBuf>,
    /// DVERGE's convergence check at this radius: white-box PGD with each of
    /// --convergence-steps; more steps must never raise accuracy.
    #[arg(long)]
    convergence_check: Option<f64>,
    /// Step counts of --convergence-check (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "50,500,1000")]
    convergence_steps: Vec<usize>,
    /// Override settings, e.g. --set data.path=... or --set eval.batch_size=100.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// DVERGE's transferability matrix instead of the accuracy tables: PGD (CE, --eps, default
    /// 0.03) on each source alone, tested on every source and on their ensemble, over a seeded
    /// subset of the test images every source classifies correctly; the sources are the
    /// members of the --model ensemble, or paths of one RGN (--paths K or --path, repeatable).
    /// Writes transfer-matrix.csv and transfer-matrix.json.
    #[arg(long)]
    transfer_matrix: bool,
    /// With --transfer-matrix on an RGN: K distinct random paths (seeded by the config's seed).
    #[arg(long, value_name = "K")]
    paths: Option<usize>,
    /// Where eval.json and eval.csv (or the transfer matrix's files) go (default: beside the
    /// first model).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct BlackboxArgs {
    #[command(subcommand)]
    command: BlackboxCommand,
}

#[derive(Subcommand)]
enum BlackboxCommand {
    /// Train the surrogate baseline ensembles of blackbox.surrogate_sizes / surrogate_seeds
    /// (default 3, 5 and 8 ResNet-20s) into DIR/baseline<size>; finished ones are kept.
    Surrogates(SurrogatesArgs),
    /// Generate the suite's adversarial versions (trains nothing); finished jobs are skipped.
    Generate(GenerateArgs),
    /// Print which jobs of a suite folder are done and which are missing.
    Status(StatusArgs),
}

#[derive(Args)]
struct SurrogatesArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Folder of the surrogate runs.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct GenerateArgs {
    /// A folder of `eio blackbox surrogates`: the DIR/baseline<size>/model.safetensors of
    /// --config's blackbox.surrogate_sizes, or without --config every one found, smallest first.
    #[arg(long, required_unless_present = "surrogate")]
    surrogates: Option<PathBuf>,
    /// A surrogate as NAME=MODEL (repeatable, in suite order), e.g. baseline3=runs/b3/model.safetensors.
    #[arg(long, value_name = "NAME=MODEL", conflicts_with = "surrogates")]
    surrogate: Vec<String>,
    /// Settings of the suite: [blackbox], seed (the master seed of the suite's streams and of
    /// its image subset) and [data]; default: the first surrogate's config, its seed included.
    #[command(flatten)]
    config: OptionalConfigArgs,
    /// The suite folder.
    #[arg(long)]
    out: PathBuf,
    /// Run one shard I/N of the jobs (0 <= I < N); default: SLURM_ARRAY_TASK_ID of
    /// SLURM_ARRAY_TASK_COUNT when set, else every job.
    #[arg(long)]
    shard: Option<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct OptionalConfigArgs {
    /// A TOML config whose [blackbox], seed and [data] sections are used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a setting: --set blackbox.steps=20 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct StatusArgs {
    /// The suite folder.
    suite: PathBuf,
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
    eio_accelerated::device::keep_freed_memory();
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
        Command::Blackbox(a) => match a.command {
            BlackboxCommand::Surrogates(a) => surrogates_cmd(a, &interrupt)?,
            BlackboxCommand::Generate(a) => generate_cmd(a, &interrupt)?,
            BlackboxCommand::Status(a) => status_cmd(a)?,
        },
        Command::Sweep(a) => sweep_cmd(a, &interrupt)?,
        Command::Plot(a) => plot_cmd(a)?,
        Command::Verify(a) => return verify_cmd(a),
    };
    Ok(if finished {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!(
            "stopped; the same command continues (add --resume to train, derive and run; sweep needs nothing)"
        );
        std::process::ExitCode::from(130)
    })
}

fn load_config(args: &ConfigArgs) -> Result<Config> {
    let config = match (&args.config, &args.preset) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(name)) => Preset::from_name(name)
            .with_context(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                format!("no preset {name:?} ({})", names.join(", "))
            })?
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
            // With a hold-out the epoch's accuracy is validation accuracy; without one
            // (data.validation = 0) it is measured on the test set and says so.
            let held_out = match (r.validation_accuracy, r.test_accuracy) {
                (None, Some(t)) => format!("test acc {}", fmt(Some(t))),
                (v, _) => format!("val acc {}", fmt(v)),
            };
            eprintln!(
                "{:?} epoch {}/{}: loss {:.4}, train acc {}, {held_out}, lr {:.3e}, {:.0} img/s, {:.1} s",
                r.phase,
                r.epoch + 1,
                self.epochs,
                r.loss,
                fmt(r.train_accuracy),
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
    if a.transfer_matrix {
        return transfer_matrix_cmd(a);
    }
    if a.paths.is_some() {
        bail!("--paths K chooses the sources of --transfer-matrix: add --transfer-matrix");
    }
    if a.path.len() > 1 {
        bail!("--path is given {} times: several paths are sources of --transfer-matrix; evaluate one path at a time", a.path.len());
    }
    let (device, dtype) = engine(&a.common)?;
    if !a.transfer_from.is_empty() && a.eps.is_empty() {
        bail!("--transfer-from makes PGD examples: give --eps");
    }
    if a.clean && (!a.eps.is_empty() || a.blackbox.is_some() || a.convergence_check.is_some()) {
        bail!(
            "--clean measures clean accuracy only: drop --eps, --blackbox and --convergence-check"
        );
    }
    let pgd = !a.eps.is_empty();
    let models = load_models(
        &a.models,
        &device,
        dtype,
        a.path.first().map(String::as_str),
    )?;
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
            .map(|l| {
                AttackLoss::from_name(l)
                    .with_context(|| format!("--loss {l:?}: expected ce, cw or cw-dverge"))
            })
            .collect::<Result<_>>()?;
    }
    if pgd {
        e.eps = a.eps.clone();
    }
    if let Some(s) = a.steps {
        e.steps = s;
    }
    if let Some(r) = a.restarts {
        e.restarts = r;
    }
    let only_clean = !pgd && a.blackbox.is_none() && a.convergence_check.is_none();
    match a.images {
        Some(n) => e.images = n,
        None if only_clean => e.images = usize::MAX,
        None => {}
    }
    if let Some(k) = a.eot {
        e.eot_samples = k;
    }
    config
        .validate()
        .map_err(|errors| anyhow::anyhow!("invalid evaluation settings:\n{errors}"))?;
    let suite = a
        .blackbox
        .as_deref()
        .map(eio_accelerated::blackbox::Suite::open)
        .transpose()?;
    if let Some(suite) = &suite {
        for m in &models {
            let bytes = std::fs::read(&m.name).with_context(|| format!("reading {}", m.name))?;
            let hash = eio_accelerated::blackbox::sha256_hex(&bytes);
            if let Some(s) = suite.manifest.surrogates.iter().find(|s| s.sha256 == hash) {
                bail!(
                    "{} is the suite's surrogate {} ({}): a transfer suite must not be scored on its own surrogate",
                    m.name,
                    s.name,
                    s.file
                );
            }
        }
    }
    let mut display = Display::new(a.common.quiet);
    let started = Instant::now();
    let (plans, paths) = experiment::plans_and_paths(&models, a.random_gates)?;
    let deployment = if a.random_gates {
        Deployment::RandomGates {
            eot: config.eval.eot_samples,
        }
    } else {
        Deployment::Fixed
    };
    let target = experiment::target(&models, &plans, &paths, deployment)?;
    let name = models
        .iter()
        .map(|m| m.name.clone())
        .collect::<Vec<_>>()
        .join(" + ");
    let name = match (a.path.first(), a.random_gates) {
        (Some(p), _) => format!("{name} path {p}"),
        (None, true) => format!("{name} random gates, EOT {}", config.eval.eot_samples),
        _ => name,
    };
    let mut reports = Vec::new();
    let mut flags = Vec::new();
    let mut images_used = 0;
    if pgd || only_clean || a.convergence_check.is_some() {
        let data = load_data(&config, a.common.quiet)?;
        let images = experiment::eval_images(&config, &data);
        images_used = images.len();
        if only_clean {
            reports.push(experiment::clean_report(
                &name,
                &target,
                &images,
                config.eval.batch_size,
                config.seed,
                &device,
                dtype,
            )?);
        }
        if pgd {
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
            reports.extend(experiment::evaluate(
                &name,
                &target,
                source.as_ref().map(|s| (source_name.as_str(), s)),
                &images,
                &config.eval,
                config.seed,
                &device,
                dtype,
                &mut |attack, b, n| display.eval_progress(attack, b, n),
            )?);
            flags.push(eio_accelerated::sanity::gradient_masking(
                &name,
                &target,
                &images,
                &config.eval,
                config.seed,
                &device,
                dtype,
            )?);
        }
        if let Some(eps) = a.convergence_check {
            let (flag, points) = eio_accelerated::sanity::convergence(
                &name,
                &target,
                &images,
                &config.eval,
                eps,
                &a.convergence_steps,
                config.seed,
                &device,
                dtype,
                &mut |steps, b, n| {
                    display.eval_progress(&format!("convergence, {steps} steps"), b, n)
                },
            )?;
            for (steps, acc) in points {
                eprintln!(
                    "convergence check: eps {eps}, {steps} steps: {:.1} %",
                    100.0 * acc
                );
            }
            flags.push(flag);
        }
    }
    if let Some(suite) = &suite {
        images_used = images_used.max(suite.clean.len());
        reports.push(experiment::suite_report(
            &name,
            &target,
            suite,
            config.seed,
            config.eval.batch_size,
            &device,
            dtype,
            &mut |b, n| display.eval_progress("black-box suite", b, n),
        )?);
        let seeds: Vec<u64> = suite.manifest.surrogates.iter().map(|s| s.seed).collect();
        for m in &models {
            let seed = m.checkpoint.meta.config.seed;
            flags.push(eio_spec::sanity::Flag {
                check: "model disjoint from the surrogates".into(),
                subject: m.name.clone(),
                passed: !seeds.contains(&seed),
                detail: format!("model seed {seed}, surrogate seeds {seeds:?}"),
            });
        }
    }
    let undefended: Vec<String> = models
        .iter()
        .all(|m| m.checkpoint.meta.config.train.method == eio_spec::config::Method::Baseline)
        .then(|| name.clone())
        .into_iter()
        .collect();
    let mut all_flags = eio_accelerated::sanity::report_flags(&reports, &undefended);
    all_flags.extend(flags);
    let out = a.out.clone().unwrap_or_else(|| {
        a.models[0]
            .parent()
            .map_or_else(|| PathBuf::from("."), FsPath::to_path_buf)
    });
    EvalReport::write(&reports, &all_flags, &out)?;
    println!("{}", EvalReport::table(&reports));
    if suite.is_some() {
        println!(
            "{}",
            EvalReport::table1(
                &reports,
                config.run.table_black_eps,
                config.run.table_white_eps
            )
        );
    }
    print_flags(&all_flags);
    eprintln!(
        "{} images in {:.1} s; wrote {} and {}",
        images_used,
        started.elapsed().as_secs_f64(),
        out.join("eval.json").display(),
        out.join("eval.csv").display()
    );
    Ok(true)
}

/// `eio eval --transfer-matrix`: DVERGE's transferability matrix
/// (`eio_accelerated::transfer_matrix`). Sources: every member of every --model (plain
/// networks), or, for one RGN, the paths of --paths K (`eio_spec::transfer_matrix::random_paths`,
/// seeded by the config's seed) or of the repeated --path; the last column is the ensemble of
/// the sources (mean softmax). Writes transfer-matrix.json and transfer-matrix.csv.
fn transfer_matrix_cmd(a: EvalArgs) -> Result<bool> {
    use eio_accelerated::attack::Member;
    use eio_accelerated::transfer_matrix::{self as tm, SourceInfo, TransferError};
    let unused = [
        (a.random_gates, "--random-gates"),
        (a.eot.is_some(), "--eot"),
        (a.clean, "--clean"),
        (!a.loss.is_empty(), "--loss"),
        (!a.transfer_from.is_empty(), "--transfer-from"),
        (a.blackbox.is_some(), "--blackbox"),
        (a.convergence_check.is_some(), "--convergence-check"),
    ];
    if let Some((_, flag)) = unused.iter().find(|(given, _)| *given) {
        bail!("--transfer-matrix runs DVERGE's protocol (cross-entropy PGD on each source): {flag} does not apply");
    }
    let defaults = tm::TransferSettings::default();
    let eps = match a.eps.as_slice() {
        [] => defaults.eps,
        [eps] => *eps,
        many => bail!(
            "--transfer-matrix attacks at one radius: give one --eps (got {})",
            many.len()
        ),
    };
    let (device, dtype) = engine(&a.common)?;
    let models = load_models(&a.models, &device, dtype, None)?;
    let config = models[0]
        .checkpoint
        .meta
        .config
        .clone()
        .with_overrides(&a.set)?;
    config
        .validate()
        .map_err(|errors| anyhow::anyhow!("invalid evaluation settings:\n{errors}"))?;
    let settings = tm::TransferSettings {
        eps,
        steps: a.steps.unwrap_or(defaults.steps),
        restarts: a.restarts.unwrap_or(defaults.restarts),
        images: a.images.unwrap_or(defaults.images),
        batch_size: config.eval.batch_size,
        ..defaults
    };
    if let Err(e) = settings.validate() {
        let flag = match &e {
            TransferError::BadSetting { field: "eps", .. } => "--eps",
            TransferError::BadSetting {
                field: "restarts", ..
            }
            | TransferError::TooLarge {
                what: "restarts", ..
            } => "--restarts",
            TransferError::BadSetting {
                field: "images", ..
            } => "--images",
            TransferError::BadSetting {
                field: "batch_size",
                ..
            } => "eval.batch_size",
            _ => "--transfer-matrix",
        };
        bail!("{flag}: {e}");
    }
    let seeds = Seeds::new(config.seed);
    let plans = models
        .iter()
        .map(|m| {
            m.checkpoint
                .plan()
                .with_context(|| format!("model {}", m.name))
        })
        .collect::<Result<Vec<_>>>()?;
    let rgn = models
        .iter()
        .position(|m| m.checkpoint.meta.config.model.n > 1);
    let mut paths = Vec::new();
    let mut origins = Vec::new();
    if let Some(i) = rgn {
        let m = &models[i];
        if models.len() != 1 || m.checkpoint.members.len() != 1 {
            bail!(
                "{} is a random gated network: --transfer-matrix takes it as the only --model (its paths are the sources)",
                m.name
            );
        }
        let space = plans[0].path_space();
        paths = match (a.paths, a.path.is_empty()) {
            (Some(_), false) => bail!("give --paths K or --path (repeatable), not both"),
            (Some(k), true) => eio_spec::transfer_matrix::random_paths(&space, k, &seeds)
                .with_context(|| format!("--paths {k} of {}", m.name))?,
            (None, false) => a
                .path
                .iter()
                .map(|p| space.parse(p).with_context(|| format!("--path {p}")))
                .collect::<Result<Vec<_>>>()?,
            (None, true) => bail!(
                "{} is a random gated network (n = {}): choose its source paths with --paths K or --path <gates> (repeatable)",
                m.name,
                m.checkpoint.meta.config.model.n
            ),
        };
        origins = (0..paths.len()).map(|p| (0, 0, p)).collect();
    } else {
        if a.paths.is_some() || !a.path.is_empty() {
            bail!(
                "--paths and --path choose paths of a random gated network; {} holds plain networks (model.n = 1)",
                models[0].name
            );
        }
        for (i, m) in models.iter().enumerate() {
            paths.push(eio_accelerated::checkpoint::Checkpoint::plain_path(
                &plans[i],
            ));
            for k in 0..m.checkpoint.members.len() {
                origins.push((i, k, i));
            }
        }
    }
    if origins.len() < 2 {
        bail!(
            "--transfer-matrix needs at least 2 sources, but {} holds {} network: give an ensemble (a model with several members, or several --model) or an RGN with --paths K",
            models[0].name,
            origins.len()
        );
    }
    let members: Vec<Member<'_>> = origins
        .iter()
        .map(|&(i, k, p)| Member {
            plan: &plans[i],
            state: &models[i].checkpoint.members[k],
            path: &paths[p],
        })
        .collect();
    let sources: Vec<SourceInfo> = origins
        .iter()
        .map(|&(i, k, p)| {
            let m = &models[i];
            let label = if rgn.is_some() {
                format!("path {}", paths[p])
            } else if models.len() == 1 {
                format!("member {k}")
            } else if m.checkpoint.members.len() == 1 {
                m.name.clone()
            } else {
                format!("{} member {k}", m.name)
            };
            SourceInfo {
                label,
                model: m.name.clone(),
                member: k,
                path: paths[p].to_string(),
            }
        })
        .collect();
    let data = load_data(&config, a.common.quiet)?;
    let mut display = Display::new(a.common.quiet);
    let started = Instant::now();
    let report = tm::run(
        &members,
        sources,
        &data.test,
        &settings,
        &seeds,
        &device,
        dtype,
        &mut |b, n| display.eval_progress("transfer matrix", b, n),
    )?;
    let out = a.out.clone().unwrap_or_else(|| {
        a.models[0]
            .parent()
            .map_or_else(|| PathBuf::from("."), FsPath::to_path_buf)
    });
    let (json, csv) = report.write(&out)?;
    println!(
        "attack success rate, eps {}: rows attacked (source), columns tested (target)\n{}",
        settings.eps, report.matrix
    );
    eprintln!(
        "{} of {} test images correct for every source, {} attacked ({} steps, {} restarts) in {:.1} s; wrote {} and {}",
        report.all_correct,
        report.pool,
        report.subset.len(),
        settings.steps,
        settings.restarts,
        started.elapsed().as_secs_f64(),
        json.display(),
        csv.display()
    );
    Ok(true)
}

/// Every sanity flag on stderr; breaches as warnings.
fn print_flags(flags: &[eio_spec::sanity::Flag]) {
    for f in flags {
        eprintln!("{}", f.line());
    }
    let breaches = flags.iter().filter(|f| !f.passed).count();
    if breaches > 0 {
        eprintln!("{breaches} sanity warning(s); they are recorded in eval.json");
    }
}

fn surrogates_cmd(a: SurrogatesArgs, interrupt: &AtomicBool) -> Result<bool> {
    let config = load_config(&a.config)?;
    let (device, dtype) = engine(&a.common)?;
    let data = load_data(&config, a.common.quiet)?;
    let mut display = Display::new(a.common.quiet);
    let trained = experiment::train_surrogates(
        &config,
        &a.out,
        &data,
        &device,
        dtype,
        &mut display,
        interrupt,
    )?;
    let Some(trained) = trained else {
        return Ok(false);
    };
    for (name, file) in trained {
        eprintln!("surrogate {name}: {}", file.display());
    }
    Ok(true)
}

struct GenerateDisplay {
    quiet: bool,
}

impl eio_accelerated::blackbox::GenerateProgress for GenerateDisplay {
    fn job(&mut self, job: &eio_spec::blackbox::Job, done: usize, total: usize, skipped: bool) {
        if !self.quiet {
            eprintln!(
                "[{}/{total}] {} eps {}{}",
                done + 1,
                job.version.name,
                job.eps,
                if skipped {
                    ": done before, skipped"
                } else {
                    ""
                }
            );
        }
    }
    fn finished(&mut self, _job: &eio_spec::blackbox::Job, seconds: f64) {
        if !self.quiet {
            eprintln!("    {seconds:.1} s");
        }
    }
}

fn generate_cmd(a: GenerateArgs, interrupt: &AtomicBool) -> Result<bool> {
    let (device, dtype) = engine(&a.common)?;
    let named: Vec<(String, PathBuf)> = if let Some(dir) = &a.surrogates {
        match &a.config.config {
            // The surrogates the config names, in its order.
            Some(path) => {
                experiment::surrogate_configs(&Config::load(path)?.with_overrides(&a.config.set)?)
                    .into_iter()
                    .map(|(name, _)| {
                        let file = dir.join(&name).join("model.safetensors");
                        (name, file)
                    })
                    .collect()
            }
            // Every trained baseline<size> of the folder, smallest first.
            None => {
                let mut found: Vec<(usize, String, PathBuf)> = std::fs::read_dir(dir)
                    .with_context(|| format!("--surrogates {}", dir.display()))?
                    .filter_map(|entry| {
                        let name = entry.ok()?.file_name().to_string_lossy().into_owned();
                        let size = name.strip_prefix("baseline")?.parse().ok()?;
                        let file = dir.join(&name).join("model.safetensors");
                        file.exists().then_some((size, name, file))
                    })
                    .collect();
                found.sort();
                if found.is_empty() {
                    bail!(
                        "--surrogates {}: no baseline<size>/model.safetensors inside (train them with `eio blackbox surrogates`)",
                        dir.display()
                    );
                }
                found
                    .into_iter()
                    .map(|(_, name, file)| (name, file))
                    .collect()
            }
        }
    } else {
        a.surrogate
            .iter()
            .map(|s| {
                s.split_once('=')
                    .map(|(n, f)| (n.to_string(), PathBuf::from(f)))
                    .with_context(|| format!("--surrogate {s:?}: expected NAME=MODEL"))
            })
            .collect::<Result<_>>()?
    };
    let surrogates = named
        .iter()
        .map(|(name, file)| eio_accelerated::blackbox::Surrogate::load(name, file, &device, dtype))
        .collect::<Result<Vec<_>, _>>()?;
    let config = match &a.config.config {
        Some(path) => Config::load(path)?,
        None => surrogates[0].checkpoint.meta.config.clone(),
    }
    .with_overrides(&a.config.set)?;
    let shard = match &a.shard {
        Some(text) => eio_spec::blackbox::Shard::parse(text)?,
        None => eio_spec::blackbox::Shard::from_slurm(|k| std::env::var(k).ok())?
            .unwrap_or(eio_spec::blackbox::Shard::ALL),
    };
    let data = load_data(&config, a.common.quiet)?;
    let images = experiment::suite_images(&config, &data);
    let started = Instant::now();
    let summary = eio_accelerated::blackbox::generate(
        &a.out,
        &config,
        &surrogates,
        &images,
        shard,
        &device,
        dtype,
        &mut GenerateDisplay {
            quiet: a.common.quiet,
        },
        interrupt,
    )?;
    let seconds: f64 = summary.generated.iter().map(|(_, s)| s).sum();
    eprintln!(
        "shard {shard}: {} jobs, {} done before, {} generated in {:.1} s ({:.1} s per job){}",
        summary.jobs,
        summary.skipped,
        summary.generated.len(),
        started.elapsed().as_secs_f64(),
        seconds / summary.generated.len().max(1) as f64,
        if summary.interrupted {
            "; interrupted"
        } else {
            ""
        }
    );
    Ok(!summary.interrupted)
}

/// Prints the report of `eio_accelerated::verify`; exits 1 when anything is corrupt.
fn verify_cmd(a: VerifyArgs) -> Result<std::process::ExitCode> {
    let report = eio_accelerated::verify::verify(&a.path)?;
    print!("{}", report.render());
    Ok(if report.has_corrupt() {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

fn status_cmd(a: StatusArgs) -> Result<bool> {
    let suite = eio_accelerated::blackbox::Suite::open(&a.suite)?;
    let status = suite.status();
    println!(
        "{}: {} surrogates, {} versions, {} eps, {} images; {} of {} jobs done",
        a.suite.display(),
        suite.manifest.surrogates.len(),
        suite.version_names().len(),
        suite.manifest.config.eps.len(),
        suite.clean.len(),
        status.jobs - status.missing.len(),
        status.jobs
    );
    for m in &status.missing {
        println!("missing: {m}");
    }
    Ok(status.missing.is_empty())
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
        "{}",
        EvalReport::table1(
            &report.reports,
            config.run.table_black_eps,
            config.run.table_white_eps
        )
    );
    print_flags(&report.sanity);
    println!(
        "wall time {:.1} s; report: {}",
        started.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(true)
}

fn sweep_cmd(a: SweepArgs, interrupt: &AtomicBool) -> Result<bool> {
    let source = Source::open(&a.figure)?;
    let sweep = Sweep::new(&source, &a.scale, &a.set)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = FsPath::new(&a.figure)
            .file_stem()
            .map_or(a.figure.clone(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("runs").join(format!("{stem}-{}", a.scale))
    });
    let shard = match (a.task, a.tasks) {
        (Some(index), Some(count)) => Shard::parse(&format!("{index}/{count}"))?,
        _ => Shard::from_slurm(|name| std::env::var(name).ok())?.unwrap_or(Shard::ALL),
    };
    let runs = &sweep.record.figure.runs;
    let indices = shard.indices(runs.len());
    if a.list {
        println!(
            "{} at scale {}: {} runs; task {shard} runs {} of them\n",
            source.origin,
            a.scale,
            runs.len(),
            indices.len()
        );
        println!(
            "| # | id | label | method | task | status | stages |\n|---|---|---|---|---|---|---|"
        );
        for (i, run) in runs.iter().enumerate() {
            let stages: Vec<&str> = sweep.stages(i).iter().map(|s| s.name.as_str()).collect();
            println!(
                "| {i} | {} | {} | {:?} | {} | {:?} | {} |",
                run.id,
                run.label,
                run.method,
                i % shard.count,
                sweep.status(&out, i),
                stages.join(", ")
            );
        }
        if let Some(suite) = sweep.suite_stage() {
            println!("\nEvery run is judged on the black-box suite of stage {suite}.");
        }
        return Ok(true);
    }
    let (device, dtype) = engine(&a.common)?;
    let mut display = Display::new(a.common.quiet);
    let base = sweep.record.base.clone();
    let quiet = a.common.quiet;
    let started = Instant::now();
    let summary = sweep::run_shard(
        &sweep,
        &out,
        &indices,
        &mut || {
            load_data(&base, quiet)
                .map_err(|e| experiment::ExperimentError::Usage(format!("{e:#}")))
        },
        &device,
        dtype,
        &mut display,
        interrupt,
    )?;
    for (id, seconds) in &summary.finished {
        println!("finished {id} in {seconds:.1} s");
    }
    if !summary.skipped.is_empty() {
        println!("already finished: {}", summary.skipped.join(", "));
    }
    if !summary.busy.is_empty() {
        println!(
            "run by another process (not waited for): {}",
            summary.busy.join(", ")
        );
    }
    println!(
        "task {shard}: wall time {:.1} s; draw with: eio plot {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(!summary.interrupted)
}

fn plot_cmd(a: PlotArgs) -> Result<bool> {
    let sweep = Sweep::open(&a.dir)?;
    let results = sweep::results(&sweep, &a.dir)?;
    let out = a.out.unwrap_or_else(|| a.dir.clone());
    let summary = eio_accelerated::plot::plot(&sweep, &results, &out)?;
    println!(
        "{} of {} runs drawn into {}: {}",
        results.iter().flatten().count(),
        results.len(),
        out.display(),
        summary.files.join(", ")
    );
    if !summary.missing.is_empty() {
        println!("missing (not finished): {}", summary.missing.join(", "));
    }
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
    // The command's settings, then `extra` (the ensemble's), then the user's --set.
    let configure = |extra: &[String]| -> Result<Config> {
        let mut set = vec![
            "model.arch=\"resnet\"".to_string(),
            format!("model.depth={depth}"),
            format!("model.sharing=\"{}\"", a.sharing),
        ];
        set.extend(extra.iter().cloned());
        set.extend(a.set.iter().cloned());
        Ok(base.clone().with_overrides(&set)?)
    };
    let file = a.file.display().to_string();
    let mut models =
        eio_interop::read_models_file(&a.file).with_context(|| format!("importing {file}"))?;
    // Where each model sits: `model_<i>` in an ensemble file.
    let keys: Vec<String> = models
        .iter()
        .map(|d| d.nesting.clone().unwrap_or_else(|| "the top level".into()))
        .collect();
    let (config, chosen, member) = match a.member {
        None if models.len() == 1 => (configure(&[])?, models, None),
        None => {
            let n = models.len();
            let mut extra = vec!["model.n=1".to_string(), format!("train.ensemble_size={n}")];
            if !base.train.method.is_ensemble() {
                extra.push("train.method=\"baseline\"".to_string());
            }
            let config = configure(&extra).with_context(|| {
                format!(
                    "{file} holds an ensemble of {n} models ({}), imported with model.n = 1 and train.ensemble_size = {n}",
                    keys.join(", ")
                )
            })?;
            if config.train.ensemble_size != n {
                bail!(
                    "{file} holds an ensemble of {n} models ({}), but the config says train.ensemble_size = {}",
                    keys.join(", "),
                    config.train.ensemble_size
                );
            }
            (config, models, None)
        }
        Some(i) => {
            if i >= models.len() {
                bail!(
                    "--member {i}: {file} holds {} model{} ({})",
                    models.len(),
                    if models.len() == 1 { "" } else { "s" },
                    keys.join(", ")
                );
            }
            (configure(&[])?, vec![models.swap_remove(i)], Some(&keys[i]))
        }
    };
    let (checkpoint, summary) = eio_accelerated::pytorch::import_models(
        &chosen,
        &config,
        a.normalizer_from_file,
        &device,
        dtype,
    )
    .with_context(|| format!("importing {file}"))?;
    let count = checkpoint.members.len();
    checkpoint.save(&a.out)?;
    let (layout, tensors, ignored) = (summary.layout, summary.tensors, summary.ignored);
    let details = format!(
        "{layout} layout, {tensors} tensors{}{}{}",
        if count > 1 { " each" } else { "" },
        if ignored.is_empty() {
            String::new()
        } else {
            format!(", skipped {}", ignored.join(" "))
        },
        if a.normalizer_from_file {
            ", normaliser from the file"
        } else {
            ""
        }
    );
    match member {
        Some(key) => eprintln!(
            "imported {key} of {file} ({details}) -> {}",
            a.out.display()
        ),
        None if count == 1 => eprintln!("imported {file} ({details}) -> {}", a.out.display()),
        None => eprintln!(
            "imported {file}: {count} members ({}; {details}) -> {}",
            keys.join(", "),
            a.out.display()
        ),
    }
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

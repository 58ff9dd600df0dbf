//! The stages of an experiment as the `eio` command runs them: train into a run folder (with
//! resume), derive and fine-tune a path, evaluate by the all-or-nothing protocol, and the whole
//! pipeline of `eio run` with its report.
//!
//! # A run folder
//! * `config.toml`: the resolved config of the run;
//! * `checkpoint.safetensors`: the resumable training state (written every epoch and when
//!   interrupted; see [`crate::checkpoint`]);
//! * `model.safetensors`: the finished model (no optimiser state);
//! * `metrics.jsonl`: one [`EpochRecord`] per line;
//! * `folded.safetensors` (derive with `fold_bn`): the deployment network, see
//!   [`FoldedNetwork`];
//! * `eval.json` / `eval.csv` (evaluate): [`EvalReport`].

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use eio_data::{DataSplits, Images};
use eio_spec::config::{BnMode, Config, EvalConfig, Method};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::Path;
use serde::Serialize;

use crate::attack::{Member, Target};
use crate::checkpoint::{write_atomically, Checkpoint, CheckpointError, ModelKind, Phase};
use crate::derive::{derive_path, FoldedNetwork};
use crate::evaluate::{evaluate_images, WhiteBoxReport};
use crate::train::{self, EpochRecord, Flow, Observer, Outcome, TrainError};
use crate::EngineError;

/// Errors of a stage, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error(transparent)]
    Train(Box<TrainError>),
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

impl From<TrainError> for ExperimentError {
    fn from(e: TrainError) -> Self {
        ExperimentError::Train(Box::new(e))
    }
}

impl From<CheckpointError> for ExperimentError {
    fn from(e: CheckpointError) -> Self {
        ExperimentError::Checkpoint(Box::new(e))
    }
}

/// The files of one run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RunDir { root: root.into() }
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint.safetensors")
    }
    pub fn model(&self) -> PathBuf {
        self.root.join("model.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn folded(&self) -> PathBuf {
        self.root.join("folded.safetensors")
    }

    fn write_err(path: &FsPath) -> impl FnOnce(std::io::Error) -> ExperimentError + '_ {
        move |source| ExperimentError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Writes the resolved config as TOML.
    ///
    /// # Errors
    /// [`ExperimentError::Write`] naming the file.
    pub fn write_config(&self, config: &Config) -> Result<(), ExperimentError> {
        let path = self.config();
        let text = toml::to_string(config)
            .map_err(|e| ExperimentError::Usage(format!("cannot serialise the config: {e}")))?;
        write_atomically(&path, text.as_bytes()).map_err(Self::write_err(&path))
    }

    /// Appends one JSON line to `metrics.jsonl`.
    ///
    /// # Errors
    /// [`ExperimentError::Write`] naming the file.
    pub fn append_metrics(&self, record: &EpochRecord) -> Result<(), ExperimentError> {
        let path = self.metrics();
        let line = serde_json::to_string(record)
            .map_err(|e| ExperimentError::Usage(format!("cannot serialise metrics: {e}")))?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(Self::write_err(&path))?;
        writeln!(f, "{line}").map_err(Self::write_err(&path))
    }

    /// Drops metric lines of epochs at or after `global_epoch` (they are re-run on resume).
    fn truncate_metrics(&self, global_epoch: usize) -> Result<(), ExperimentError> {
        let path = self.metrics();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|line| {
                serde_json::from_str::<EpochRecord>(line)
                    .map(|r| r.global_epoch < global_epoch)
                    .unwrap_or(false)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomically(&path, kept.as_bytes()).map_err(Self::write_err(&path))
    }
}

/// An observer that appends `metrics.jsonl` and passes events on to another observer (the
/// binary's progress display).
struct Recording<'a> {
    dir: &'a RunDir,
    inner: &'a mut dyn Observer,
}

impl Observer for Recording<'_> {
    fn phase(&mut self, phase: Phase, epoch: usize, epochs: usize, batches: usize) {
        self.inner.phase(phase, epoch, epochs, batches);
    }
    fn batch(&mut self, event: &train::BatchEvent) {
        self.inner.batch(event);
    }
    fn epoch(&mut self, record: &EpochRecord) -> Result<Flow, TrainError> {
        self.dir
            .append_metrics(record)
            .map_err(|e| TrainError::Setup(e.to_string()))?;
        self.inner.epoch(record)
    }
}

/// Trains `checkpoint` in `dir` until done or interrupted; on completion writes
/// `model.safetensors` (the models without optimiser state).
///
/// # Errors
/// Any training, checkpoint or write error.
pub fn train_in(
    dir: &RunDir,
    mut checkpoint: Checkpoint,
    data: &DataSplits,
    device: &Device,
    observer: &mut dyn Observer,
    interrupt: &AtomicBool,
) -> Result<(Outcome, Checkpoint), ExperimentError> {
    fs::create_dir_all(&dir.root).map_err(RunDir::write_err(&dir.root))?;
    dir.write_config(&checkpoint.meta.config)?;
    dir.truncate_metrics(checkpoint.meta.progress.global_epoch)?;
    let mut persist = dir.checkpoint();
    let mut recording = Recording {
        dir,
        inner: observer,
    };
    let outcome = train::train(
        &mut checkpoint,
        data,
        device,
        &mut recording,
        &mut persist,
        interrupt,
    )?;
    if outcome == Outcome::Finished {
        let mut model = checkpoint.clone();
        model.optimisers.clear();
        model.meta.optimiser = false;
        model.save(&dir.model())?;
    }
    Ok((outcome, checkpoint))
}

/// The checkpoint to continue in `dir`: with `resume`, the stored one (its config must equal
/// `config`); without, a fresh one from `fresh`, refusing a folder that already holds a run.
///
/// # Errors
/// A folder holding a run without `resume`, or a mismatching or unreadable checkpoint.
pub fn open_run(
    dir: &RunDir,
    config: &Config,
    resume: bool,
    device: &Device,
    fresh: impl FnOnce() -> Result<Checkpoint, ExperimentError>,
) -> Result<Checkpoint, ExperimentError> {
    let path = dir.checkpoint();
    if path.exists() {
        if !resume {
            return Err(ExperimentError::Usage(format!(
                "{} already holds a run ({}); pass --resume to continue it or choose another --out",
                dir.root.display(),
                path.display()
            )));
        }
        let checkpoint = Checkpoint::load(&path, device, None)?;
        checkpoint.check_config(config, &path)?;
        return Ok(checkpoint);
    }
    fresh()
}

/// The derived single-path networks of `paths` through the RGN in `rgn`, as one checkpoint
/// (members in order) ready to fine-tune for `derive.finetune_epochs` epochs of the derived
/// config, which `adjust` may change (command-line settings) before training starts.
///
/// # Errors
/// A path that does not fit, `adjust`'s error, or a device error.
pub fn derive(
    rgn: &Checkpoint,
    rgn_file: &FsPath,
    paths: &[Path],
    dtype: DType,
    adjust: impl FnOnce(Config) -> Result<Config, ExperimentError>,
) -> Result<Checkpoint, ExperimentError> {
    let config = &rgn.meta.config;
    if rgn.members.len() != 1 {
        return Err(ExperimentError::Usage(format!(
            "{} holds {} models; derive needs one RGN",
            rgn_file.display(),
            rgn.members.len()
        )));
    }
    let mut states = Vec::with_capacity(paths.len());
    let mut derived_config = crate::derive::derived_config(config);
    for path in paths {
        let (c, state) = derive_path(config, &rgn.members[0], path)?;
        derived_config = c;
        states.push(state);
    }
    let derived_config = adjust(derived_config)?;
    let text: Vec<String> = paths.iter().map(ToString::to_string).collect();
    let model = ModelKind::Derived {
        path: text.join(","),
        from: rgn_file.display().to_string(),
    };
    let mut checkpoint = train::start_finetune(&derived_config, model, states.remove(0), dtype);
    for state in states {
        checkpoint.members.push(state);
        checkpoint
            .optimisers
            .push(crate::optim::Sgd::new(crate::checkpoint::sgd_config(
                &derived_config,
                derived_config.derive.lr,
            )));
    }
    checkpoint.meta.members = checkpoint.members.len();
    Ok(checkpoint)
}

/// Folds `checkpoint`'s first model and checks the folded logits against the unfolded
/// eval-mode ones on `images`; returns the network and the largest absolute logit difference.
///
/// # Errors
/// A device error.
pub fn fold(
    checkpoint: &Checkpoint,
    images: &Images,
    device: &Device,
) -> Result<(FoldedNetwork, f64), ExperimentError> {
    let plan = checkpoint
        .plan()
        .map_err(|e| ExperimentError::Usage(e.to_string()))?;
    let state = &checkpoint.members[0];
    let folded = FoldedNetwork::fold(&plan, state)?;
    let n = images.len().min(256);
    let part = images.subset(&(0..n).collect::<Vec<_>>());
    let (x, _) = train::to_tensors(part.pixels, part.labels, images, device, checkpoint.dtype())?;
    let path = Checkpoint::plain_path(&plan);
    let (z, _) = crate::model::logits(&plan, state, &path, &x, BnMode::Eval)?;
    let zf = folded.logits(&x)?;
    let diff = (z - zf)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok((folded, diff))
}

/// A model to evaluate: a loaded checkpoint and how to run it.
pub struct Evaluated {
    /// What the report calls it.
    pub name: String,
    pub checkpoint: Checkpoint,
    /// For an RGN: a fixed path, or `None` with `random_gates`.
    pub path: Option<Path>,
}

/// How models are combined into one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Deployment {
    /// Each model on its path (an RGN needs a path); several models or members form an
    /// ensemble through the mean softmax.
    Fixed,
    /// One RGN with random gates at test time, attacked with EOT over `eot` paths.
    RandomGates { eot: usize },
}

/// Builds the attack target of `models` (their plans are built on demand into `plans`).
///
/// # Errors
/// An RGN without a path under [`Deployment::Fixed`], or random gates on anything but one RGN.
pub fn target<'a>(
    models: &'a [Evaluated],
    plans: &'a [eio_spec::Plan],
    paths: &'a [Path],
    deployment: Deployment,
) -> Result<Target<'a>, ExperimentError> {
    if let Deployment::RandomGates { eot } = deployment {
        return match models {
            [one] if one.checkpoint.members.len() == 1 => Ok(Target::Randomised {
                plan: &plans[0],
                state: &one.checkpoint.members[0],
                eot,
            }),
            _ => Err(ExperimentError::Usage(
                "--random-gates deploys one RGN: give exactly one --model".into(),
            )),
        };
    }
    let mut members = Vec::new();
    for (i, model) in models.iter().enumerate() {
        for state in &model.checkpoint.members {
            members.push(Member {
                plan: &plans[i],
                state,
                path: &paths[i],
            });
        }
    }
    Ok(match members.as_slice() {
        [one] => Target::Path {
            plan: one.plan,
            state: one.state,
            path: one.path,
            mode: BnMode::Eval,
        },
        _ => Target::Ensemble(members),
    })
}

/// The plans and fixed paths of `models` (a plain network's only path; an RGN's `--path`).
///
/// # Errors
/// An RGN with neither a path nor random gates, or a path that does not fit it.
pub fn plans_and_paths(
    models: &[Evaluated],
    random_gates: bool,
) -> Result<(Vec<eio_spec::Plan>, Vec<Path>), ExperimentError> {
    let mut plans = Vec::new();
    let mut paths = Vec::new();
    for m in models {
        let plan = m
            .checkpoint
            .plan()
            .map_err(|e| ExperimentError::Usage(format!("{}: {e}", m.name)))?;
        let path = match &m.path {
            Some(p) => {
                plan.path_space()
                    .check(p)
                    .map_err(|e| ExperimentError::Usage(format!("{}: path {p}: {e}", m.name)))?;
                p.clone()
            }
            None if plan.k() == 0 || m.checkpoint.meta.config.model.n == 1 || random_gates => {
                Checkpoint::plain_path(&plan)
            }
            None => {
                return Err(ExperimentError::Usage(format!(
                "{} is a random gated network (n = {}): choose --path <gates> or --random-gates",
                m.name, m.checkpoint.meta.config.model.n
            )))
            }
        };
        plans.push(plan);
        paths.push(path);
    }
    Ok((plans, paths))
}

/// Clean and adversarial accuracy of one model under one attack setting.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    /// `white-box` or `transfer from <models>`.
    pub attack: String,
    pub images: usize,
    pub config: EvalConfig,
    pub report: WhiteBoxReport,
}

impl EvalReport {
    /// CSV rows `model,attack,eps,images,clean_accuracy,robust_accuracy` (header included
    /// when `header`).
    pub fn csv(reports: &[EvalReport]) -> String {
        let mut out = String::from("model,attack,eps,images,clean_accuracy,robust_accuracy\n");
        for r in reports {
            for e in &r.report.per_eps {
                out.push_str(&format!(
                    "{},{},{},{},{:.4},{:.4}\n",
                    csv_field(&r.model),
                    csv_field(&r.attack),
                    e.eps,
                    r.images,
                    r.report.clean_accuracy,
                    e.robustness.accuracy
                ));
            }
        }
        out
    }

    /// A Markdown table: one row per (model, attack), one column per ε, in percent.
    pub fn table(reports: &[EvalReport]) -> String {
        let mut eps: Vec<f64> = Vec::new();
        for r in reports {
            for e in &r.report.per_eps {
                if !eps.contains(&e.eps) {
                    eps.push(e.eps);
                }
            }
        }
        let mut out = String::from("| model | attack | clean |");
        for e in &eps {
            out.push_str(&format!(" eps {e} |"));
        }
        out.push_str("\n|---|---|---|");
        out.push_str(&"---|".repeat(eps.len()));
        out.push('\n');
        for r in reports {
            out.push_str(&format!(
                "| {} | {} | {:.1} % |",
                r.model,
                r.attack,
                100.0 * r.report.clean_accuracy
            ));
            for e in &eps {
                match r.report.per_eps.iter().find(|x| x.eps == *e) {
                    Some(x) => out.push_str(&format!(" {:.1} % |", 100.0 * x.robustness.accuracy)),
                    None => out.push_str(" - |"),
                }
            }
            out.push('\n');
        }
        out
    }

    /// Writes `eval.json` and `eval.csv` into `dir`.
    ///
    /// # Errors
    /// [`ExperimentError::Write`] naming the file.
    pub fn write(reports: &[EvalReport], dir: &FsPath) -> Result<(), ExperimentError> {
        fs::create_dir_all(dir).map_err(RunDir::write_err(dir))?;
        let json = dir.join("eval.json");
        let text = serde_json::to_string_pretty(reports)
            .map_err(|e| ExperimentError::Usage(format!("cannot serialise the report: {e}")))?;
        write_atomically(&json, text.as_bytes()).map_err(RunDir::write_err(&json))?;
        let csv = dir.join("eval.csv");
        write_atomically(&csv, Self::csv(reports).as_bytes()).map_err(RunDir::write_err(&csv))
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The evaluation images of `config`: the fixed seeded subset of `eval.images` test images.
pub fn eval_images(config: &Config, data: &DataSplits) -> Images {
    eio_data::eval_subset(&data.test, config.eval.images, &Seeds::new(config.seed))
}

/// White-box evaluation of `target` and, when `source` is given, transfer from it.
///
/// # Errors
/// A device or verdict error.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    name: &str,
    target: &Target<'_>,
    source: Option<(&str, &Target<'_>)>,
    images: &Images,
    config: &EvalConfig,
    seed: u64,
    device: &Device,
    dtype: DType,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<EvalReport>, ExperimentError> {
    let seeds = Seeds::new(seed);
    let mut out = Vec::new();
    let report = evaluate_images(
        target,
        target,
        images,
        config,
        &seeds,
        device,
        dtype,
        &mut |b, n| progress("white-box", b, n),
    )?;
    out.push(EvalReport {
        model: name.to_string(),
        attack: "white-box PGD".into(),
        images: images.len(),
        config: config.clone(),
        report,
    });
    if let Some((source_name, source)) = source {
        let report = evaluate_images(
            source,
            target,
            images,
            config,
            &seeds,
            device,
            dtype,
            &mut |b, n| progress("transfer", b, n),
        )?;
        out.push(EvalReport {
            model: name.to_string(),
            attack: format!("transfer PGD from {source_name}"),
            images: images.len(),
            config: config.clone(),
            report,
        });
    }
    Ok(out)
}

/// The config of the baseline that `eio run` trains beside an EIO config: plain networks
/// (`model.n = 1`), `train.method = baseline`, two members (member 0 is the reported baseline,
/// member 1 the independently initialised surrogate that transfer attacks are made on), and
/// as many epochs as EIO's pre-training plus main epochs.
pub fn baseline_config(config: &Config) -> Config {
    let mut b = config.clone();
    b.model.n = 1;
    b.train.method = Method::Baseline;
    b.train.ensemble_size = 2;
    b.train.epochs = config.train.epochs + config.eio.pretrain_epochs;
    b
}

/// The path `eio run` derives: drawn uniformly (Eq. 1) from the `Gates` stream at index
/// [`DERIVE_GATES`].
pub fn derive_path_draw(config: &Config) -> Result<Path, ExperimentError> {
    let plan = config
        .plan()
        .map_err(|e| ExperimentError::Usage(e.to_string()))?;
    Ok(plan
        .path_space()
        .sample(&mut Seeds::new(config.seed).stream(Stream::Gates, DERIVE_GATES)))
}

/// `Gates` stream index of the path `eio run` derives.
pub const DERIVE_GATES: u64 = (1 << 62) - 1;

/// Splits a checkpoint of M members into M single-member checkpoints.
pub fn split_members(checkpoint: &Checkpoint) -> Vec<Checkpoint> {
    checkpoint
        .members
        .iter()
        .map(|state| {
            let mut one = checkpoint.clone();
            one.members = vec![state.clone()];
            one.optimisers.clear();
            one.meta.members = 1;
            one.meta.optimiser = false;
            one
        })
        .collect()
}

/// What `eio run` produced.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// The derived path (gate vector, text form).
    pub derived_path: String,
    pub reports: Vec<EvalReport>,
}

/// Hooks of [`run_pipeline`] for the binary's display.
pub trait PipelineDisplay {
    /// A stage starts (`baseline`, `eio`, `derive`, `evaluate`).
    fn stage(&mut self, name: &str, detail: &str);
    /// The training observer for the stage just announced.
    fn observer(&mut self) -> &mut dyn Observer;
    /// Evaluation progress: `batch` of `batches` of the named attack.
    fn eval_progress(&mut self, attack: &str, batch: usize, batches: usize);
}

/// `eio run`: trains the baseline pair ([`baseline_config`]) and the EIO network of `config`,
/// derives the path [`derive_path_draw`] and fine-tunes it, then evaluates the baseline and
/// the derived model white-box and by transfer from the surrogate, writing `report.md`,
/// `eval.json` and `eval.csv` into `out`. Each stage lives in its own run folder
/// (`baseline/`, `eio/`, `derived/`); with `resume` finished stages are reused and an
/// interrupted one continues. Returns `None` when interrupted.
///
/// # Errors
/// Any stage's error.
#[allow(clippy::too_many_arguments)]
pub fn run_pipeline(
    config: &Config,
    data: &DataSplits,
    out: &FsPath,
    device: &Device,
    dtype: DType,
    resume: bool,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<Option<PipelineReport>, ExperimentError> {
    if !resume && out.join("config.toml").exists() {
        return Err(ExperimentError::Usage(format!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            out.display()
        )));
    }
    fs::create_dir_all(out).map_err(RunDir::write_err(out))?;
    RunDir::new(out).write_config(config)?;
    let mut eio_config = config.clone();
    eio_config.train.method = Method::Eio;
    let stages = [
        ("baseline", baseline_config(config)),
        ("eio", eio_config.clone()),
    ];
    let mut trained = Vec::new();
    for (name, stage_config) in &stages {
        let dir = RunDir::new(out.join(name));
        display.stage(
            name,
            &format!(
                "train.method = {:?} -> {}",
                stage_config.train.method,
                dir.root.display()
            ),
        );
        let Some(model) = finished_or_train(
            &dir,
            stage_config,
            data,
            device,
            dtype,
            display,
            interrupt,
            || train::start(stage_config, device, dtype).map_err(ExperimentError::from),
        )?
        else {
            return Ok(None);
        };
        trained.push(model);
    }
    let path = derive_path_draw(&eio_config)?;
    let dir = RunDir::new(out.join("derived"));
    display.stage("derive", &format!("path {path} -> {}", dir.root.display()));
    let rgn_file = out.join("eio").join("model.safetensors");
    let derived_config = crate::derive::derived_config(&eio_config);
    let Some(derived) = finished_or_train(
        &dir,
        &derived_config,
        data,
        device,
        dtype,
        display,
        interrupt,
        || {
            derive(
                &trained[1],
                &rgn_file,
                std::slice::from_ref(&path),
                dtype,
                Ok,
            )
        },
    )?
    else {
        return Ok(None);
    };
    if config.derive.fold_bn {
        let (folded, diff) = fold(&derived, &data.test, device)?;
        folded.save(&dir.folded())?;
        display.stage(
            "fold",
            &format!("folded conv+BN pairs; largest logit difference vs unfolded {diff:.2e}"),
        );
    }
    display.stage("evaluate", "white-box and transfer, all-or-nothing");
    let mut pair = split_members(&trained[0]).into_iter();
    let (Some(baseline), Some(surrogate)) = (pair.next(), pair.next()) else {
        return Err(ExperimentError::Usage(
            "the baseline run holds fewer than 2 models".into(),
        ));
    };
    let images = eval_images(config, data);
    let models = [
        Evaluated {
            name: "baseline".into(),
            checkpoint: baseline,
            path: None,
        },
        Evaluated {
            name: format!("EIO-derived ({path})"),
            checkpoint: derived,
            path: None,
        },
        Evaluated {
            name: "surrogate".into(),
            checkpoint: surrogate,
            path: None,
        },
    ];
    let (plans, paths) = plans_and_paths(&models, false)?;
    let surrogate_target = target(&models[2..], &plans[2..], &paths[2..], Deployment::Fixed)?;
    let mut reports = Vec::new();
    for i in 0..2 {
        let t = target(
            &models[i..=i],
            &plans[i..=i],
            &paths[i..=i],
            Deployment::Fixed,
        )?;
        reports.extend(evaluate(
            &models[i].name,
            &t,
            Some(("surrogate", &surrogate_target)),
            &images,
            &config.eval,
            config.seed,
            device,
            dtype,
            &mut |a, b, n| display.eval_progress(a, b, n),
        )?);
    }
    EvalReport::write(&reports, out)?;
    let report = PipelineReport {
        derived_path: path.to_string(),
        reports,
    };
    let md = out.join("report.md");
    write_atomically(&md, markdown(config, &report, images.len()).as_bytes())
        .map_err(RunDir::write_err(&md))?;
    Ok(Some(report))
}

/// The stage's finished model, or train it (fresh from `fresh`, or resumed) and return it;
/// `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn finished_or_train(
    dir: &RunDir,
    config: &Config,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
    fresh: impl FnOnce() -> Result<Checkpoint, ExperimentError>,
) -> Result<Option<Checkpoint>, ExperimentError> {
    if dir.model().exists() {
        let model = Checkpoint::load(&dir.model(), device, Some(dtype))?;
        model.check_config(config, &dir.model())?;
        return Ok(Some(model));
    }
    let checkpoint = open_run(dir, config, true, device, fresh)?;
    match train_in(dir, checkpoint, data, device, display.observer(), interrupt)? {
        (Outcome::Finished, _) => Ok(Some(Checkpoint::load(&dir.model(), device, Some(dtype))?)),
        (Outcome::Interrupted, _) => Ok(None),
    }
}

fn markdown(config: &Config, report: &PipelineReport, images: usize) -> String {
    let eval = &config.eval;
    let losses: Vec<String> = eval
        .losses
        .iter()
        .map(|l| format!("{l:?}").to_lowercase())
        .collect();
    format!(
        "# eio run report\n\n\
         Dataset `{:?}`, model {} width {} (EIO: n = {}, p = {}), seed {}.\n\
         EIO-derived path: `{}`.\n\n\
         All-or-nothing accuracy on {images} test images (a fixed seeded subset): PGD, {} steps, \
         step eps·{}, {} restart(s), loss {}; an image counts as robust only if every version \
         fails. Transfer examples are made on the independently trained surrogate baseline.\n\n{}",
        config.data.dataset,
        config.model.name(),
        config.model.width,
        config.model.n,
        config.eio.p,
        config.seed,
        report.derived_path,
        eval.steps,
        eval.step_fraction,
        eval.restarts,
        losses.join(" and "),
        EvalReport::table(&report.reports)
    )
}

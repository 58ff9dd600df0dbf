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
//!
//! # What survives which fault
//! Every file is written by [`crate::safe_write::write_atomically`] (temporary file, fsync,
//! rename, folder fsync), so a kill at any instant leaves each file old or new, never torn, and
//! a failed write (disk full, read-only folder) leaves the old version and no temporary file,
//! with an error naming the file and the OS reason. `metrics.jsonl` is appended by rewriting it
//! atomically; an epoch's record is written *before* its checkpoint and kept in it
//! ([`crate::checkpoint::CheckpointMeta::last_record`]), and [`train_in`] first removes stale
//! temporary files and repairs the file ([`RunDir::repair_metrics`]: a torn last line cut, records
//! of epochs past the checkpoint dropped, the checkpoint's last record restored), so a resumed
//! run has exactly one record per epoch and, on the CPU, bit-identical weights. Safetensors
//! files carry a checksum ([`crate::integrity`]) verified on load; [`crate::verify`] checks a
//! whole folder tree.

use std::fs;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device};
use eio_data::{DataSplits, Images};
use eio_spec::config::{BnMode, Config, EvalConfig, Method};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::Path;
use serde::Serialize;

use crate::attack::{Member, Target};
use crate::checkpoint::{Checkpoint, CheckpointError, ModelKind, Phase};
use crate::derive::{derive_path, FoldedNetwork};
use crate::evaluate::{evaluate_images, WhiteBoxReport};
use crate::safe_write::{append_atomically, remove_stale_temporaries, write_atomically};
use crate::train::{self, EpochRecord, Flow, Observer, Outcome, TrainError};
use crate::EngineError;
use eio_spec::sanity::Flag;

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
    #[error(transparent)]
    Blackbox(#[from] crate::blackbox::BlackboxError),
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

    pub(crate) fn write_err(path: &FsPath) -> impl FnOnce(std::io::Error) -> ExperimentError + '_ {
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

    /// Appends one JSON line to `metrics.jsonl`, atomically
    /// ([`crate::safe_write::append_atomically`]: the file is rewritten whole, so a kill never
    /// leaves a torn line).
    ///
    /// # Errors
    /// [`ExperimentError::Write`] naming the file.
    pub fn append_metrics(&self, record: &EpochRecord) -> Result<(), ExperimentError> {
        let path = self.metrics();
        let line = serde_json::to_string(record)
            .map_err(|e| ExperimentError::Usage(format!("cannot serialise metrics: {e}")))?;
        append_atomically(&path, format!("{line}\n").as_bytes()).map_err(Self::write_err(&path))
    }

    /// Makes `metrics.jsonl` agree with a checkpoint at `global_epoch` before training
    /// continues: a torn last line (a kill mid-append by an older eio, a half-copied file) is
    /// cut off, records of epochs at or after `global_epoch` (re-run from the checkpoint) are
    /// dropped, as are repeated records of one epoch, and the checkpoint's `last` record (of
    /// epoch `global_epoch - 1`) is restored when the file lacks it; the file is rewritten
    /// atomically when anything changed. Returns what was repaired, one sentence each.
    ///
    /// # Errors
    /// An unreadable file, or (resuming past epoch 0) a line before the last that is not a
    /// metrics record (damage that no re-run can restore: the error names the file and line),
    /// or a write error.
    pub fn repair_metrics(
        &self,
        global_epoch: usize,
        last: Option<&str>,
    ) -> Result<Vec<String>, ExperimentError> {
        let path = self.metrics();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(ExperimentError::Write { path, source }),
        };
        let check = check_metrics(&bytes);
        // At epoch 0 (a fresh start) nothing is kept, so damage costs nothing.
        if let Some((line, message)) = check.corrupt.first().filter(|_| global_epoch > 0) {
            return Err(ExperimentError::Usage(format!(
                "{}: line {line} is not a metrics record ({message}); the file was damaged after writing: fix or delete that line, then resume",
                path.display()
            )));
        }
        let mut notes = Vec::new();
        if !check.corrupt.is_empty() {
            notes.push(format!(
                "{}: discarded {} unreadable line(s) (the run starts afresh)",
                path.display(),
                check.corrupt.len()
            ));
        }
        if let Some(torn) = check.torn {
            notes.push(format!(
                "{}: removed a torn last line ({torn} bytes, cut off mid-write)",
                path.display()
            ));
        }
        let mut kept = String::new();
        let (mut later, mut repeated) = (0, 0);
        let mut seen = std::collections::BTreeSet::new();
        for (text, record) in &check.records {
            if record.global_epoch >= global_epoch {
                later += 1;
            } else if !seen.insert(record.global_epoch) {
                repeated += 1;
            } else {
                kept.push_str(text);
                kept.push('\n');
            }
        }
        let last = last.and_then(|line| {
            serde_json::from_str::<EpochRecord>(line)
                .ok()
                .map(|r| (line, r))
        });
        if let Some((line, r)) = last.filter(|(_, r)| r.global_epoch + 1 == global_epoch) {
            if !seen.contains(&r.global_epoch) {
                kept.push_str(line);
                kept.push('\n');
                notes.push(format!(
                    "{}: restored the record of epoch {} from the checkpoint",
                    path.display(),
                    r.global_epoch
                ));
            }
        }
        if later > 0 {
            notes.push(format!(
                "{}: dropped {later} record(s) of epochs the checkpoint has not reached (they are re-run)",
                path.display()
            ));
        }
        if repeated > 0 {
            notes.push(format!(
                "{}: dropped {repeated} repeated record(s) of one epoch",
                path.display()
            ));
        }
        if kept.as_bytes() != bytes.as_slice() {
            write_atomically(&path, kept.as_bytes()).map_err(Self::write_err(&path))?;
        }
        Ok(notes)
    }
}

/// What [`check_metrics`] found in the bytes of a `metrics.jsonl`.
#[derive(Debug, Default)]
pub struct MetricsCheck {
    /// Every complete record: its line (without the newline) and its value.
    pub records: Vec<(String, EpochRecord)>,
    /// Lines (1-based) ended by a newline that are not records, with the parse error.
    pub corrupt: Vec<(usize, String)>,
    /// The byte length of an unterminated last line that is not a record (torn), if any.
    pub torn: Option<usize>,
}

/// Parses `metrics.jsonl` bytes line by line (blank lines are ignored; an unterminated last
/// line that parses is a record).
pub fn check_metrics(bytes: &[u8]) -> MetricsCheck {
    let mut out = MetricsCheck::default();
    let terminated = bytes.ends_with(b"\n");
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if terminated {
        lines.pop();
    }
    let last = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = std::str::from_utf8(line)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                serde_json::from_str::<EpochRecord>(t)
                    .map(|r| (t.to_string(), r))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(record) => out.records.push(record),
            Err(_) if i + 1 == last && !terminated => out.torn = Some(line.len()),
            Err(e) => out.corrupt.push((i + 1, e)),
        }
    }
    out
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
            .map_err(|e| TrainError::Setup(crate::error_chain(&e)))?;
        self.inner.epoch(record)
    }
    fn note(&mut self, message: &str) {
        self.inner.note(message);
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
    let stale = remove_stale_temporaries(&dir.root).map_err(RunDir::write_err(&dir.root))?;
    if stale > 0 {
        observer.note(&format!(
            "{}: removed {stale} temporary file(s) left by a killed or failed write",
            dir.root.display()
        ));
    }
    dir.write_config(&checkpoint.meta.config)?;
    let last = checkpoint.meta.last_record.as_deref();
    for note in dir.repair_metrics(checkpoint.meta.progress.global_epoch, last)? {
        observer.note(&note);
    }
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
            .push(crate::checkpoint::phase_optimiser(
                &derived_config,
                crate::checkpoint::Phase::Finetune,
                derived_config.derive.lr,
            ));
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
    let (x, _) = train::range_tensors(images, 0..n, device, checkpoint.dtype())?;
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
    Ok(Target::of_members(members))
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

/// What an [`EvalReport`] measured.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Protocol {
    /// Clean accuracy only.
    Clean,
    /// PGD versions (white-box, or transfer from other models) with these settings.
    Pgd(EvalConfig),
    /// The black-box transfer suite in `folder` ([`crate::blackbox`]).
    Suite {
        folder: String,
        versions: usize,
        surrogates: Vec<crate::blackbox::SurrogateRecord>,
        config: eio_spec::config::BlackboxConfig,
    },
}

/// Clean and adversarial accuracy of one model under one protocol.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    /// `clean`, `white-box PGD`, `transfer PGD from <models>` or `black-box suite (<n> versions)`.
    pub attack: String,
    pub images: usize,
    pub protocol: Protocol,
    pub report: WhiteBoxReport,
}

/// `eval.json`: every report and the sanity checks over them.
#[derive(Debug, Clone, Serialize)]
pub struct EvalFile<'a> {
    pub reports: &'a [EvalReport],
    pub sanity: &'a [Flag],
}

impl EvalReport {
    /// CSV rows `model,attack,eps,images,clean_accuracy,robust_accuracy` (a clean-only report
    /// has one row with an empty eps and robust accuracy).
    pub fn csv(reports: &[EvalReport]) -> String {
        let mut out = String::from("model,attack,eps,images,clean_accuracy,robust_accuracy\n");
        for r in reports {
            if r.report.per_eps.is_empty() {
                out.push_str(&format!(
                    "{},{},,{},{:.4},\n",
                    csv_field(&r.model),
                    csv_field(&r.attack),
                    r.images,
                    r.report.clean_accuracy
                ));
            }
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
        eps.sort_by(f64::total_cmp);
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

    /// The paper's Table 1 shape: per model, clean accuracy, black-box suite accuracy at
    /// `black_eps` and white-box accuracy at `white_eps` (the paper: 0.03 and 0.01), in percent;
    /// `-` where that measurement is absent.
    pub fn table1(reports: &[EvalReport], black_eps: f64, white_eps: f64) -> String {
        let mut models: Vec<&str> = Vec::new();
        for r in reports {
            if !models.contains(&r.model.as_str()) {
                models.push(&r.model);
            }
        }
        let at = |model: &str, suite: bool, eps: f64| -> String {
            reports
                .iter()
                .filter(|r| r.model == model)
                .filter(|r| match r.protocol {
                    Protocol::Suite { .. } => suite,
                    Protocol::Pgd(_) => !suite && r.attack == WHITE_BOX,
                    Protocol::Clean => false,
                })
                .find_map(|r| {
                    r.report
                        .per_eps
                        .iter()
                        .find(|e| (e.eps - eps).abs() < 1e-12)
                })
                .map_or("-".into(), |e| {
                    format!("{:.1}", 100.0 * e.robustness.accuracy)
                })
        };
        let mut out = format!(
            "| model | clean (%) | black-box eps {black_eps} (%) | white-box eps {white_eps} (%) |\n|---|---|---|---|\n"
        );
        for m in models {
            let clean = reports
                .iter()
                .find(|r| r.model == m)
                .map_or("-".into(), |r| {
                    format!("{:.1}", 100.0 * r.report.clean_accuracy)
                });
            out.push_str(&format!(
                "| {m} | {clean} | {} | {} |\n",
                at(m, true, black_eps),
                at(m, false, white_eps)
            ));
        }
        out
    }

    /// Writes `eval.json` (reports and sanity flags) and `eval.csv` into `dir`.
    ///
    /// # Errors
    /// [`ExperimentError::Write`] naming the file.
    pub fn write(
        reports: &[EvalReport],
        sanity: &[Flag],
        dir: &FsPath,
    ) -> Result<(), ExperimentError> {
        fs::create_dir_all(dir).map_err(RunDir::write_err(dir))?;
        let json = dir.join("eval.json");
        let text = serde_json::to_string_pretty(&EvalFile { reports, sanity })
            .map_err(|e| ExperimentError::Usage(format!("cannot serialise the report: {e}")))?;
        write_atomically(&json, text.as_bytes()).map_err(RunDir::write_err(&json))?;
        let csv = dir.join("eval.csv");
        write_atomically(&csv, Self::csv(reports).as_bytes()).map_err(RunDir::write_err(&csv))
    }
}

/// The attack name of a white-box report.
pub const WHITE_BOX: &str = "white-box PGD";

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
        attack: WHITE_BOX.into(),
        images: images.len(),
        protocol: Protocol::Pgd(config.clone()),
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
            protocol: Protocol::Pgd(config.clone()),
            report,
        });
    }
    Ok(out)
}

/// Clean accuracy of `target` on `images` in batches of `batch_size` (a randomised target draws
/// its paths from `Gates` split `u64::MAX`, as the white-box clean pass).
///
/// # Errors
/// A device error.
pub fn clean_report(
    name: &str,
    target: &Target<'_>,
    images: &Images,
    batch_size: usize,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<EvalReport, ExperimentError> {
    let mut rng = Seeds::new(seed).stream(Stream::Gates, u64::MAX);
    let clean_accuracy = train::accuracy(target, images, batch_size, device, dtype, &mut rng)?;
    Ok(EvalReport {
        model: name.to_string(),
        attack: "clean".into(),
        images: images.len(),
        protocol: Protocol::Clean,
        report: WhiteBoxReport {
            clean_accuracy,
            per_eps: Vec::new(),
        },
    })
}

/// `target` scored on the black-box suite `suite` ([`crate::blackbox::Suite::score`]).
///
/// # Errors
/// An incomplete or damaged suite, or a device error.
#[allow(clippy::too_many_arguments)]
pub fn suite_report(
    name: &str,
    target: &Target<'_>,
    suite: &crate::blackbox::Suite,
    seed: u64,
    batch_size: usize,
    device: &Device,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalReport, ExperimentError> {
    let report = suite.score(target, seed, batch_size, device, dtype, progress)?;
    let versions = suite.version_names().len();
    Ok(EvalReport {
        model: name.to_string(),
        attack: format!("black-box suite ({versions} versions)"),
        images: suite.clean.len(),
        protocol: Protocol::Suite {
            folder: suite.dir.display().to_string(),
            versions,
            surrogates: suite.manifest.surrogates.clone(),
            config: suite.manifest.config.clone(),
        },
        report,
    })
}

/// The surrogate ensembles of `config.blackbox`: for each (size, seed), the name
/// `baseline<size>` and the config that trains it (plain networks, `train.method = baseline`,
/// `train.ensemble_size = size`, `seed`, as many epochs as the baselines of
/// [`baseline_config`]).
pub fn surrogate_configs(config: &Config) -> Vec<(String, Config)> {
    let bb = &config.blackbox;
    bb.surrogate_sizes
        .iter()
        .zip(&bb.surrogate_seeds)
        .map(|(&size, &seed)| {
            let mut c = config.clone();
            c.run.rivals.clear();
            c.seed = seed;
            c.model.n = 1;
            c.train.method = Method::Baseline;
            c.train.ensemble_size = size;
            c.train.epochs = config.train.epochs + config.eio.pretrain_epochs;
            (format!("baseline{size}"), c)
        })
        .collect()
}

/// Trains (or finishes, or reuses) every surrogate of `config` in `dir/<name>`; returns each
/// name with its `model.safetensors`, or `None` when interrupted.
///
/// # Errors
/// Any training error.
#[allow(clippy::too_many_arguments)]
pub fn train_surrogates(
    config: &Config,
    dir: &FsPath,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<Option<Vec<(String, PathBuf)>>, ExperimentError> {
    let mut out = Vec::new();
    for (name, c) in surrogate_configs(config) {
        let run = RunDir::new(dir.join(&name));
        display.stage(
            "surrogate",
            &format!(
                "{name}: {} members, seed {} -> {}",
                c.train.ensemble_size,
                c.seed,
                run.root.display()
            ),
        );
        let trained = finished_or_train(&run, &c, data, device, dtype, display, interrupt, || {
            train::start(&c, device, dtype).map_err(ExperimentError::from)
        })?;
        if trained.is_none() {
            return Ok(None);
        }
        out.push((name, run.model()));
    }
    Ok(Some(out))
}

/// The suite's evaluation images: the fixed seeded subset of `blackbox.images` test images
/// (the same draw as the white-box subset, `Stream::EvalSubset`).
pub fn suite_images(config: &Config, data: &DataSplits) -> crate::blackbox::SuiteImages {
    let indices = eio_data::split::eval_subset_indices(
        data.test.len(),
        config.blackbox.images,
        &Seeds::new(config.seed),
    );
    crate::blackbox::SuiteImages {
        images: data.test.subset(&indices),
        indices,
        dataset: data.source.clone(),
    }
}

/// The config of the baseline that `eio run` trains beside an EIO config: plain networks
/// (`model.n = 1`), `train.method = baseline`, as many members as the largest of
/// `run.baselines` (the reported ensembles are its first members), as many epochs as EIO's
/// pre-training plus main epochs, and no `run.rivals` (adding a rival to a run reuses it).
pub fn baseline_config(config: &Config) -> Config {
    let mut b = config.clone();
    b.run.rivals.clear();
    b.model.n = 1;
    b.train.method = Method::Baseline;
    b.train.ensemble_size = config.run.baselines.iter().copied().max().unwrap_or(1);
    b.train.epochs = config.train.epochs + config.eio.pretrain_epochs;
    b
}

/// DVERGE's start (`--init-from`): for a `dverge` rival with an empty `dverge.init_from`, the
/// first `train.ensemble_size` members of the run's baseline ensemble (DVERGE starts from the
/// trained baseline of the same size), written to `init.safetensors` in the rival's folder;
/// `None` for other methods, a set `init_from`, or a baseline with fewer members or another
/// model (the rival then starts from fresh weights, as its config says).
///
/// # Errors
/// The file cannot be written.
pub fn dverge_start(
    rival: &Config,
    baseline: &Checkpoint,
    dir: &RunDir,
) -> Result<Option<PathBuf>, ExperimentError> {
    let m = rival.train.ensemble_size;
    let fits = rival.train.method == Method::Dverge
        && rival.dverge.init_from.is_empty()
        && baseline.members.len() >= m
        && baseline.meta.config.model == rival.model;
    if !fits {
        return Ok(None);
    }
    let file = dir.root.join("init.safetensors");
    if !file.exists() {
        fs::create_dir_all(&dir.root).map_err(RunDir::write_err(&dir.root))?;
        first_members(baseline, m).save(&file)?;
    }
    Ok(Some(file))
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

/// The first `m` members of a checkpoint as one model without optimiser state.
pub fn first_members(checkpoint: &Checkpoint, m: usize) -> Checkpoint {
    let mut part = checkpoint.clone();
    part.members.truncate(m);
    part.optimisers.clear();
    part.meta.members = part.members.len();
    part.meta.optimiser = false;
    part
}

/// What `eio run` produced.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// The derived path (gate vector, text form).
    pub derived_path: String,
    pub reports: Vec<EvalReport>,
    pub sanity: Vec<Flag>,
}

/// Hooks of [`run_pipeline`] for the binary's display.
pub trait PipelineDisplay {
    /// A stage starts (`baseline`, `eio`, `derive`, `surrogate`, `suite`, `evaluate`).
    fn stage(&mut self, name: &str, detail: &str);
    /// The training observer for the stage just announced.
    fn observer(&mut self) -> &mut dyn Observer;
    /// Evaluation progress: `batch` of `batches` of the named attack.
    fn eval_progress(&mut self, attack: &str, batch: usize, batches: usize);
}

/// Generates (or finishes) the whole black-box suite of `config.blackbox` in `suite_dir` from
/// the trained surrogates `surrogate_files` (name, model file; [`train_surrogates`]), on the
/// images of [`suite_images`], showing progress on `display`.
///
/// # Errors
/// A surrogate that does not load, or a generation error.
#[allow(clippy::too_many_arguments)]
pub fn generate_suite(
    config: &Config,
    surrogate_files: &[(String, PathBuf)],
    suite_dir: &FsPath,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<crate::blackbox::GenerateSummary, ExperimentError> {
    let surrogates = surrogate_files
        .iter()
        .map(|(name, file)| crate::blackbox::Surrogate::load(name, file, device, dtype))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::blackbox::generate(
        suite_dir,
        config,
        &surrogates,
        &suite_images(config, data),
        eio_spec::blackbox::Shard::ALL,
        device,
        dtype,
        &mut SuiteProgress(display),
        interrupt,
    )?)
}

struct SuiteProgress<'a>(&'a mut dyn PipelineDisplay);

impl crate::blackbox::GenerateProgress for SuiteProgress<'_> {
    fn job(&mut self, job: &eio_spec::blackbox::Job, done: usize, total: usize, skipped: bool) {
        if skipped {
            self.0.eval_progress("suite generation", done + 1, total);
        } else {
            self.0.eval_progress(
                &format!("suite: {} eps {}", job.version.name, job.eps),
                done + 1,
                total,
            );
        }
    }
    fn finished(&mut self, _job: &eio_spec::blackbox::Job, _seconds: f64) {}
}

/// `eio run`: trains the baseline ensemble ([`baseline_config`]) and the EIO network of
/// `config`, derives the path [`derive_path_draw`] and fine-tunes it, trains the surrogate
/// ensembles of `config.blackbox` and generates the black-box suite from them, then evaluates
/// each baseline ensemble of `run.baselines` and the derived model white-box and on the suite,
/// with the sanity checks, writing `report.md`, `eval.json` and `eval.csv` into `out`. Each
/// stage lives in its own folder (`baseline/`, `eio/`, `derived/`, `surrogates/<name>/`,
/// `suite/`); with `resume` finished stages are reused and an interrupted one continues.
/// Returns `None` when interrupted.
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
    let started = std::time::Instant::now();
    fs::create_dir_all(out).map_err(RunDir::write_err(out))?;
    RunDir::new(out).write_config(config)?;
    // Stage configs leave out the rivals: adding one to a finished run reuses every stage.
    let mut eio_config = config.clone();
    eio_config.run.rivals.clear();
    eio_config.train.method = Method::Eio;
    let stages = [
        ("baseline", baseline_config(config)),
        ("eio", eio_config.clone()),
    ];
    let mut trained = Vec::new();
    let mut seconds = Vec::new();
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
        let t = std::time::Instant::now();
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
        seconds.push((name.to_string(), t.elapsed().as_secs_f64()));
        trained.push(model);
    }
    let path = derive_path_draw(&eio_config)?;
    let dir = RunDir::new(out.join("derived"));
    display.stage("derive", &format!("path {path} -> {}", dir.root.display()));
    let rgn_file = out.join("eio").join("model.safetensors");
    let derived_config = crate::derive::derived_config(&eio_config);
    let t = std::time::Instant::now();
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
    seconds.push(("derive".into(), t.elapsed().as_secs_f64()));
    if config.derive.fold_bn {
        let (folded, diff) = fold(&derived, &data.test, device)?;
        folded.save(&dir.folded())?;
        display.stage(
            "fold",
            &format!("folded conv+BN pairs; largest logit difference vs unfolded {diff:.2e}"),
        );
    }
    let mut rivals = Vec::with_capacity(config.run.rivals.len());
    let mut costs = vec![
        MethodCost::of(
            &format!(
                "Baseline-{}",
                config.run.baselines.iter().max().unwrap_or(&1)
            ),
            &baseline_config(config),
            &[out.join("baseline")],
        ),
        MethodCost::of(
            "EIO (pre-training, EIO epochs, fine-tuning)",
            &eio_config,
            &[out.join("eio"), out.join("derived")],
        ),
    ];
    for rival in &config.run.rivals {
        let dir = RunDir::new(out.join(&rival.name));
        let mut rival_config = eio_spec::rivals::rival_config(config, rival)
            .map_err(|e| ExperimentError::Usage(e.to_string()))?;
        let init = dverge_start(&rival_config, &trained[0], &dir)?;
        if let Some(init) = &init {
            rival_config.dverge.init_from = init.display().to_string();
        }
        display.stage(
            &rival.name,
            &format!(
                "train.method = {:?} ({} members, preset {}{}) -> {}",
                rival_config.train.method,
                rival_config.train.ensemble_size,
                rival.preset,
                init.as_ref().map_or(String::new(), |_| {
                    ", from the baseline's first members".to_string()
                }),
                dir.root.display()
            ),
        );
        let t = std::time::Instant::now();
        let Some(model) = finished_or_train(
            &dir,
            &rival_config,
            data,
            device,
            dtype,
            display,
            interrupt,
            || train::start(&rival_config, device, dtype).map_err(ExperimentError::from),
        )?
        else {
            return Ok(None);
        };
        seconds.push((rival.name.clone(), t.elapsed().as_secs_f64()));
        costs.push(MethodCost::of(
            &rival.name,
            &rival_config,
            std::slice::from_ref(&dir.root),
        ));
        rivals.push(Evaluated {
            name: rival.name.clone(),
            checkpoint: model,
            path: None,
        });
    }
    let t = std::time::Instant::now();
    let Some(surrogate_files) = train_surrogates(
        config,
        &out.join("surrogates"),
        data,
        device,
        dtype,
        display,
        interrupt,
    )?
    else {
        return Ok(None);
    };
    seconds.push(("surrogates".into(), t.elapsed().as_secs_f64()));
    let suite_dir = out.join("suite");
    display.stage(
        "suite",
        &format!("black-box transfer suite -> {}", suite_dir.display()),
    );
    let t = std::time::Instant::now();
    let generated = generate_suite(
        config,
        &surrogate_files,
        &suite_dir,
        data,
        device,
        dtype,
        display,
        interrupt,
    )?;
    if generated.interrupted {
        return Ok(None);
    }
    seconds.push(("suite".into(), t.elapsed().as_secs_f64()));
    let suite = crate::blackbox::Suite::open(&suite_dir)?;
    display.stage(
        "evaluate",
        "clean, white-box and black-box suite, all-or-nothing",
    );
    let images = eval_images(config, data);
    let mut models: Vec<Evaluated> = config
        .run
        .baselines
        .iter()
        .map(|&m| Evaluated {
            name: format!("Baseline-{m}"),
            checkpoint: first_members(&trained[0], m),
            path: None,
        })
        .collect();
    models.extend(rivals);
    models.push(Evaluated {
        name: format!("EIO-derived ({path})"),
        checkpoint: derived,
        path: None,
    });
    let (plans, paths) = plans_and_paths(&models, false)?;
    let mut reports = Vec::new();
    let mut sanity = Vec::new();
    let t = std::time::Instant::now();
    for i in 0..models.len() {
        let target = target(
            &models[i..=i],
            &plans[i..=i],
            &paths[i..=i],
            Deployment::Fixed,
        )?;
        let name = &models[i].name;
        reports.extend(evaluate(
            name,
            &target,
            None,
            &images,
            &config.eval,
            config.seed,
            device,
            dtype,
            &mut |a, b, n| display.eval_progress(a, b, n),
        )?);
        reports.push(suite_report(
            name,
            &target,
            &suite,
            config.seed,
            config.eval.batch_size,
            device,
            dtype,
            &mut |b, n| display.eval_progress("black-box suite", b, n),
        )?);
        sanity.push(crate::sanity::gradient_masking(
            name,
            &target,
            &images,
            &config.eval,
            config.seed,
            device,
            dtype,
        )?);
    }
    seconds.push(("evaluate".into(), t.elapsed().as_secs_f64()));
    let undefended: Vec<String> = config
        .run
        .baselines
        .iter()
        .map(|m| format!("Baseline-{m}"))
        .collect();
    let mut flags = crate::sanity::report_flags(&reports, &undefended);
    flags.extend(sanity);
    EvalReport::write(&reports, &flags, out)?;
    let report = PipelineReport {
        derived_path: path.to_string(),
        reports,
        sanity: flags,
    };
    let md = out.join("report.md");
    let timing = PipelineTiming {
        stages: seconds,
        total: started.elapsed().as_secs_f64(),
        generated: generated.generated,
    };
    write_atomically(
        &md,
        markdown(config, &report, images.len(), &suite, &timing, &costs).as_bytes(),
    )
    .map_err(RunDir::write_err(&md))?;
    Ok(Some(report))
}

/// The rivals of a run as `name (preset, assignments)`, or "none".
fn rival_settings(config: &Config) -> String {
    if config.run.rivals.is_empty() {
        return "none".into();
    }
    config
        .run
        .rivals
        .iter()
        .map(|r| format!("{} (preset `{}`, `{}`)", r.name, r.preset, r.set.join(" ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Wall times of one `eio run` call (stages reused from an earlier call count ~0).
struct PipelineTiming {
    stages: Vec<(String, f64)>,
    total: f64,
    /// Suite jobs generated in this call, with their wall time.
    generated: Vec<(String, f64)>,
}

/// The stage's finished model, or train it (fresh from `fresh`, or resumed) and return it;
/// `None` when interrupted.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finished_or_train(
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

/// One trained method's row of the report: what it is and what its training cost, summed
/// from its stages' `metrics.jsonl` (batches only, so a resumed stage counts every epoch once
/// and the per-epoch accuracy passes are left out).
struct MethodCost {
    name: String,
    method: String,
    members: usize,
    epochs: usize,
    seconds: f64,
    images: usize,
}

impl MethodCost {
    fn of(name: &str, config: &Config, dirs: &[PathBuf]) -> Self {
        let (mut seconds, mut images, mut epochs) = (0.0, 0, 0);
        for dir in dirs {
            let text = fs::read_to_string(RunDir::new(dir).metrics()).unwrap_or_default();
            for record in text
                .lines()
                .filter_map(|l| serde_json::from_str::<EpochRecord>(l).ok())
            {
                seconds += record.seconds;
                images += record.images;
                epochs += 1;
            }
        }
        MethodCost {
            name: name.to_string(),
            method: eio_spec::rivals::method_name(config.train.method).to_string(),
            members: if config.train.method.is_ensemble() {
                config.train.ensemble_size
            } else {
                1
            },
            epochs,
            seconds,
            images,
        }
    }

    fn table(costs: &[MethodCost]) -> String {
        let mut out = String::from(
            "| model | method | members | epochs | training time (s) | images/s |\n|---|---|---|---|---|---|\n",
        );
        for c in costs {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} | {:.1} |\n",
                c.name,
                c.method,
                c.members,
                c.epochs,
                c.seconds,
                c.images as f64 / c.seconds.max(1e-9)
            ));
        }
        out
    }
}

fn markdown(
    config: &Config,
    report: &PipelineReport,
    images: usize,
    suite: &crate::blackbox::Suite,
    timing: &PipelineTiming,
    costs: &[MethodCost],
) -> String {
    let eval = &config.eval;
    let bb = &suite.manifest.config;
    let paper = eio_spec::config::BlackboxConfig::default();
    let names = |losses: &[eio_spec::config::AttackLoss]| -> String {
        losses
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let surrogates: Vec<String> = suite
        .manifest
        .surrogates
        .iter()
        .map(|s| format!("{} ({} x {}, seed {})", s.name, s.members, s.model, s.seed))
        .collect();
    let reduced = if *bb == paper {
        "the paper's (DVERGE's) protocol".to_string()
    } else {
        let mut diffs = Vec::new();
        if bb.images != paper.images {
            diffs.push(format!("{} images (paper {})", bb.images, paper.images));
        }
        if bb.steps != paper.steps {
            diffs.push(format!("{} steps (paper {})", bb.steps, paper.steps));
        }
        if bb.eps != paper.eps {
            diffs.push(format!("eps {:?} (paper 0.01..0.07)", bb.eps));
        }
        if bb.surrogate_sizes != paper.surrogate_sizes {
            diffs.push(format!(
                "surrogate ensembles of {:?} members (paper [3, 5, 8])",
                bb.surrogate_sizes
            ));
        }
        if bb.attacks != paper.attacks || bb.mpgd_starts != paper.mpgd_starts {
            diffs.push(format!(
                "attacks {:?} with {} momentum-PGD start(s) (paper mpgd x3, mdi2, sgm)",
                bb.attacks, bb.mpgd_starts
            ));
        }
        if bb.losses != paper.losses {
            diffs.push(format!("losses {} (paper ce and cw)", names(&bb.losses)));
        }
        format!("a REDUCED suite: {}", diffs.join(", "))
    };
    let flags: Vec<String> = report
        .sanity
        .iter()
        .map(|f| format!("- {}", f.line()))
        .collect();
    let breaches = report.sanity.iter().filter(|f| !f.passed).count();
    let stage_times: Vec<String> = timing
        .stages
        .iter()
        .map(|(name, s)| format!("{name} {s:.0} s"))
        .collect();
    let per_job = if timing.generated.is_empty() {
        "no suite job was generated in this call".to_string()
    } else {
        let total: f64 = timing.generated.iter().map(|(_, s)| s).sum();
        format!(
            "{} suite jobs generated, {:.1} s per job on average",
            timing.generated.len(),
            total / timing.generated.len() as f64
        )
    };
    format!(
        "# eio run report\n\n\
         Dataset `{:?}` ({} training images), model {} width {} (EIO: n = {}, p = {}), {} + {} epochs, seed {}.\n\
         EIO-derived path: `{}`. Baselines: the first m members of one ensemble trained with seed {}.\n\n\
         ## Table 1 shape\n\n\
         All-or-nothing accuracy: black-box at eps {} over the {}-version suite, white-box at eps {}.\n\n{}\n\
         ## All measurements\n\n\
         White-box: PGD, {} steps, step eps·{}, {} restart(s), loss {}, on {images} test images \
         (a fixed seeded subset). Black-box: {} versions per image from surrogates {}; {}; \
         {} steps of eps·{}, losses {}; an image counts as robust only if every version fails.\n\n{}\n\
         Curves over eps: `eval.csv`; per-version accuracies: `eval.json`.\n\n\
         ## Methods and training cost\n\n\
         Wall time of the training batches from each stage's `metrics.jsonl` (per-epoch accuracy \
         passes excluded); `epochs` counts every phase (EIO: pre-training, EIO epochs and \
         fine-tuning of the derived path; DVERGE continues from the baseline's first members). \
         Rival settings: {}.\n\n{}\n\
         ## Sanity checks ({breaches} warning(s))\n\n{}\n\n\
         ## Time\n\n{}; total {:.0} s; {per_job}.\n",
        config.data.dataset,
        config.data.train_limit.map_or("all".to_string(), |l| l.to_string()),
        config.model.name(),
        config.model.width,
        config.model.n,
        config.eio.p,
        config.eio.pretrain_epochs,
        config.train.epochs,
        config.seed,
        report.derived_path,
        config.seed,
        config.run.table_black_eps,
        suite.version_names().len(),
        config.run.table_white_eps,
        EvalReport::table1(&report.reports, config.run.table_black_eps, config.run.table_white_eps),
        eval.steps,
        eval.step_fraction,
        eval.restarts,
        names(&eval.losses),
        suite.version_names().len(),
        surrogates.join(", "),
        reduced,
        bb.steps,
        bb.step_fraction,
        names(&bb.losses),
        EvalReport::table(&report.reports),
        rival_settings(config),
        MethodCost::table(costs),
        flags.join("\n"),
        stage_times.join(", "),
        timing.total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(global_epoch: usize) -> EpochRecord {
        EpochRecord {
            phase: Phase::Main,
            epoch: global_epoch,
            global_epoch,
            lr: 0.1,
            loss: 1.0,
            train_accuracy: None,
            distill_loss: None,
            sign_ties: 0,
            validation_accuracy: None,
            test_accuracy: Some(0.5),
            images: 8,
            seconds: 0.5,
            images_per_second: 16.0,
        }
    }

    fn line(r: &EpochRecord) -> String {
        format!("{}\n", serde_json::to_string(r).unwrap())
    }

    #[test]
    fn metrics_are_repaired_to_one_record_per_epoch_of_the_checkpoint() {
        let root = std::env::temp_dir().join(format!("eio-metrics-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = RunDir::new(&root);
        fs::create_dir_all(&root).unwrap();
        let epochs = |dir: &RunDir| -> Vec<usize> {
            fs::read_to_string(dir.metrics())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<EpochRecord>(l).unwrap().global_epoch)
                .collect()
        };

        // Repeated epoch 0, epoch 2 beyond a checkpoint at 2, a torn tail; epoch 1 restored.
        let torn = line(&record(3));
        let text = [line(&record(0)), line(&record(0)), line(&record(2))].concat()
            + &torn[..torn.len() / 2];
        fs::write(dir.metrics(), &text).unwrap();
        let last = serde_json::to_string(&record(1)).unwrap();
        let notes = dir.repair_metrics(2, Some(&last)).unwrap();
        assert_eq!(epochs(&dir), [0, 1]);
        let all = notes.join("\n");
        for what in [
            "torn last line",
            "restored the record of epoch 1",
            "dropped 1 record",
            "repeated",
        ] {
            assert!(all.contains(what), "{what}: {all}");
        }
        assert!(all.contains("metrics.jsonl"), "{all}");
        // Nothing left to repair: no notes, the file unchanged.
        let before = fs::read(dir.metrics()).unwrap();
        assert!(dir.repair_metrics(2, Some(&last)).unwrap().is_empty());
        assert_eq!(fs::read(dir.metrics()).unwrap(), before);

        // A damaged line before the last is named, not silently dropped, once there is history.
        let text = [
            line(&record(0)),
            "{\"phase\": oops\n".into(),
            line(&record(1)),
        ]
        .concat();
        fs::write(dir.metrics(), &text).unwrap();
        let e = dir.repair_metrics(2, None).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
        // A fresh start keeps nothing, so it discards the damage and says so.
        let notes = dir.repair_metrics(0, None).unwrap();
        assert!(notes.join(" ").contains("unreadable"), "{notes:?}");
        assert_eq!(fs::read_to_string(dir.metrics()).unwrap(), "");
        let _ = fs::remove_dir_all(&root);
    }
}

//! `eio sweep`: the runs of a figure ([`eio_spec::figure`]), each trained, derived and evaluated
//! in its own folder through the stages `eio run` uses, skipping finished runs, resuming
//! interrupted ones, one shard of a job array at a time.
//!
//! # A sweep folder
//! * `sweep.toml`: what is swept ([`SweepRecord`]: the figure definition, scale and extra
//!   settings); a second task or a restart must ask for the same runs (a changed title or panel
//!   is taken over, for `eio plot`);
//! * `stages/<kind>-<hash>/`: one trained model each, an ordinary run folder (`config.toml`,
//!   `checkpoint.safetensors`, `model.safetensors`, `metrics.jsonl`), named by a hash of its
//!   config, so runs with the same training share it (Fig. 8's eight paths share one RGN;
//!   DVERGE starts from the baseline of its size); `stages/suite-<hash>/` holds the surrogates
//!   and the black-box suite every run of the figure is judged on;
//! * `stages/<name>.lock`: held while a stage is built; a second task needing it waits, then
//!   reuses it;
//! * `runs/<id>/`: `eval.json`, `eval.csv` and `result.json` ([`RunResult`], written last: a
//!   run is finished when it exists); `runs/<id>.lock` is held while the run is worked on, so
//!   no two processes write one run.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device};
use eio_data::DataSplits;
use eio_spec::config::{Config, Method};
use eio_spec::figure::{Evaluation, Figure, RunMethod, RunSpec, Source};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::Path;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, Phase};
use crate::experiment::{
    clean_report, dverge_start, eval_images, evaluate, finished_or_train, generate_suite,
    plans_and_paths, suite_report, target, train_surrogates, Deployment, EvalReport, Evaluated,
    ExperimentError, PipelineDisplay, RunDir, DERIVE_GATES,
};
use crate::safe_write::{remove_stale_temporaries, write_atomically};
use crate::train::{self, EpochRecord};

/// `sweep.toml`: the sweep a folder holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepRecord {
    /// Where the figure came from (`configs/figures/fig3.toml` or a file).
    pub origin: String,
    pub scale: String,
    /// The command line's `--set`, applied after the scale's settings.
    pub set: Vec<String>,
    /// The scale's base config after the scale's and the command line's settings (a figure
    /// file's relative `base` is resolved once, here).
    pub base: Config,
    pub figure: Figure,
}

impl SweepRecord {
    /// The figure as a source whose base is already resolved (no file is read again).
    fn source(&self) -> Source {
        Source {
            figure: self.figure.clone(),
            origin: self.origin.clone(),
            folder: None,
        }
    }

    /// Whether `other` asks for the same runs, judged the same way (it may draw them
    /// differently: title, caption, panels).
    fn same_runs(&self, other: &SweepRecord) -> bool {
        self.scale == other.scale
            && self.set == other.set
            && self.base == other.base
            && self.figure.runs == other.figure.runs
            && self.figure.evaluate == other.figure.evaluate
    }
}

/// A sweep: a figure at one scale with extra settings, resolved.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub record: SweepRecord,
    /// Each run's training config, in the figure's order.
    pub configs: Vec<Config>,
    /// Each run's stages, in build order.
    stages: Vec<Vec<Stage>>,
}

impl Sweep {
    /// Resolves `source` at `scale` with `set` (every run's config; none may change `[data]`,
    /// which the process loads once).
    ///
    /// # Errors
    /// An unknown scale, or a config that does not load, named with the run.
    pub fn new(source: &Source, scale: &str, set: &[String]) -> Result<Sweep, ExperimentError> {
        let usage = |e: eio_spec::figure::FigureError| ExperimentError::Usage(e.to_string());
        let base = source.scale_config(scale, set).map_err(usage)?;
        let record = SweepRecord {
            origin: source.origin.clone(),
            scale: scale.to_string(),
            set: set.to_vec(),
            base,
            figure: source.figure.clone(),
        };
        Sweep::from_record(record)
    }

    /// The sweep of a stored `sweep.toml`.
    ///
    /// # Errors
    /// A run whose config does not load, or that changes `[data]`.
    pub fn from_record(record: SweepRecord) -> Result<Sweep, ExperimentError> {
        let source = record.source();
        let mut configs = Vec::with_capacity(record.figure.runs.len());
        for run in &record.figure.runs {
            let c = source
                .run_config(&record.scale, &record.base, run)
                .map_err(|e| ExperimentError::Usage(e.to_string()))?;
            if c.data != record.base.data {
                return Err(ExperimentError::Usage(format!(
                    "{}: run {}: a run may not change [data] (every run of a sweep uses the data the process loads once)",
                    record.origin, run.id
                )));
            }
            configs.push(c);
        }
        let stages = record
            .figure
            .runs
            .iter()
            .zip(&configs)
            .map(|(run, c)| plan_stages(&record, run, c))
            .collect::<Result<_, _>>()?;
        Ok(Sweep {
            record,
            configs,
            stages,
        })
    }

    /// Reads `DIR/sweep.toml`.
    ///
    /// # Errors
    /// A missing or unreadable file, named.
    pub fn open(dir: &FsPath) -> Result<Sweep, ExperimentError> {
        let path = dir.join("sweep.toml");
        let text = fs::read_to_string(&path).map_err(|e| {
            ExperimentError::Usage(format!(
                "{}: {e} (is {} a sweep folder? `eio sweep FIGURE --out DIR` makes one)",
                path.display(),
                dir.display()
            ))
        })?;
        let record: SweepRecord = toml::from_str(&text)
            .map_err(|e| ExperimentError::Usage(format!("{}: {e}", path.display())))?;
        Sweep::from_record(record)
    }

    fn runs(&self) -> &[RunSpec] {
        &self.record.figure.runs
    }

    /// Writes `DIR/sweep.toml`, or checks that the one there asks for the same sweep.
    ///
    /// # Errors
    /// A folder holding another sweep, or a write error.
    pub fn claim(&self, dir: &FsPath) -> Result<(), ExperimentError> {
        let path = dir.join("sweep.toml");
        let text = toml::to_string(&self.record)
            .map_err(|e| ExperimentError::Usage(format!("cannot serialise the sweep: {e}")))?;
        fs::create_dir_all(dir.join("stages")).map_err(RunDir::write_err(dir))?;
        fs::create_dir_all(dir.join("runs")).map_err(RunDir::write_err(dir))?;
        let _guard = lock(&dir.join("sweep.lock"), true)?;
        remove_stale_temporaries(dir).map_err(RunDir::write_err(dir))?;
        if let Ok(stored) = fs::read_to_string(&path) {
            let stored = toml::from_str::<SweepRecord>(&stored).ok();
            match stored {
                Some(s) if s == self.record => return Ok(()),
                // Only how the figure is drawn changed (titles, panels): keep the runs.
                Some(s) if s.same_runs(&self.record) => {}
                _ => {
                    return Err(ExperimentError::Usage(format!(
                        "{} holds another sweep (its sweep.toml differs in its runs, evaluation, scale or --set); choose another --out",
                        dir.display()
                    )))
                }
            }
        }
        write_atomically(&path, text.as_bytes()).map_err(RunDir::write_err(&path))
    }

    /// The stages run `i` needs, in build order.
    pub fn stages(&self, i: usize) -> &[Stage] {
        &self.stages[i]
    }

    /// The stage of the black-box suite every run is judged on (`None` when the figure does not
    /// evaluate black-box).
    pub fn suite_stage(&self) -> Option<String> {
        if !self.record.figure.evaluate.contains(&Evaluation::BlackBox) {
            return None;
        }
        let mut key = String::new();
        for (name, c) in crate::experiment::surrogate_configs(&self.record.base) {
            key.push_str(&name);
            key.push_str(&toml::to_string(&c).unwrap_or_default());
        }
        key.push_str(&toml::to_string(&self.record.base.blackbox).unwrap_or_default());
        Some(format!("suite-{}", short_hash(&key)))
    }

    /// Each run's status in `dir`.
    pub fn status(&self, dir: &FsPath, i: usize) -> RunStatus {
        let run_dir = dir.join("runs").join(&self.runs()[i].id);
        if run_dir.join("result.json").exists() {
            RunStatus::Finished
        } else if self
            .stages(i)
            .iter()
            .any(|s| dir.join("stages").join(&s.name).exists())
        {
            RunStatus::Partial
        } else {
            RunStatus::Pending
        }
    }
}

/// The stages `run` (training with `config`) needs, in build order: an EIO run's RGN and its
/// derived path; a baseline; a rival, after the baseline DVERGE starts from.
///
/// # Errors
/// A plan whose path cannot be drawn, or a start config that does not load.
fn plan_stages(
    record: &SweepRecord,
    run: &RunSpec,
    config: &Config,
) -> Result<Vec<Stage>, ExperimentError> {
    let mut out = Vec::new();
    match run.method {
        RunMethod::Eio => {
            let rgn = Stage::new(StageKind::Train, "eio", config.clone(), "");
            let path = derive_draw(config, run.path)?;
            let derived = Stage::new(
                StageKind::Derive {
                    rgn: rgn.name.clone(),
                    path: path.to_string(),
                },
                "derived",
                crate::derive::derived_config(config),
                &rgn.name,
            );
            out.push(rgn);
            out.push(derived);
        }
        RunMethod::Baseline => {
            out.push(Stage::new(StageKind::Train, "baseline", config.clone(), ""))
        }
        RunMethod::Rival => {
            let mut start = None;
            if config.train.method == Method::Dverge && config.dverge.init_from.is_empty() {
                let base_run = RunSpec {
                    id: format!("{}-start", run.id),
                    label: String::new(),
                    method: RunMethod::Baseline,
                    set: Vec::new(),
                    preset: None,
                    members: Some(config.train.ensemble_size),
                    path: 0,
                    member: None,
                };
                let mut c = record
                    .source()
                    .run_config(&record.scale, &record.base, &base_run)
                    .map_err(|e| ExperimentError::Usage(e.to_string()))?;
                // The start is a baseline of the rival's own network and data.
                c.model = config.model.clone();
                let stage = Stage::new(StageKind::Train, "baseline", c, "");
                start = Some(stage.name.clone());
                out.push(stage);
            }
            let kind = eio_spec::rivals::method_name(config.train.method).to_lowercase();
            let salt = start.clone().unwrap_or_default();
            let mut stage = Stage::new(StageKind::Train, &kind, config.clone(), &salt);
            stage.start = start;
            out.push(stage);
        }
    }
    Ok(out)
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Finished,
    /// Some of its stages exist (possibly shared with another run).
    Partial,
    Pending,
}

/// What a stage builds.
#[derive(Debug, Clone, PartialEq)]
pub enum StageKind {
    /// Train a model from fresh weights (or, for DVERGE, from its start).
    Train,
    /// Derive `path` from the RGN of stage `rgn` and fine-tune it.
    Derive { rgn: String, path: String },
}

/// One trained model of a sweep, in `stages/<name>/`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// `<kind>-<first 12 hex digits of SHA-256 of its config and inputs>`.
    pub name: String,
    pub kind: StageKind,
    pub config: Config,
    /// DVERGE's start: the baseline stage whose first members it begins from.
    pub start: Option<String>,
}

impl Stage {
    fn new(kind: StageKind, label: &str, config: Config, salt: &str) -> Stage {
        let mut key = toml::to_string(&config).unwrap_or_default();
        key.push_str(salt);
        if let StageKind::Derive { rgn, path } = &kind {
            key.push_str(&format!("\nrgn {rgn}\npath {path}"));
        }
        Stage {
            name: format!("{label}-{}", short_hash(&key)),
            kind,
            config,
            start: None,
        }
    }
}

fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Draw `k` of the derivation stream: draw 0 is the path `eio run` derives
/// ([`crate::experiment::derive_path_draw`]), draw k the stream index `DERIVE_GATES - k`.
fn derive_draw(config: &Config, k: u64) -> Result<Path, ExperimentError> {
    let plan = config
        .plan()
        .map_err(|e| ExperimentError::Usage(e.to_string()))?;
    Ok(plan
        .path_space()
        .sample(&mut Seeds::new(config.seed).stream(Stream::Gates, DERIVE_GATES.wrapping_sub(k))))
}

/// An exclusive lock on `path` (created if missing), released when the file is dropped;
/// `None` when `wait` is false and another process holds it.
fn lock(path: &FsPath, wait: bool) -> Result<Option<File>, ExperimentError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(RunDir::write_err(path))?;
    if wait {
        file.lock().map_err(RunDir::write_err(path))?;
        return Ok(Some(file));
    }
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(RunDir::write_err(path)(e)),
    }
}

/// Training time of one phase of one stage, summed from its `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseCost {
    pub stage: String,
    pub phase: Phase,
    pub epochs: usize,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// One point of a training curve: the per-epoch held-out (or test) accuracy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub stage: String,
    pub phase: Phase,
    /// Epoch over the run's stages (0-based).
    pub epoch: usize,
    pub accuracy: f64,
}

/// Adversarial accuracy of a run at one ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// `white-box` or `black-box`.
    pub protocol: String,
    pub eps: f64,
    pub accuracy: f64,
    pub images: usize,
}

/// `runs/<id>/result.json`: what `eio plot` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub id: String,
    pub label: String,
    pub method: String,
    /// Stage folders, in build order.
    pub stages: Vec<String>,
    /// The derived path (EIO runs).
    pub derived_path: Option<String>,
    pub clean_accuracy: f64,
    pub clean_images: usize,
    pub accuracy: Vec<Accuracy>,
    pub costs: Vec<PhaseCost>,
    pub curve: Vec<CurvePoint>,
    /// Wall time of the evaluation in this process.
    pub eval_seconds: f64,
}

/// What one call of [`run_shard`] did.
#[derive(Debug, Clone, Default)]
pub struct ShardSummary {
    /// Runs finished by this call, with their wall time.
    pub finished: Vec<(String, f64)>,
    /// Runs found finished.
    pub skipped: Vec<String>,
    /// Runs another process holds.
    pub busy: Vec<String>,
    pub interrupted: bool,
}

/// Runs `indices` of `sweep` in `dir` ([`Sweep::claim`] first): each finished run is skipped,
/// each other one locked, its stages built or reused (waiting for a stage another process
/// builds), evaluated, and `result.json` written. `data` is called once, when the first stage
/// or evaluation needs the data. Returns early when interrupted.
///
/// # Errors
/// Any stage's error.
#[allow(clippy::too_many_arguments)]
pub fn run_shard(
    sweep: &Sweep,
    dir: &FsPath,
    indices: &[usize],
    data: &mut dyn FnMut() -> Result<DataSplits, ExperimentError>,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<ShardSummary, ExperimentError> {
    sweep.claim(dir)?;
    let mut summary = ShardSummary::default();
    let mut loaded: Option<DataSplits> = None;
    for &i in indices {
        let run = &sweep.runs()[i];
        let run_dir = dir.join("runs").join(&run.id);
        if run_dir.join("result.json").exists() {
            summary.skipped.push(run.id.clone());
            continue;
        }
        let Some(_guard) = lock(&dir.join("runs").join(format!("{}.lock", run.id)), false)? else {
            display.stage(
                "busy",
                &format!("{} is being run by another process", run.id),
            );
            summary.busy.push(run.id.clone());
            continue;
        };
        if run_dir.join("result.json").exists() {
            summary.skipped.push(run.id.clone());
            continue;
        }
        // Temporary files of a writer killed in this run's folder.
        remove_stale_temporaries(&run_dir).map_err(RunDir::write_err(&run_dir))?;
        if loaded.is_none() {
            loaded = Some(data()?);
        }
        let data = loaded.as_ref().expect("loaded above");
        let started = Instant::now();
        match one_run(sweep, dir, i, data, device, dtype, display, interrupt)? {
            Some(result) => {
                fs::create_dir_all(&run_dir).map_err(RunDir::write_err(&run_dir))?;
                let path = run_dir.join("result.json");
                let text = serde_json::to_string_pretty(&result).map_err(|e| {
                    ExperimentError::Usage(format!("cannot serialise the result: {e}"))
                })?;
                write_atomically(&path, text.as_bytes()).map_err(RunDir::write_err(&path))?;
                summary
                    .finished
                    .push((run.id.clone(), started.elapsed().as_secs_f64()));
            }
            None => {
                summary.interrupted = true;
                return Ok(summary);
            }
        }
    }
    Ok(summary)
}

/// Builds (or reuses) the stages of run `i`, evaluates its model; `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn one_run(
    sweep: &Sweep,
    dir: &FsPath,
    i: usize,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<Option<RunResult>, ExperimentError> {
    let run = &sweep.runs()[i];
    let stages = sweep.stages(i);
    let mut model = None;
    for stage in stages {
        display.stage(
            &run.id,
            &format!(
                "stage {} -> {}",
                stage.name,
                dir.join("stages").join(&stage.name).display()
            ),
        );
        let Some(trained) = build_stage(dir, stage, data, device, dtype, display, interrupt)?
        else {
            return Ok(None);
        };
        model = Some(trained);
    }
    let mut model = model.expect("every run has a stage");
    if let Some(k) = run.member {
        if k >= model.members.len() {
            return Err(ExperimentError::Usage(format!(
                "run {}: member {k} of a model with {} members",
                run.id,
                model.members.len()
            )));
        }
        let kept = model.members.swap_remove(k);
        model.members = vec![kept];
        model.optimisers.clear();
        model.meta.members = 1;
    }
    let started = Instant::now();
    let base = &sweep.record.base;
    let evaluated = vec![Evaluated {
        name: run.label.clone(),
        checkpoint: model,
        path: None,
    }];
    let (plans, paths) = plans_and_paths(&evaluated, false)?;
    let target = target(&evaluated, &plans, &paths, Deployment::Fixed)?;
    let images = eval_images(base, data);
    display.stage(&run.id, "evaluate: clean, then the figure's attacks");
    let mut reports = vec![clean_report(
        &run.label,
        &target,
        &images,
        base.eval.batch_size,
        base.seed,
        device,
        dtype,
    )?];
    let evaluate_list = &sweep.record.figure.evaluate;
    if evaluate_list.contains(&Evaluation::WhiteBox) {
        reports.extend(evaluate(
            &run.label,
            &target,
            None,
            &images,
            &base.eval,
            base.seed,
            device,
            dtype,
            &mut |a, b, n| display.eval_progress(a, b, n),
        )?);
    }
    if let Some(suite_name) = sweep.suite_stage() {
        let Some(suite) = build_suite(
            sweep,
            dir,
            &suite_name,
            data,
            device,
            dtype,
            display,
            interrupt,
        )?
        else {
            return Ok(None);
        };
        reports.push(suite_report(
            &run.label,
            &target,
            &suite,
            base.seed,
            base.blackbox.batch_size,
            device,
            dtype,
            &mut |b, n| display.eval_progress("black-box suite", b, n),
        )?);
    }
    let run_dir = dir.join("runs").join(&run.id);
    EvalReport::write(&reports, &[], &run_dir)?;
    let accuracy = reports
        .iter()
        .filter_map(|r| {
            let protocol = if r.attack == crate::experiment::WHITE_BOX {
                "white-box"
            } else if r.attack.starts_with("black-box suite") {
                "black-box"
            } else {
                return None;
            };
            Some(r.report.per_eps.iter().map(move |e| Accuracy {
                protocol: protocol.into(),
                eps: e.eps,
                accuracy: e.robustness.accuracy,
                images: r.images,
            }))
        })
        .flatten()
        .collect();
    let (costs, curve) = stage_records(dir, stages);
    let derived_path = stages.iter().find_map(|s| match &s.kind {
        StageKind::Derive { path, .. } => Some(path.clone()),
        StageKind::Train => None,
    });
    Ok(Some(RunResult {
        id: run.id.clone(),
        label: run.label.clone(),
        method: match run.method {
            RunMethod::Eio => "EIO".to_string(),
            _ => eio_spec::rivals::method_name(sweep.configs[i].train.method).to_string(),
        },
        stages: stages.iter().map(|s| s.name.clone()).collect(),
        derived_path,
        clean_accuracy: reports[0].report.clean_accuracy,
        clean_images: reports[0].images,
        accuracy,
        costs,
        curve,
        eval_seconds: started.elapsed().as_secs_f64(),
    }))
}

/// The stage's model: reused when finished, otherwise built (resumed when interrupted before)
/// while holding its lock; `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn build_stage(
    dir: &FsPath,
    stage: &Stage,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<Option<Checkpoint>, ExperimentError> {
    let stages = dir.join("stages");
    let run_dir = RunDir::new(stages.join(&stage.name));
    let _guard = lock(&stages.join(format!("{}.lock", stage.name)), true)?;
    match &stage.kind {
        StageKind::Train => {
            let mut config = stage.config.clone();
            if let Some(start) = &stage.start {
                let baseline = Checkpoint::load(
                    &RunDir::new(stages.join(start)).model(),
                    device,
                    Some(dtype),
                )?;
                if let Some(init) = dverge_start(&config, &baseline, &run_dir)? {
                    config.dverge.init_from = init.display().to_string();
                }
            }
            finished_or_train(
                &run_dir,
                &config,
                data,
                device,
                dtype,
                display,
                interrupt,
                || train::start(&config, device, dtype).map_err(ExperimentError::from),
            )
        }
        StageKind::Derive { rgn, path } => {
            let rgn_file = RunDir::new(stages.join(rgn)).model();
            let rgn_model = Checkpoint::load(&rgn_file, device, Some(dtype))?;
            let space = rgn_model
                .plan()
                .map_err(|e| ExperimentError::Usage(e.to_string()))?
                .path_space();
            let path = space.parse(path).map_err(|e| {
                ExperimentError::Usage(format!("stage {}: path {path}: {e}", stage.name))
            })?;
            finished_or_train(
                &run_dir,
                &stage.config,
                data,
                device,
                dtype,
                display,
                interrupt,
                || {
                    crate::experiment::derive(
                        &rgn_model,
                        &rgn_file,
                        std::slice::from_ref(&path),
                        dtype,
                        Ok,
                    )
                },
            )
        }
    }
}

/// The figure's black-box suite: its surrogates trained and the suite generated (or reused)
/// under the stage's lock; `None` when interrupted.
#[allow(clippy::too_many_arguments)]
fn build_suite(
    sweep: &Sweep,
    dir: &FsPath,
    name: &str,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    display: &mut dyn PipelineDisplay,
    interrupt: &AtomicBool,
) -> Result<Option<crate::blackbox::Suite>, ExperimentError> {
    let stages = dir.join("stages");
    let root = stages.join(name);
    let suite_dir = root.join("suite");
    let _guard = lock(&stages.join(format!("{name}.lock")), true)?;
    if !root.join("finished").exists() {
        let base = &sweep.record.base;
        display.stage(
            "suite",
            &format!("surrogates and suite -> {}", root.display()),
        );
        let Some(files) = train_surrogates(
            base,
            &root.join("surrogates"),
            data,
            device,
            dtype,
            display,
            interrupt,
        )?
        else {
            return Ok(None);
        };
        let generated = generate_suite(
            base, &files, &suite_dir, data, device, dtype, display, interrupt,
        )?;
        if generated.interrupted {
            return Ok(None);
        }
        let marker = root.join("finished");
        write_atomically(&marker, b"surrogates trained and suite generated\n")
            .map_err(RunDir::write_err(&marker))?;
    }
    Ok(Some(crate::blackbox::Suite::open(&suite_dir)?))
}

/// Training cost per phase and the accuracy curve of `stages`, from their `metrics.jsonl`.
fn stage_records(dir: &FsPath, stages: &[Stage]) -> (Vec<PhaseCost>, Vec<CurvePoint>) {
    let mut costs: Vec<PhaseCost> = Vec::new();
    let mut curve = Vec::new();
    let mut epoch = 0;
    for stage in stages {
        let metrics = RunDir::new(dir.join("stages").join(&stage.name)).metrics();
        let text = fs::read_to_string(metrics).unwrap_or_default();
        for r in text
            .lines()
            .filter_map(|l| serde_json::from_str::<EpochRecord>(l).ok())
        {
            match costs
                .iter_mut()
                .find(|c| c.stage == stage.name && c.phase == r.phase)
            {
                Some(c) => {
                    c.epochs += 1;
                    c.images += r.images;
                    c.seconds += r.seconds;
                }
                None => costs.push(PhaseCost {
                    stage: stage.name.clone(),
                    phase: r.phase,
                    epochs: 1,
                    images: r.images,
                    seconds: r.seconds,
                    images_per_second: 0.0,
                }),
            }
            if let Some(accuracy) = r.validation_accuracy.or(r.test_accuracy) {
                curve.push(CurvePoint {
                    stage: stage.name.clone(),
                    phase: r.phase,
                    epoch,
                    accuracy,
                });
            }
            epoch += 1;
        }
    }
    for c in &mut costs {
        c.images_per_second = c.images as f64 / c.seconds.max(1e-9);
    }
    (costs, curve)
}

/// The stored results of `dir`, in the figure's order (`None` for a run not finished).
///
/// # Errors
/// A `result.json` that does not parse, named.
pub fn results(sweep: &Sweep, dir: &FsPath) -> Result<Vec<Option<RunResult>>, ExperimentError> {
    sweep
        .runs()
        .iter()
        .map(|run| {
            let path: PathBuf = dir.join("runs").join(&run.id).join("result.json");
            match fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| ExperimentError::Usage(format!("{}: {e}", path.display()))),
                Err(_) => Ok(None),
            }
        })
        .collect()
}

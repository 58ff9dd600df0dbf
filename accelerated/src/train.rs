//! Training runs: baseline ensembles, EIO (Algorithm 1 with its clean pre-training), PGD
//! adversarial training, and fine-tuning of a derived path, with checkpoints after every epoch
//! and on interruption, and exact resumption.
//!
//! # Random streams (all from `eio_spec::rng`, so a resumed run draws exactly what an
//! uninterrupted one would)
//! * data order and augmentation of epoch e: `DataOrder` / `Augmentation` via
//!   `eio_data::EpochPlan`, indexed by the global epoch (counted over all phases); the crops
//!   and flips of source batch b come from `Augmentation` index e·2^32 + b
//!   (`eio_data::feed::augment_stream_index`);
//! * the target images x_t of Eq. 2 for epoch e: a permutation of the training set from
//!   `TargetPairing` (index e); batch b is distilled towards the images at positions
//!   b·B..(b+1)·B of it, as the authors and DVERGE pair two independently shuffled iterators
//!   over the same augmented loader. With `eio.target_augment` (and `data.augment`) each x_t
//!   gets its own crop and flip, drawn exactly as a source batch's (per image: top, left,
//!   flip) from `Augmentation` index [`TARGET_AUGMENTATION`] + e·2^32 + b: bit 63 is set, so it
//!   never meets a source batch's index (those stay below 2^63 for every epoch below 2^31), and
//!   it depends only on (e, b), so a run resumed at batch b draws what an uninterrupted one
//!   does;
//! * per iteration i (counted over all phases): the layer and paths of Algorithm 1 lines 11-12
//!   (`spec::sampler::draw_iteration`), the pre-training path of line 4 and the AdvT path of an
//!   RGN (`Gates`, index i), and the random starts of Eq. 2 and of training-time PGD
//!   (`DistillStart`, index i);
//! * the path of each epoch's accuracy pass of an RGN (on the hold-out, or on the test set
//!   when `data.validation = 0`): `Gates`, index [`VALIDATION_GATES`] + e (the authors draw one
//!   path per validation pass).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eio_data::feed::{augment_image, augment_stream_index};
use eio_data::split::below;
use eio_data::{Augment, AugmentDraw, DataSplits, EpochPlan, Images};
use eio_spec::config::{Config, Method, PretrainSchedule};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::schedule::LrSchedule;
use eio_spec::Plan;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::attack::{Member, Target};
use crate::checkpoint::{
    configure_optimiser, phase_optimiser, Checkpoint, CheckpointError, EpochTotals, ModelKind,
    Phase, Progress,
};
use crate::method::{Batch, StepContext};
use crate::state::ModelState;
use crate::EngineError;

/// First `Gates` stream index of the per-epoch validation paths (far above any iteration).
pub const VALIDATION_GATES: u64 = 1 << 62;

/// Added to a batch's `Augmentation` stream index (`augment_stream_index(epoch, batch)`) for
/// the crops and flips of that batch's target images x_t (see the module docs).
pub const TARGET_AUGMENTATION: u64 = 1 << 63;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
    #[error("Algorithm 1 path sampling failed")]
    Sampler(#[from] eio_spec::sampler::SamplerError),
    #[error("cannot build the model")]
    Plan(#[from] eio_spec::plan::PlanError),
    #[error("{0}")]
    Setup(String),
}

/// One line of `metrics.jsonl`: what an epoch did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub phase: Phase,
    /// Epoch within the phase (0-based).
    pub epoch: usize,
    /// Epoch over all phases (0-based).
    pub global_epoch: usize,
    pub lr: f64,
    /// Mean training loss (clean CE; for EIO, the mean over paths of L_i of Eq. 4).
    pub loss: f64,
    /// Training accuracy of the clean steps, when there were any.
    pub train_accuracy: Option<f64>,
    /// Mean Eq. 2 feature loss at the last distillation step (EIO only).
    pub distill_loss: Option<f64>,
    pub sign_ties: usize,
    /// Accuracy on the validation hold-out (eval-mode BN; an RGN on one random path, an
    /// ensemble through the mean softmax); None when `data.validation = 0`.
    pub validation_accuracy: Option<f64>,
    /// Accuracy on the test set, measured the same way, when there is no hold-out
    /// (`data.validation = 0`: training uses every training image, and the per-epoch accuracy
    /// is the test accuracy, as in the authors' and DVERGE's logs); None with a hold-out.
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    pub images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// What one batch did, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchEvent {
    pub phase: Phase,
    pub epoch: usize,
    pub batch: usize,
    pub batches: usize,
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub images_per_second: f64,
}

/// What to do after an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop as if interrupted (the epoch's checkpoint is written before training returns).
    Stop,
}

/// Receives progress; the binary draws bars and appends `metrics.jsonl` here.
pub trait Observer {
    /// A phase starts or resumes at `epoch` of `epochs`, `batches` per epoch.
    fn phase(&mut self, phase: Phase, epoch: usize, epochs: usize, batches: usize);
    fn batch(&mut self, event: &BatchEvent);
    /// An epoch finished; its checkpoint is written right after this returns (so a record
    /// appended here is never lost to a kill: resuming re-runs the epoch from the previous
    /// checkpoint, and `experiment::train_in` drops records of epochs not in the checkpoint).
    ///
    /// # Errors
    /// The observer's own failure (e.g. cannot append metrics), which ends the run before the
    /// epoch's checkpoint is written.
    fn epoch(&mut self, record: &EpochRecord) -> Result<Flow, TrainError>;
    /// Something the user should know (a repair of the run folder); printed to stderr by
    /// default.
    fn note(&mut self, message: &str) {
        eprintln!("{message}");
    }
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every phase ran; the checkpoint's phase is [`Phase::Done`].
    Finished,
    /// Stopped by the interrupt flag or the observer; the checkpoint can be resumed.
    Interrupted,
}

/// Where a run writes its checkpoint.
pub trait Persist {
    /// Writes the checkpoint (atomically).
    ///
    /// # Errors
    /// As [`Checkpoint::save`].
    fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError>;
}

impl Persist for std::path::PathBuf {
    fn save(&mut self, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
        checkpoint.save(self)
    }
}

/// The phases a config's method runs, with their epoch counts.
pub fn phases(config: &Config) -> Vec<(Phase, usize)> {
    match config.train.method {
        Method::Eio => vec![
            (Phase::Pretrain, config.eio.pretrain_epochs),
            (Phase::Main, config.train.epochs),
        ],
        _ => vec![(Phase::Main, config.train.epochs)],
    }
}

fn first_phase(phases: &[(Phase, usize)]) -> Phase {
    phases
        .iter()
        .find(|(_, n)| *n > 0)
        .map_or(Phase::Done, |(p, _)| *p)
}

/// A fresh training checkpoint for `config`: members initialised from the `Init` stream
/// (member m of a baseline ensemble from index m), optimisers without momentum yet.
///
/// # Errors
/// [`TrainError::Setup`] when the method and model disagree (a baseline must be a plain
/// network, `model.n = 1`); a device error.
pub fn start(config: &Config, device: &Device, dtype: DType) -> Result<Checkpoint, TrainError> {
    let plan = config.plan()?;
    let method = config.train.method;
    let members = if method.is_ensemble() {
        if config.model.n != 1 {
            return Err(TrainError::Setup(format!(
                "train.method = \"{}\" trains plain networks: set model.n = 1 (it is {})",
                eio_spec::rivals::method_name(method),
                config.model.n
            )));
        }
        config.train.ensemble_size
    } else {
        1
    };
    let seeds = Seeds::new(config.seed);
    let states = if method == Method::Dverge && !config.dverge.init_from.is_empty() {
        initial_ensemble(config, device, dtype)?
    } else {
        (0..members)
            .map(|m| ModelState::init(&plan, &seeds, m as u64, device, dtype))
            .collect::<Result<Vec<_>, _>>()?
    };
    let phase = first_phase(&phases(config));
    let optimisers = (0..members)
        .map(|_| phase_optimiser(config, phase, config.train.lr))
        .collect();
    Ok(Checkpoint::new(
        config,
        ModelKind::Network,
        states,
        optimisers,
        Progress::start(phase),
        dtype,
    ))
}

/// DVERGE's `--init-from`: the members of the trained ensemble at `dverge.init_from`, which
/// must hold `train.ensemble_size` members of the same model.
fn initial_ensemble(
    config: &Config,
    device: &Device,
    dtype: DType,
) -> Result<Vec<ModelState>, TrainError> {
    let path = std::path::Path::new(&config.dverge.init_from);
    let from = Checkpoint::load(path, device, Some(dtype))?;
    let stored = &from.meta.config;
    if stored.model != config.model {
        let differences = crate::checkpoint::config_differences(stored, config)
            .into_iter()
            .filter(|d| d.starts_with("model."))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(TrainError::Setup(format!(
            "dverge.init_from = {}: its model differs from this run's: {differences}",
            path.display()
        )));
    }
    if from.members.len() != config.train.ensemble_size {
        return Err(TrainError::Setup(format!(
            "dverge.init_from = {}: it holds {} member(s), train.ensemble_size is {}",
            path.display(),
            from.members.len(),
            config.train.ensemble_size
        )));
    }
    Ok(from.members)
}

/// A fine-tuning checkpoint for a derived single-path network (`config.model.n` must be 1):
/// `derive.finetune_epochs` epochs of clean training at the `derive` learning rates.
pub fn start_finetune(
    config: &Config,
    model: ModelKind,
    state: ModelState,
    dtype: DType,
) -> Checkpoint {
    let phase = if config.derive.finetune_epochs > 0 {
        Phase::Finetune
    } else {
        Phase::Done
    };
    Checkpoint::new(
        config,
        model,
        vec![state],
        vec![phase_optimiser(config, Phase::Finetune, config.derive.lr)],
        Progress::start(phase),
        dtype,
    )
}

fn epochs_of(config: &Config, phase: Phase) -> usize {
    match phase {
        Phase::Pretrain => config.eio.pretrain_epochs,
        Phase::Main => config.train.epochs,
        Phase::Finetune => config.derive.finetune_epochs,
        Phase::Done => 0,
    }
}

fn next_phase(config: &Config, phase: Phase) -> Phase {
    let order: Vec<Phase> = match phase {
        Phase::Finetune => vec![],
        _ => phases(config).into_iter().map(|(p, _)| p).collect(),
    };
    order
        .iter()
        .skip_while(|&&p| p != phase)
        .skip(1)
        .find(|&&p| epochs_of(config, p) > 0)
        .copied()
        .unwrap_or(Phase::Done)
}

/// The learning rate of epoch `epoch` of `phase`: pre-training on `train`'s schedule from its
/// own epoch 0 (`eio.pretrain_schedule = "step"`, the authors' warm-up) or at `train.lr`
/// (`"constant"`), the main phase on `train`'s schedule, fine-tuning on `derive.lr` with
/// `derive.milestones`.
pub fn learning_rate(config: &Config, phase: Phase, epoch: usize) -> f64 {
    match phase {
        Phase::Pretrain => match config.eio.pretrain_schedule {
            PretrainSchedule::Step => config.train.schedule().lr(epoch),
            PretrainSchedule::Constant => config.train.lr,
        },
        Phase::Main => config.train.schedule().lr(epoch),
        Phase::Finetune => LrSchedule {
            base: config.derive.lr,
            milestones: config.derive.milestones.clone(),
            gamma: config.train.lr_gamma,
            warmup_epochs: 0,
        }
        .lr(epoch),
        Phase::Done => 0.0,
    }
}

/// Host pixels and labels as device tensors `[N, C, H, W]` and `[N]` (u32).
///
/// # Errors
/// A device error.
pub fn to_tensors(
    pixels: Vec<f32>,
    labels: Vec<u32>,
    images: &Images,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = labels.len();
    let s = &images.shape;
    let x =
        Tensor::from_vec(pixels, (n, s.channels, s.height, s.width), device)?.to_dtype(dtype)?;
    let y = Tensor::from_vec(labels, n, device)?;
    Ok((x, y))
}

/// Images `range` of `images` as device tensors `[n, C, H, W]` and `[n]` (u32): only these
/// images are converted to f32 in [0, 1] (`byte / 255`, [`eio_data::unit`]), so a whole data
/// set is never held as f32.
///
/// # Errors
/// A device error.
///
/// # Panics
/// When `range` is not within `0..images.len()`.
pub fn range_tensors(
    images: &Images,
    range: std::ops::Range<usize>,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let labels = images.labels[range.clone()].to_vec();
    to_tensors(images.unit_range(range), labels, images, device, dtype)
}

/// Runs `work(b)` for the batches `0..batches` on `threads` loops at once on rayon's pool (the
/// pool the kernels split their loops over), and hands each result to `done` in batch order,
/// on the calling thread.
///
/// Each loop takes the next batch not yet taken until none is left, so a loop that finishes
/// early starts the next batch at once (no waiting for the slowest batch of a group), and at
/// most `threads` batches are in flight, so the memory stays that of `threads` batches. With
/// the cores shared between batches, ops that run on one core keep every core busy. The
/// calling thread runs one of the loops and hands on the results ready so far after each of
/// its batches (so `done` may come in bursts), then the rest.
///
/// # Errors
/// The error of the first batch in batch order that fails, or the first error of `done`; no
/// batch is started after an error, and no later result is handed on.
pub fn batches_in_parallel<T: Send, E: Send>(
    batches: usize,
    threads: usize,
    work: impl Fn(usize) -> Result<T, E> + Sync,
    mut done: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E> {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Mutex<Vec<Option<Result<T, E>>>> = Mutex::new((0..batches).map(|_| None).collect());
    let take = |slot: &mut Option<Result<T, E>>| slot.take();
    // One loop: batches until none is left or one has failed.
    let run_loop = |after_each: &mut dyn FnMut()| loop {
        if failed.load(Ordering::SeqCst) {
            break;
        }
        let b = next.fetch_add(1, Ordering::SeqCst);
        if b >= batches {
            break;
        }
        let result = work(b);
        if result.is_err() {
            failed.store(true, Ordering::SeqCst);
        }
        slots.lock().unwrap_or_else(|e| e.into_inner())[b] = Some(result);
        after_each();
    };
    let mut handed = 0;
    let mut outcome: Result<(), E> = Ok(());
    // Hands on the results ready from batch `handed` on, in order, stopping at an error.
    let mut flush = |handed: &mut usize, outcome: &mut Result<(), E>| {
        while outcome.is_ok() && *handed < batches {
            let ready = take(&mut slots.lock().unwrap_or_else(|e| e.into_inner())[*handed]);
            let Some(result) = ready else { break };
            *outcome = result.and_then(|value| done(*handed, value));
            if outcome.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            *handed += 1;
        }
    };
    rayon::in_place_scope(|scope| {
        for _ in 1..threads.max(1) {
            scope.spawn(|_| run_loop(&mut || {}));
        }
        run_loop(&mut || flush(&mut handed, &mut outcome));
    });
    flush(&mut handed, &mut outcome);
    outcome
}

/// Accuracy of `target` on `images`, in batches of `batch_size` (a randomised target draws
/// its paths from `rng`, batch after batch). A fixed target's batches run concurrently on the
/// kernels' thread pool, as many at a time as the pool has threads
/// ([`batches_in_parallel`]; the count does not depend on the order), so every core is busy
/// even in the ops that run on one, and only those batches are held as f32.
///
/// # Errors
/// A device error.
pub fn accuracy<R: rand::Rng + ?Sized>(
    target: &Target<'_>,
    images: &Images,
    batch_size: usize,
    device: &Device,
    dtype: DType,
    rng: &mut R,
) -> candle_core::Result<f64> {
    let n = images.len();
    if n == 0 {
        return Ok(0.0);
    }
    let size = batch_size.max(1);
    let correct_in = |b: usize, rng: &mut dyn rand::RngCore| -> candle_core::Result<usize> {
        let range = b * size..((b + 1) * size).min(n);
        let (x, _) = range_tensors(images, range.clone(), device, dtype)?;
        let predicted = target.predict(&x, rng)?;
        Ok(predicted
            .iter()
            .zip(&images.labels[range])
            .filter(|(p, &y)| **p == y as usize)
            .count())
    };
    let batches = n.div_ceil(size);
    let mut correct = 0;
    if matches!(target, Target::Randomised { .. }) {
        for b in 0..batches {
            let mut rng: &mut R = &mut *rng;
            correct += correct_in(b, &mut rng)?;
        }
    } else {
        // A fixed target draws nothing; each batch gets a generator it never reads.
        batches_in_parallel(
            batches,
            rayon::current_num_threads(),
            |b| {
                let mut unread = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
                correct_in(b, &mut unread)
            },
            |_, c| {
                correct += c;
                Ok(())
            },
        )?;
    }
    Ok(correct as f64 / n as f64)
}

/// The per-epoch accuracy of a checkpoint's model(s): `(validation, test)`, on the hold-out
/// when there is one, else on the test set (never both, and neither when the set is empty).
fn epoch_accuracy(
    checkpoint: &Checkpoint,
    plan: &Plan,
    data: &DataSplits,
    device: &Device,
    dtype: DType,
    global_epoch: usize,
) -> candle_core::Result<(Option<f64>, Option<f64>)> {
    if data.validation.is_empty() {
        let test = measure(checkpoint, plan, &data.test, device, dtype, global_epoch)?;
        return Ok((None, test));
    }
    let validation = measure(
        checkpoint,
        plan,
        &data.validation,
        device,
        dtype,
        global_epoch,
    )?;
    Ok((validation, None))
}

/// Accuracy of a checkpoint's model(s) on `images` (eval-mode BN; an RGN on the epoch's
/// random path from `Gates` index [`VALIDATION_GATES`] + epoch; an ensemble through the mean
/// softmax); None for no images.
fn measure(
    checkpoint: &Checkpoint,
    plan: &Plan,
    images: &Images,
    device: &Device,
    dtype: DType,
    global_epoch: usize,
) -> candle_core::Result<Option<f64>> {
    if images.is_empty() {
        return Ok(None);
    }
    let config = &checkpoint.meta.config;
    let seeds = Seeds::new(config.seed);
    let zeros = Checkpoint::plain_path(plan);
    let path = if config.model.n > 1 {
        plan.path_space()
            .sample(&mut seeds.stream(Stream::Gates, VALIDATION_GATES + global_epoch as u64))
    } else {
        zeros
    };
    let members: Vec<Member<'_>> = checkpoint
        .members
        .iter()
        .map(|state| Member {
            plan,
            state,
            path: &path,
        })
        .collect();
    let target = Target::of_members(members);
    let mut unused = seeds.stream(Stream::Gates, VALIDATION_GATES - 1);
    accuracy(
        &target,
        images,
        config.eval.batch_size,
        device,
        dtype,
        &mut unused,
    )
    .map(Some)
}

/// Runs (or continues) the training in `checkpoint` until every phase is done, saving the
/// checkpoint through `persist` after every epoch and when stopped. `interrupt` is polled
/// after every batch (Ctrl-C sets it).
///
/// # Errors
/// A device, sampling, checkpoint or observer error.
pub fn train(
    checkpoint: &mut Checkpoint,
    data: &DataSplits,
    device: &Device,
    observer: &mut dyn Observer,
    persist: &mut dyn Persist,
    interrupt: &AtomicBool,
) -> Result<Outcome, TrainError> {
    let config = checkpoint.meta.config.clone();
    let plan = config.plan()?;
    let dtype = checkpoint.dtype();
    let seeds = Seeds::new(config.seed);
    let batch_size = config.train.batch_size;
    while checkpoint.meta.progress.phase != Phase::Done {
        let progress = checkpoint.meta.progress;
        let phase = progress.phase;
        let epochs = epochs_of(&config, phase);
        let epoch_plan =
            EpochPlan::new(data.train.len(), batch_size, progress.global_epoch, &seeds);
        let batches = epoch_plan.batches();
        observer.phase(phase, progress.epoch, epochs, batches);
        let lr = learning_rate(&config, phase, progress.epoch);
        // The whole optimiser setting per phase (fine-tuning has its own Nesterov switch), so
        // an optimiser made elsewhere for this checkpoint steps as the phase says.
        for opt in &mut checkpoint.optimisers {
            configure_optimiser(opt, &config, phase, lr);
        }
        let method = crate::method::for_phase(config.train.method, phase);
        let target_augment =
            Augment::from_config(&config.data).filter(|_| config.eio.target_augment);
        let targets = if method.needs_targets() {
            let mut order: Vec<usize> = (0..data.train.len()).collect();
            order.shuffle(&mut seeds.stream(Stream::TargetPairing, progress.global_epoch as u64));
            order
        } else {
            Vec::new()
        };
        for b in progress.batch..batches {
            let started = Instant::now();
            let batch = epoch_plan.batch(&data.train, b, Augment::from_config(&config.data));
            let n = batch.labels.len();
            let (x, y) = to_tensors(batch.pixels, batch.labels, &data.train, device, dtype)?;
            let iteration = checkpoint.meta.progress.iteration;
            let target = if targets.is_empty() {
                None
            } else {
                let start = b * batch_size;
                let idx: Vec<usize> = (0..n)
                    .map(|k| targets[(start + k) % targets.len()])
                    .collect();
                let mut t = data.train.subset(&idx);
                if let Some(aug) = target_augment {
                    let index =
                        TARGET_AUGMENTATION | augment_stream_index(progress.global_epoch, b);
                    augment_targets(&mut t, aug, &mut seeds.stream(Stream::Augmentation, index));
                }
                Some(to_tensors(t.unit_pixels(), t.labels, &data.train, device, dtype)?.0)
            };
            let ctx = StepContext {
                config: &config,
                plan: &plan,
                seeds: &seeds,
                phase,
                epoch: progress.epoch,
                epochs,
                global_epoch: progress.global_epoch as u64,
                iteration,
            };
            let r = method.step(&ctx, checkpoint, Batch { x, y, target })?;
            let seconds = started.elapsed().as_secs_f64();
            let totals = &mut checkpoint.meta.progress.totals;
            totals.loss_sum += r.loss * n as f64;
            totals.images += n;
            totals.seconds += seconds;
            totals.sign_ties += r.sign_ties;
            totals.correct += r.correct;
            totals.counted += r.counted;
            if let Some(d) = r.distill {
                totals.distill_sum += d * n as f64;
            }
            checkpoint.meta.progress.batch = b + 1;
            checkpoint.meta.progress.iteration += 1;
            observer.batch(&BatchEvent {
                phase,
                epoch: progress.epoch,
                batch: b,
                batches,
                loss: r.loss,
                accuracy: (r.counted > 0).then(|| r.correct as f64 / r.counted as f64),
                images_per_second: n as f64 / seconds.max(1e-9),
            });
            if interrupt.load(Ordering::SeqCst) && b + 1 < batches {
                persist.save(checkpoint)?;
                return Ok(Outcome::Interrupted);
            }
        }
        let totals = checkpoint.meta.progress.totals;
        let (validation_accuracy, test_accuracy) = epoch_accuracy(
            checkpoint,
            &plan,
            data,
            device,
            dtype,
            progress.global_epoch,
        )?;
        let images = totals.images.max(1) as f64;
        let record = EpochRecord {
            phase,
            epoch: progress.epoch,
            global_epoch: progress.global_epoch,
            lr,
            loss: totals.loss_sum / images,
            train_accuracy: (totals.counted > 0)
                .then(|| totals.correct as f64 / totals.counted as f64),
            distill_loss: (totals.distill_sum != 0.0).then(|| totals.distill_sum / images),
            sign_ties: totals.sign_ties,
            validation_accuracy,
            test_accuracy,
            images: totals.images,
            seconds: totals.seconds,
            images_per_second: totals.images as f64 / totals.seconds.max(1e-9),
        };
        let next = &mut checkpoint.meta.progress;
        next.totals = EpochTotals::default();
        next.batch = 0;
        next.global_epoch += 1;
        next.epoch += 1;
        if next.epoch >= epochs {
            next.phase = next_phase(&config, phase);
            next.epoch = 0;
        }
        // The record first, then the checkpoint: a run killed in between resumes from the
        // previous checkpoint, re-runs this epoch and drops this record on resume (so no record
        // is ever lost, and none is duplicated).
        let flow = observer.epoch(&record)?;
        checkpoint.meta.last_record = serde_json::to_string(&record).ok();
        persist.save(checkpoint)?;
        if checkpoint.meta.progress.phase != Phase::Done
            && (flow == Flow::Stop || interrupt.load(Ordering::SeqCst))
        {
            return Ok(Outcome::Interrupted);
        }
    }
    Ok(Outcome::Finished)
}

/// The crop and flip draws of `n` images from `rng`, in image order, as
/// `eio_data::EpochPlan::augment_draws` makes them for a source batch: per image the crop's
/// top offset, its left offset (each uniform in 0..=2·padding) and the flip (`below(2) == 1`).
pub fn augment_draws<R: rand::RngCore + ?Sized>(
    n: usize,
    augment: Augment,
    rng: &mut R,
) -> Vec<AugmentDraw> {
    let span = 2 * augment.padding as u64 + 1;
    (0..n)
        .map(|_| {
            let top = below(rng, span) as usize;
            let left = below(rng, span) as usize;
            let flip = below(rng, 2) == 1;
            AugmentDraw {
                top,
                left,
                flip: augment.flip && flip,
            }
        })
        .collect()
}

/// Crops and flips every image of `images` in place with draws from `rng`
/// ([`augment_draws`]), on the stored bytes (the same values as cropping the converted f32
/// pixels, see [`augment_image`]).
fn augment_targets<R: rand::RngCore + ?Sized>(images: &mut Images, augment: Augment, rng: &mut R) {
    let shape = images.shape;
    let l = shape.len();
    let draws = augment_draws(images.len(), augment, rng);
    let mut out = vec![0u8; l];
    for (k, draw) in draws.into_iter().enumerate() {
        augment_image(images.image(k), shape, augment.padding, draw, &mut out);
        images.pixels[k * l..(k + 1) * l].copy_from_slice(&out);
    }
}

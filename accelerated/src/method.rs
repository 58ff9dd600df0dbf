//! One training batch of any method, behind one trait: the training loop ([`crate::train`])
//! asks [`for_phase`] for the phase's method and calls [`TrainingMethod::step`], so a new
//! method is a new implementation here (adapting its module's iteration function), never a
//! new branch in the loop.
//!
//! Random draws of a batch come from `eio_spec::rng` streams indexed by the global iteration
//! or epoch (see [`crate::train`]'s module docs), so a resumed run draws what an
//! uninterrupted one does.

use candle_core::Tensor;
use eio_spec::config::{Config, Method, UnusedParams};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::sampler::{draw_iteration, draw_layer};
use eio_spec::{Path, Plan};

use crate::attack::{pgd_train_mode, AttackSettings};
use crate::checkpoint::{Checkpoint, Phase};
use crate::eio::{clean_step, eq4_iteration, EioBatch};
use crate::ensemble::MethodReport;
use crate::optim::{Optimiser, Sgd};
use crate::train::TrainError;

/// A training batch: source images, labels (u32) and, for methods that distil, the target
/// images x_t paired with them.
#[derive(Debug, Clone)]
pub struct Batch {
    pub x: Tensor,
    pub y: Tensor,
    pub target: Option<Tensor>,
}

/// Where in training a batch is, and the settings it runs under.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    pub config: &'a Config,
    pub plan: &'a Plan,
    pub seeds: &'a Seeds,
    pub phase: Phase,
    /// Epoch within the phase (0-based).
    pub epoch: usize,
    /// Epochs of the phase.
    pub epochs: usize,
    /// Epoch over all phases (0-based).
    pub global_epoch: u64,
    /// Batches run before this one, over all phases.
    pub iteration: u64,
}

impl StepContext<'_> {
    /// The path of a one-path step: a random path of an RGN (`Gates`, index: iteration;
    /// Algorithm 1 line 4), or a plain network's only path.
    pub fn path(&self) -> Path {
        if self.config.model.n > 1 {
            self.plan
                .path_space()
                .sample(&mut self.seeds.stream(Stream::Gates, self.iteration))
        } else {
            Checkpoint::plain_path(self.plan)
        }
    }

    /// The batch's generator for random starts (Eq. 2, training-time PGD): `DistillStart`,
    /// index: iteration.
    pub fn starts(&self) -> rand_chacha::ChaCha8Rng {
        self.seeds.stream(Stream::DistillStart, self.iteration)
    }
}

/// What one batch did, summed into the epoch's record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepResult {
    /// The method's training loss of the batch.
    pub loss: f64,
    /// Images classified correctly by the trained models before the update (clean steps).
    pub correct: usize,
    /// Predictions counted in `correct`.
    pub counted: usize,
    /// Mean feature-matching loss of the last distillation step (EIO, DVERGE).
    pub distill: Option<f64>,
    pub sign_ties: usize,
}

impl From<&MethodReport> for StepResult {
    fn from(r: &MethodReport) -> Self {
        StepResult {
            loss: r.loss,
            correct: 0,
            counted: 0,
            distill: r.distill_loss,
            sign_ties: r.sign_ties,
        }
    }
}

/// A training method: what one batch of its phase does to the checkpoint's members and
/// optimisers.
pub trait TrainingMethod: Sync {
    /// Whether the batch needs target images x_t (EIO's and DVERGE's distillation).
    fn needs_targets(&self) -> bool {
        false
    }

    /// Runs one batch.
    ///
    /// # Errors
    /// A device or sampling error.
    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError>;
}

/// The method that runs `phase` of a `method` run: clean training for pre-training,
/// fine-tuning and baseline ensembles; the method's own step for the main phase otherwise.
pub fn for_phase(method: Method, phase: Phase) -> &'static dyn TrainingMethod {
    match (phase, method) {
        (Phase::Main, Method::Eio) => &Eio,
        (Phase::Main, Method::Advt) => &Advt,
        (Phase::Main, Method::Dverge) => &Dverge,
        (Phase::Main, Method::Adp) => &Adp,
        (Phase::Main, Method::Gal) => &Gal,
        (Phase::Main, Method::Trs) => &Trs,
        _ => &Clean,
    }
}

/// Clean cross-entropy training of every member on the batch, each with its own optimiser
/// step: EIO's pre-training (one random RGN path per batch, `eio.unused_params`), baseline
/// ensembles and fine-tuning (the plain path, every parameter steps).
struct Clean;

impl TrainingMethod for Clean {
    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let n = batch.y.dims1()?;
        let (path, unused) = match ctx.phase {
            Phase::Pretrain => (ctx.path(), ctx.config.eio.unused_params),
            _ => (Checkpoint::plain_path(ctx.plan), UnusedParams::Step),
        };
        let m = checkpoint.members.len() as f64;
        let mut result = StepResult {
            loss: 0.0,
            correct: 0,
            counted: 0,
            distill: None,
            sign_ties: 0,
        };
        for (state, opt) in checkpoint
            .members
            .iter_mut()
            .zip(checkpoint.optimisers.iter_mut())
        {
            let r = clean_step(
                ctx.plan,
                state,
                sgd_of(opt)?,
                &path,
                &batch.x,
                &batch.y,
                unused,
            )?;
            result.loss += r.loss / m;
            result.correct += r.correct;
            result.counted += n;
        }
        Ok(result)
    }
}

/// Algorithm 1 lines 11-24 (`crate::eio::eq4_iteration`).
struct Eio;

impl TrainingMethod for Eio {
    fn needs_targets(&self) -> bool {
        true
    }

    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let config = ctx.config;
        let draw = draw_iteration(
            ctx.plan,
            &config.eio,
            ctx.seeds,
            ctx.global_epoch,
            ctx.iteration,
        )?;
        let target = batch.target.ok_or_else(|| missing_targets("eio"))?;
        let report = eq4_iteration(
            ctx.plan,
            &mut checkpoint.members[0],
            sgd_of(&mut checkpoint.optimisers[0])?,
            config,
            &EioBatch {
                source: batch.x,
                labels: batch.y,
                target,
            },
            &draw,
            &mut ctx.starts(),
        )?;
        let p = report.path_losses.len().max(1) as f64;
        Ok(StepResult {
            loss: report.path_losses.iter().sum::<f64>() / p,
            correct: 0,
            counted: 0,
            distill: Some(report.distill_losses.iter().sum::<f64>() / p),
            sign_ties: report.sign_ties,
        })
    }
}

/// Madry et al.: PGD examples made in train-mode BN (`train.adv`), then a clean step on them.
struct Advt;

impl TrainingMethod for Advt {
    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let (config, plan) = (ctx.config, ctx.plan);
        let n = batch.y.dims1()?;
        let path = ctx.path();
        let settings = AttackSettings::training(&config.train.adv, config.eval.cw_kappa);
        let (state, opt) = (&mut checkpoint.members[0], &mut checkpoint.optimisers[0]);
        let adv = pgd_train_mode(
            plan,
            state,
            &path,
            &batch.x,
            &batch.y,
            &settings,
            &mut ctx.starts(),
        )?;
        let r = clean_step(
            plan,
            state,
            sgd_of(opt)?,
            &path,
            &adv,
            &batch.y,
            config.eio.unused_params,
        )?;
        Ok(StepResult {
            loss: r.loss,
            correct: r.correct,
            counted: n,
            distill: None,
            sign_ties: 0,
        })
    }
}

/// DVERGE (`crate::dverge::dverge_iteration`) at the layer of `dverge.layer_schedule`.
struct Dverge;

impl TrainingMethod for Dverge {
    fn needs_targets(&self) -> bool {
        true
    }

    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let config = ctx.config;
        let layer = draw_layer(
            ctx.plan,
            config.dverge.layer_schedule,
            ctx.seeds,
            ctx.global_epoch,
            ctx.iteration,
        );
        let target = batch.target.ok_or_else(|| missing_targets("dverge"))?;
        let report = crate::dverge::dverge_iteration(
            ctx.plan,
            &mut checkpoint.members,
            &mut checkpoint.optimisers,
            config,
            &batch.x,
            &batch.y,
            &target,
            layer,
            &mut ctx.starts(),
        )?;
        Ok(StepResult::from(&report))
    }
}

/// ADP (`crate::adp::adp_iteration`).
struct Adp;

impl TrainingMethod for Adp {
    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let report = crate::adp::adp_iteration(
            ctx.plan,
            &mut checkpoint.members,
            &mut checkpoint.optimisers,
            ctx.config,
            &batch.x,
            &batch.y,
        )?;
        Ok(StepResult::from(&report))
    }
}

/// GAL (`crate::gal::gal_iteration`), its noise from `Noise`, index: iteration.
struct Gal;

impl TrainingMethod for Gal {
    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let report = crate::gal::gal_iteration(
            ctx.plan,
            &mut checkpoint.members,
            &mut checkpoint.optimisers,
            ctx.config,
            &batch.x,
            &batch.y,
            &mut ctx.seeds.stream(Stream::Noise, ctx.iteration),
        )?;
        Ok(StepResult::from(&report))
    }
}

/// TRS (`crate::trs::trs_iteration`) at the epoch's PGD radius (`TrsConfig::radius`).
struct Trs;

impl TrainingMethod for Trs {
    fn step(
        &self,
        ctx: &StepContext<'_>,
        checkpoint: &mut Checkpoint,
        batch: Batch,
    ) -> Result<StepResult, TrainError> {
        let radius = ctx.config.trs.radius(ctx.epoch, ctx.epochs);
        let report = crate::trs::trs_iteration(
            ctx.plan,
            &mut checkpoint.members,
            &mut checkpoint.optimisers,
            ctx.config,
            &batch.x,
            &batch.y,
            radius,
            &mut ctx.starts(),
        )?;
        Ok(StepResult::from(&report))
    }
}

/// The SGD of a method that steps with SGD only (EIO, AdvT, clean training; the config check
/// keeps `train.optimizer = "adam"` to the ensemble methods that use it).
fn sgd_of(optimiser: &mut Optimiser) -> Result<&mut Sgd, TrainError> {
    match optimiser {
        Optimiser::Sgd(sgd) => Ok(sgd),
        Optimiser::Adam(_) => Err(TrainError::Setup(
            "this phase trains with SGD, but the checkpoint holds an Adam optimiser".into(),
        )),
    }
}

fn missing_targets(method: &str) -> TrainError {
    TrainError::Setup(format!(
        "{method} needs target images x_t for every batch, and none were paired"
    ))
}

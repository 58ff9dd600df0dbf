//! The narrow interface both engines are driven through (wasmtime's `DiffEngine` idea): every
//! input and output is host data (`Vec<f64>`, names, seeds), so a test states a case once and
//! runs it on any engine, and an engine that cannot run a case says so with a [`Skip`].

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use eio_reference::attack::AttackSettings;
use eio_spec::attack::{DiversityDraw, Interpolation, SkipGradient};
use eio_spec::config::{AttackLoss, BnMode, Config, DistillConfig, EvalConfig};
use eio_spec::plan::NodeId;
use eio_spec::rng::Seeds;
use eio_spec::sampler::IterationDraw;
use eio_spec::verdict::Robustness;
use eio_spec::{Path, Plan};
use rand_chacha::ChaCha8Rng;

/// Every tensor of a model state by its plan name, row-major, counters as one value.
pub type Values = BTreeMap<String, Vec<f64>>;

/// A batch of images, `[N, C, H, W]` row-major, pixels in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub dims: [usize; 4],
    pub data: Vec<f64>,
}

impl Images {
    /// Number of images N.
    pub fn batch(&self) -> usize {
        self.dims[0]
    }
}

/// A case an engine cannot run (a device that is not there, a build without a feature). Tests
/// turn it into a visible "skipped: ..." line and a count, never into a silent pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub reason: String,
}

/// The result of asking an engine to run a case.
pub type Outcome<T> = Result<T, Skip>;

static SKIPPED: AtomicUsize = AtomicUsize::new(0);

impl Skip {
    /// A skip for `reason` (which should start with what is missing, e.g. "CUDA: ...").
    pub fn new(reason: impl Into<String>) -> Self {
        Skip {
            reason: reason.into(),
        }
    }

    /// Prints `skipped: <test>: <reason>` straight to the process's stderr (not through the
    /// test harness's capture, so it shows in a plain `cargo test`) and counts it.
    pub fn record(&self, test: &str) {
        let total = SKIPPED.fetch_add(1, Ordering::SeqCst) + 1;
        // One write of one line, so parallel tests do not interleave inside it.
        let line = format!(
            "\nskipped: {test}: {} (skip #{total} in this test binary)\n",
            self.reason
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// How many skips this test binary recorded so far.
pub fn skipped_count() -> usize {
    SKIPPED.load(Ordering::SeqCst)
}

/// `Some(value)`, or records the skip under `test` and gives `None`.
pub fn or_skip<T>(test: &str, outcome: Outcome<T>) -> Option<T> {
    match outcome {
        Ok(v) => Some(v),
        Err(skip) => {
            skip.record(test);
            None
        }
    }
}

/// What a forward pass produced.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The output of each requested node, row-major over the whole batch.
    pub outputs: BTreeMap<NodeId, Vec<f64>>,
    /// The state after the pass's running statistics were committed (train mode updates them;
    /// eval mode leaves the state as it was).
    pub state: Values,
}

/// A scalar objective whose gradients are compared.
#[derive(Debug, Clone)]
pub enum Objective {
    /// Batch-mean cross-entropy of the logits.
    CrossEntropy { labels: Vec<usize> },
    /// Batch-mean C&W margin loss of the logits (a large κ keeps every sample's margin
    /// active, so the gradient is not zero).
    CarliniWagner { labels: Vec<usize>, kappa: f64 },
    /// Mean squared error between the output of `node` and `target` (same shape).
    Mse { node: NodeId, target: Vec<f64> },
}

/// The objective's value and its gradients.
#[derive(Debug, Clone)]
pub struct Grads {
    pub loss: f64,
    /// The output the loss was computed from (the logits, or the feature of an MSE).
    pub output: Vec<f64>,
    /// dL/d(input), `[N, C, H, W]` row-major.
    pub input: Vec<f64>,
    /// dL/d(tensor) for the tensors the pass used, by name.
    pub params: BTreeMap<String, Vec<f64>>,
}

/// What the second-order pass of GAL and TRS produced (`second_order::input_gradient` and
/// `second_order::input_gradient_vjp`): L the batch-mean cross-entropy of the logits,
/// g = dL/d(input), and for s = ⟨g, v⟩ its gradients with respect to every tensor the pass used
/// and to the input.
#[derive(Debug, Clone)]
pub struct SecondOrder {
    pub loss: f64,
    /// The logits, `[N, classes]` row-major.
    pub logits: Vec<f64>,
    /// g = dL/d(input), `[N, C, H, W]` row-major.
    pub input_grad: Vec<f64>,
    /// ds/d(tensor) for the tensors the pass used, by name.
    pub params: BTreeMap<String, Vec<f64>>,
    /// ds/d(input), `[N, C, H, W]` row-major.
    pub input: Vec<f64>,
}

/// An optimiser and its hyper-parameters (PyTorch's SGD with dampening 0, or Adam).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimiser {
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    },
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

/// One optimiser step's gradients: a learnable tensor that is absent has a `None` gradient
/// (skipped by the optimiser).
pub type StepGrads = BTreeMap<String, Vec<f64>>;

/// What an Eq. 2 distillation produced.
#[derive(Debug, Clone)]
pub struct DistillRun {
    pub images: Images,
    /// The feature-matching loss before each step.
    pub losses: Vec<f64>,
    /// Entries whose step direction had |m| < 1e-12, summed over steps.
    pub sign_ties: usize,
    /// The state afterwards (train-mode BN updates running statistics).
    pub state: Values,
}

/// One EIO iteration's inputs (Algorithm 1 lines 11-24).
#[derive(Debug, Clone)]
pub struct EioIteration {
    pub source: Images,
    pub labels: Vec<usize>,
    pub target: Images,
    pub draw: IterationDraw,
    /// The distillation (and adversarial-term) random starts.
    pub rng: ChaCha8Rng,
}

/// What one EIO iteration reported.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationReport {
    pub layer: usize,
    pub paths: Vec<Path>,
    pub path_losses: Vec<f64>,
    pub distill_losses: Vec<f64>,
    pub sign_ties: usize,
}

/// A run of consecutive EIO iterations with one SGD (config.train) carried across them.
#[derive(Debug, Clone)]
pub struct EioRun {
    pub reports: Vec<IterationReport>,
    pub state: Values,
}

/// One member of an ensemble target.
#[derive(Debug, Clone, Copy)]
pub struct MemberSpec<'a> {
    pub plan: &'a Plan,
    pub values: &'a Values,
    pub path: &'a Path,
}

/// What an attack targets (`eio_reference::attack::Target` as host data).
#[derive(Debug, Clone)]
pub enum TargetSpec<'a> {
    Path {
        plan: &'a Plan,
        values: &'a Values,
        path: &'a Path,
        mode: BnMode,
    },
    Ensemble(Vec<MemberSpec<'a>>),
    Randomised {
        plan: &'a Plan,
        values: &'a Values,
        eot: usize,
    },
}

/// What an attack run (`pgd_run`) produced.
#[derive(Debug, Clone)]
pub struct AttackRun {
    /// The adversarial images.
    pub images: Images,
    /// Entries whose step direction had |d| < 1e-12, summed over steps.
    pub sign_ties: usize,
}

/// The white-box all-or-nothing evaluation's result.
#[derive(Debug, Clone, PartialEq)]
pub struct WhiteBox {
    pub clean_accuracy: f64,
    /// (ε, robustness) per ε.
    pub per_eps: Vec<(f64, Robustness)>,
}

/// One engine, driven with host data. Every method builds the engine's own model state from
/// `values`, so calls are independent; methods that change the state return it.
pub trait Engine {
    /// e.g. `reference-f64`, `accelerated-f32-cpu`.
    fn name(&self) -> String;

    /// Forward along `path` up to the largest of `nodes`, returning those nodes' outputs.
    fn forward(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        images: &Images,
        mode: BnMode,
        nodes: &[NodeId],
    ) -> Outcome<Forward>;

    /// The objective along `path` and its gradients with respect to the input and to every
    /// tensor the pass used.
    fn gradients(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        images: &Images,
        mode: BnMode,
        objective: &Objective,
    ) -> Outcome<Grads>;

    /// The cross-entropy of the logits along `path` (BN in `mode`) against `labels`, its
    /// input gradient g, and the gradients of s = ⟨g, `v`⟩ (`v` the images' shape) with respect
    /// to every tensor the pass used and to the input (`second_order`). The running statistics
    /// of a train-mode pass are not committed.
    #[allow(clippy::too_many_arguments)]
    fn second_order(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        images: &Images,
        labels: &[usize],
        v: &Images,
        mode: BnMode,
    ) -> Outcome<SecondOrder>;

    /// Runs `optimiser` over the plan's learnable tensors (initial values `params`) for one
    /// step per entry of `steps`, returning the learnable tensors after each step.
    fn optimise(
        &self,
        plan: &Plan,
        optimiser: Optimiser,
        params: &Values,
        steps: &[StepGrads],
    ) -> Outcome<Vec<Values>>;

    /// Eq. 2 (`eq2_distill`) for `path` at layer `layer`.
    #[allow(clippy::too_many_arguments)]
    fn distill(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        layer: usize,
        x_t: &Images,
        x_s: &Images,
        config: &DistillConfig,
        rng: ChaCha8Rng,
    ) -> Outcome<DistillRun>;

    /// Consecutive `eq4_iteration`s with the SGD of `config.train` carried across them.
    fn eio(
        &self,
        plan: &Plan,
        config: &Config,
        values: &Values,
        iterations: &[EioIteration],
    ) -> Outcome<EioRun>;

    /// Algorithm 1 lines 4-5: one `pretrain_iteration` per batch (path, images, labels), with
    /// the SGD of `config.train` carried across them and `config.eio.unused_params`; the
    /// losses and the state afterwards.
    fn pretrain(
        &self,
        plan: &Plan,
        config: &Config,
        values: &Values,
        batches: &[(Path, Images, Vec<usize>)],
    ) -> Outcome<(Vec<f64>, Values)>;

    /// Reads the safetensors checkpoint at `from` (written by any engine) for `plan` and
    /// writes it again to `to`.
    fn reload(&self, plan: &Plan, from: &std::path::Path, to: &std::path::Path) -> Outcome<()>;

    /// `Target::loss_and_input_grad` at `images`, with SGM's backward when `skip` is set.
    #[allow(clippy::too_many_arguments)]
    fn attack_loss(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        loss: AttackLoss,
        kappa: f64,
        skip: Option<&SkipGradient>,
        rng: ChaCha8Rng,
    ) -> Outcome<(f64, Vec<f64>)>;

    /// `Target::predict`.
    fn predict(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        rng: ChaCha8Rng,
    ) -> Outcome<Vec<usize>>;

    /// `pgd_run`: the adversarial images and the sign ties counted on the way (plain PGD,
    /// momentum, input diversity and SGM, as `settings` says).
    fn pgd(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        settings: &AttackSettings,
        rng: ChaCha8Rng,
    ) -> Outcome<AttackRun>;

    /// `input_diversity`: the DI²-FGSM transform of `images` for one draw.
    fn input_diversity(
        &self,
        images: &Images,
        draw: &DiversityDraw,
        interpolation: Interpolation,
    ) -> Outcome<Images>;

    /// `input_diversity_backward`: the transform's adjoint applied to `grad` (image-shaped).
    fn input_diversity_backward(
        &self,
        grad: &Images,
        draw: &DiversityDraw,
        interpolation: Interpolation,
    ) -> Outcome<Images>;

    /// `white_box`.
    fn white_box(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        config: &EvalConfig,
        seeds: &Seeds,
    ) -> Outcome<WhiteBox>;
}

//! Every setting of an eio run, read from TOML and checked before anything runs.
//!
//! The defaults ([`Config::default`]) are the paper's text (`configs/paper.toml` spells them
//! out). Where the authors' public code departs from the text (protocols.md), the departure is
//! a field here and `configs/official.toml` selects it; `spec/SPEC.md` lists each one.
//! Where the paper is silent, the default is what it inherits (DVERGE's code for the
//! distillation and evaluation, the authors' code for E_w and the data split) and the field's
//! doc says so. Every field of every preset has a row (value and source) in `spec/SPEC.md`,
//! section "Presets and their sources"; `spec/tests/preset_sources.rs` parses those tables and
//! fails when a preset drifts from them or a field has no row.
//!
//! Reading: [`Config::from_toml`] and [`Config::load`] reject unknown fields and report the
//! file, line and column of a syntax or type error; [`Config::validate`] then reports every
//! value that is out of range as `field.path: value rule`, for example
//! `distill.eps: 1.5 is outside (0, 1]`. [`Config::with_overrides`] applies `key=value`
//! assignments (the command line's `--set`).

use std::fmt;
use std::path::{Path as FsPath, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::{FeatureSite, Plan};
pub use crate::rivals::{AdamSettings, AdpConfig, DvergeConfig, GalConfig, Optimizer, TrsConfig};
use crate::sampler::Infeasible;
use crate::schedule::LrSchedule;

/// CIFAR-10 per-channel mean (protocols.md).
pub const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 per-channel standard deviation (protocols.md).
pub const CIFAR10_STD: [f64; 3] = [0.2023, 0.1994, 0.2010];

/// A whole run's settings.
/// Every field defaults to the paper's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Master seed of every random stream ([`crate::rng::Seeds`]). Default 0.
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub eio: EioConfig,
    pub distill: DistillConfig,
    pub eval: EvalConfig,
    pub derive: DeriveConfig,
    pub blackbox: BlackboxConfig,
    pub run: RunConfig,
    pub dverge: DvergeConfig,
    pub adp: AdpConfig,
    pub gal: GalConfig,
    pub trs: TrsConfig,
}

/// Network families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// DVERGE's CIFAR ResNet-(6k+2) (ResNet-20 for depth 20).
    Resnet,
    /// CIFAR VGG-16 with BatchNorm.
    Vgg16,
}

/// Whether the n candidates of an RGB share the conv weight (protocols.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sharing {
    /// Paper, Sec. 3.2: "these repeated sub-layers are with different weight parameters".
    Independent,
    /// The authors' code and released checkpoint: one conv, n BatchNorms per RGB.
    SharedConv,
}

/// The non-linearity after each conv+BN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    Relu,
    /// LeakyReLU with `model.leaky_slope` (GAL's members).
    LeakyRelu,
}

/// Which VGG-16 layers are RGBs. The paper says VGG-16 has 14 RGBs; the CIFAR VGG-16 has 13
/// convs and one linear classifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VggGating {
    /// The 13 convs (K = 13).
    Convs,
    /// The 13 convs and the classifier (K = 14, the paper's count); needs independent weights.
    ConvsAndClassifier,
}

/// The network and its RGN augmentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Default `resnet`.
    pub arch: Arch,
    /// ResNet depth 6k+2, k >= 1. Default 20.
    pub depth: usize,
    /// Channel multiplier on the base widths (16/32/64, VGG 64..512). Default 1.0.
    pub width: f64,
    /// Candidates per RGB, the paper's augmentation factor n. Default 2.
    pub n: usize,
    /// Default `independent` (paper); `shared-conv` in the authors' code.
    pub sharing: Sharing,
    /// Number of classes. Default 10.
    pub classes: usize,
    /// Input channels. Default 3.
    pub in_channels: usize,
    /// Input height and width. Default 32.
    pub input_size: usize,
    /// Default `relu`.
    pub activation: Activation,
    /// Negative slope of `leaky-relu`. Default 0.1.
    pub leaky_slope: f64,
    /// Per-channel normalisation mean, applied inside the model. Default CIFAR-10's.
    pub mean: Vec<f64>,
    /// Per-channel normalisation std. Default CIFAR-10's.
    pub std: Vec<f64>,
    /// Default `convs`.
    pub vgg_gated: VggGating,
}

impl ModelConfig {
    /// The network's usual name: `ResNet-20`, `VGG-16`.
    pub fn name(&self) -> String {
        match self.arch {
            Arch::Resnet => format!("ResNet-{}", self.depth),
            Arch::Vgg16 => "VGG-16".into(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Resnet,
            depth: 20,
            width: 1.0,
            n: 2,
            sharing: Sharing::Independent,
            classes: 10,
            in_channels: 3,
            input_size: 32,
            activation: Activation::Relu,
            leaky_slope: 0.1,
            mean: CIFAR10_MEAN.to_vec(),
            std: CIFAR10_STD.to_vec(),
            vgg_gated: VggGating::Convs,
        }
    }
}

/// Dataset families (the readers are in the data module of the engines' issue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    Cifar10,
    Cifar100,
    Mnist,
    FashionMnist,
    /// `<split>/<class>/*` JPEG or PNG folders, or a `.tar.gz` of them.
    ImageFolder,
}

/// Where the images come from and how they are fed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Default `cifar10`.
    pub dataset: Dataset,
    /// Files or folder; unset means the dataset's usual place. Default unset.
    pub path: Option<PathBuf>,
    /// Training images held out for validation (seeded). Default 0: train on every training
    /// image, as the authors (`data_providers/cifar.py` trains on all 50,000 CIFAR-10 images and
    /// "validates" on the test set) and DVERGE (`utils.py` `get_loaders`) do. With 0 the
    /// per-epoch accuracy is measured on the test set and reported as test accuracy, never as
    /// validation; a hold-out (e.g. 10,000) is for model selection without touching the test set.
    pub validation: usize,
    /// Random crop with zero padding and horizontal flip on training images. Default true.
    pub augment: bool,
    /// Zero padding of the random crop. Default 4.
    pub crop_padding: usize,
    /// Train on a seeded subset of this many training images (after the validation hold-out;
    /// the held-out images do not change), for quick demos. A limit above the number of
    /// training images uses them all. Default unset (every training image).
    pub train_limit: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: Dataset::Cifar10,
            path: None,
            validation: 0,
            augment: true,
            crop_padding: 4,
            train_limit: None,
        }
    }
}

/// Training methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Standard training of `train.ensemble_size` independently initialised models.
    Baseline,
    /// Algorithm 1: clean pre-training, then vulnerability diversification.
    Eio,
    /// PGD adversarial training (Madry et al.) with `train.adv`.
    Advt,
    /// DVERGE (`[dverge]` and `[distill]`): cross-training on each other member's distilled
    /// non-robust features.
    Dverge,
    /// ADP (`[adp]`): ensemble entropy and the log-det of the members' non-true predictions.
    Adp,
    /// GAL (`[gal]`): coherence of the members' input gradients (second order).
    Gal,
    /// TRS (`[trs]`): gradient alignment and smoothness (second order).
    Trs,
}

impl Method {
    /// Whether the method trains an ensemble of `train.ensemble_size` plain networks.
    pub fn is_ensemble(self) -> bool {
        !matches!(self, Method::Eio | Method::Advt)
    }
}

/// L-inf PGD used inside training (AdvT, and EIO's optional adversarial term).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainPgdConfig {
    /// Radius in [0, 1] pixel units. Default 8/255.
    pub eps: f64,
    /// Step size. Default 2/255.
    pub step_size: f64,
    /// Steps. Default 10.
    pub steps: usize,
    /// Uniform start in the eps ball. Default true.
    pub random_start: bool,
}

impl Default for TrainPgdConfig {
    fn default() -> Self {
        TrainPgdConfig {
            eps: 8.0 / 255.0,
            step_size: 2.0 / 255.0,
            steps: 10,
            random_start: true,
        }
    }
}

/// The optimiser and schedule shared by every method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Default `eio`.
    pub method: Method,
    /// Epochs after pre-training. Default 200.
    pub epochs: usize,
    /// Default 128.
    pub batch_size: usize,
    /// SGD learning rate. Default 0.1.
    pub lr: f64,
    /// Epochs at which lr is multiplied by `lr_gamma`. Default [100, 150].
    pub milestones: Vec<usize>,
    /// Default 0.1.
    pub lr_gamma: f64,
    /// Linear warm-up epochs. Default 0.
    pub warmup_epochs: usize,
    /// SGD momentum. Default 0.9.
    pub momentum: f64,
    /// Nesterov momentum for pre-training and the main phase. Default false: the paper (Sec.
    /// 4.1) says "SGD with momentum 0.9" and DVERGE (`utils.py` `get_optimizers`) uses plain
    /// momentum; only the authors' EIO code uses Nesterov (`run_manager.py`
    /// `RunConfig.build_optimizer`, `nesterov` default True). Fine-tuning has its own
    /// `derive.nesterov`.
    pub nesterov: bool,
    /// Coupled weight decay on every parameter. Default 1e-4.
    pub weight_decay: f64,
    /// Members of an ensemble method (`baseline`, `dverge`, `adp`, `gal`, `trs`). Default 1.
    pub ensemble_size: usize,
    /// The main phase's optimiser. Default `sgd` (paper Sec. 4.1); ADP, GAL and TRS use Adam.
    pub optimizer: Optimizer,
    /// Adam's constants, read when `optimizer = "adam"`.
    pub adam: AdamSettings,
    /// PGD settings of `advt` and of `eio.adversarial_term`.
    pub adv: TrainPgdConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Eio,
            epochs: 200,
            batch_size: 128,
            lr: 0.1,
            milestones: vec![100, 150],
            lr_gamma: 0.1,
            warmup_epochs: 0,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-4,
            ensemble_size: 1,
            optimizer: Optimizer::Sgd,
            adam: AdamSettings::default(),
            adv: TrainPgdConfig::default(),
        }
    }
}

impl TrainConfig {
    /// The learning-rate schedule these settings describe.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            base: self.lr,
            milestones: self.milestones.clone(),
            gamma: self.lr_gamma,
            warmup_epochs: self.warmup_epochs,
        }
    }
}

/// When Algorithm 1 draws the distillation layer l.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerSchedule {
    /// Algorithm 1 line 11: a new l for every batch (paper and authors' code).
    PerBatch,
    /// DVERGE: one l per epoch.
    PerEpoch,
}

/// How a path's cross-training losses over the other paths' distilled data are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossScale {
    /// Eq. 4 and Algorithm 1 line 20: Σ_{j≠i} L(f_{P_i}(X'_j), Y_s).
    Sum,
    /// The authors' code: the same sum divided by p.
    DivideByP,
}

/// What the optimiser step does to parameters no sampled path used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnusedParams {
    /// Algorithm 1 line 24 read literally: N = N - lr·∇N for every parameter (zero gradient,
    /// so weight decay and momentum still act).
    Step,
    /// The authors' code: gradients of unused parameters are None and PyTorch's SGD skips them
    /// (no decay, momentum buffer frozen).
    Skip,
}

/// The learning rate of EIO's clean pre-training (Algorithm 1 lines 1-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PretrainSchedule {
    /// `train`'s schedule (`train.lr`, `train.milestones`, `train.lr_gamma`,
    /// `train.warmup_epochs`) counted from pre-training epoch 0, then restarted from epoch 0 for
    /// the main phase. The paper pre-trains "based on standard training settings" (Sec. 3.3),
    /// and the authors' warm-up runs the step schedule (`rgn_manager.py` `warm_up` calls
    /// `adjust_learning_rate`: lr 0.1, x0.1 at epochs 100 and 150).
    Step,
    /// `train.lr` in every pre-training epoch.
    Constant,
}

/// Algorithm 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EioConfig {
    /// Paths per iteration. Default 3.
    pub p: usize,
    /// What to do when n^d(l) < p. Default `clip` (the paper is silent; `error` refuses).
    pub infeasible: Infeasible,
    /// Clean pre-training epochs E_w (Algorithm 1 lines 1-7), one random path per batch.
    /// Default 200: the paper requires E_w but gives no value; the authors' code
    /// (`train.py --warmup --warmup_epochs 200`) ran 200, as the released checkpoint's
    /// BatchNorm counters show (protocols.md).
    pub pretrain_epochs: usize,
    /// Learning rate of pre-training. Default `step` (see [`PretrainSchedule`]).
    pub pretrain_schedule: PretrainSchedule,
    /// Draw the target images x_t of Eq. 2 with the training augmentation (`data.augment`:
    /// random crop with `data.crop_padding`, horizontal flip), from their own seeded stream;
    /// no effect when `data.augment` is false. Default true: the authors
    /// (`run_manager.py` `distill_loader`) and DVERGE (`train/train_dverge.py`) pair two
    /// iterators over the same augmented training loader. The x_t pass is independently
    /// shuffled either way.
    pub target_augment: bool,
    /// Default `per-batch`.
    pub layer_schedule: LayerSchedule,
    /// Default `sum` (Eq. 4); the authors divide by p.
    pub loss_scale: LossScale,
    /// Default `step` (Algorithm 1 line 24); the authors `skip`.
    pub unused_params: UnusedParams,
    /// Add a PGD adversarial-training term (`train.adv`) to each path's loss. Default false.
    pub adversarial_term: bool,
}

impl Default for EioConfig {
    fn default() -> Self {
        EioConfig {
            p: 3,
            infeasible: Infeasible::Clip,
            pretrain_epochs: 200,
            pretrain_schedule: PretrainSchedule::Step,
            target_augment: true,
            layer_schedule: LayerSchedule::PerBatch,
            loss_scale: LossScale::Sum,
            unused_params: UnusedParams::Step,
            adversarial_term: false,
        }
    }
}

/// BatchNorm behaviour during distillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    /// Batch statistics; each forward updates the running statistics (DVERGE).
    Train,
    /// Running statistics, not updated (the authors' code).
    Eval,
}

/// Eq. 2: feature distillation by projected sign-gradient descent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// eps_d, the L-inf radius around x_s. Default 0.07 (VGG-16: 0.03).
    pub eps: f64,
    /// PGD steps. Default 10.
    pub steps: usize,
    /// Step size as a fraction of eps. Default 0.1 (eps_d / 10).
    pub step_fraction: f64,
    /// Start uniformly in the eps ball instead of at x_s. Default false (DVERGE); true in the
    /// authors' code.
    pub random_start: bool,
    /// Accumulate momentum over per-sample L1-normalised gradients. Default true (DVERGE);
    /// false in the authors' code.
    pub momentum: bool,
    /// Momentum decay mu. Default 1.0.
    pub momentum_decay: f64,
    /// Default `train` (DVERGE); `eval` in the authors' code.
    pub bn_mode: BnMode,
    /// Default `before-relu` (DVERGE); `after-relu` in the authors' code.
    pub feature: FeatureSite,
    /// Read layer 1 before its ReLU even when `feature = "after-relu"` (the authors' feature
    /// function does). Default false.
    pub first_layer_before_relu: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            eps: 0.07,
            steps: 10,
            step_fraction: 0.1,
            random_start: false,
            momentum: true,
            momentum_decay: 1.0,
            bn_mode: BnMode::Train,
            feature: FeatureSite::BeforeRelu,
            first_layer_before_relu: false,
        }
    }
}

impl DistillConfig {
    /// The step size eps · step_fraction.
    pub fn step_size(&self) -> f64 {
        self.eps * self.step_fraction
    }
}

/// Attack losses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttackLoss {
    /// Cross-entropy.
    Ce,
    /// C&W margin -relu(z_y - max_{k≠y} z_k + kappa), the correct margin (default C&W).
    Cw,
    /// DVERGE's C&W (`cw-dverge`): the true class masked to 0 instead of -inf, so the "best
    /// wrong logit" is max(0, max_{k≠y} z_k); on an ensemble's log-probabilities (all <= 0) it
    /// is always 0 and the attack stalls once p_y > e^-kappa (rivals.md). For reproduction.
    CwDverge,
}

impl AttackLoss {
    /// The name used in configs and on the command line: `ce`, `cw`, `cw-dverge`.
    pub fn name(self) -> &'static str {
        match self {
            AttackLoss::Ce => "ce",
            AttackLoss::Cw => "cw",
            AttackLoss::CwDverge => "cw-dverge",
        }
    }

    /// The loss of `name` (`ce`, `cw`, `cw-dverge`).
    pub fn from_name(name: &str) -> Option<AttackLoss> {
        [AttackLoss::Ce, AttackLoss::Cw, AttackLoss::CwDverge]
            .into_iter()
            .find(|l| l.name() == name)
    }
}

/// The all-or-nothing white-box evaluation (paper Sec. 4.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Test images in the fixed seeded subset. Default 1000.
    pub images: usize,
    /// Radii. Default 0.01, 0.02, …, 0.07.
    pub eps: Vec<f64>,
    /// PGD steps. Default 50.
    pub steps: usize,
    /// Step size as a fraction of eps. Default 0.2 (eps / 5).
    pub step_fraction: f64,
    /// Random restarts; an image is robust only if all fail. Default 5.
    pub restarts: usize,
    /// Default ["ce"].
    pub losses: Vec<AttackLoss>,
    /// C&W confidence kappa. Default 0.1.
    pub cw_kappa: f64,
    /// Uniform random start. Default true.
    pub random_start: bool,
    /// Paths averaged per gradient when attacking randomised deployment (EOT). Default 10.
    pub eot_samples: usize,
    /// Images per attack batch. Default 500.
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            images: 1000,
            eps: vec![0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07],
            steps: 50,
            step_fraction: 0.2,
            restarts: 5,
            losses: vec![AttackLoss::Ce],
            cw_kappa: 0.1,
            random_start: true,
            eot_samples: 10,
            batch_size: 500,
        }
    }
}

/// What `eio run` trains and reports beside the EIO network (the paper's Table 1 rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Sizes of the baseline ensembles reported (Table 1: 3, 5, 8). One ensemble of the largest
    /// size is trained with `seed`; the ensemble of size m is its first m members, as DVERGE's
    /// baselines created one after another from one seeded stream are. Default [3, 5, 8].
    pub baselines: Vec<usize>,
    /// Black-box radius of the Table 1 column. Default 0.03.
    pub table_black_eps: f64,
    /// White-box radius of the Table 1 column. Default 0.01.
    pub table_white_eps: f64,
    /// Rival methods trained and judged beside EIO and the baselines under the same data and
    /// evaluation (`[[run.rivals]]` tables; [`crate::rivals::rival_config`]). Default none.
    pub rivals: Vec<crate::rivals::RivalRun>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            baselines: vec![3, 5, 8],
            table_black_eps: 0.03,
            table_white_eps: 0.01,
            rivals: Vec::new(),
        }
    }
}

/// The attacks of the black-box transfer suite (DVERGE's protocol, rivals.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuiteAttack {
    /// Momentum PGD (MI-FGSM with projection), `blackbox.mpgd_starts` random starts.
    Mpgd,
    /// M-DI²-FGSM: momentum plus input diversity.
    Mdi2,
    /// SGM: the skip-gradient method on ResNet surrogates.
    Sgm,
}

/// The black-box transfer suite (paper Sec. 4.1, DVERGE's protocol): for each surrogate
/// ensemble, each attack version and each loss, one adversarial version of every evaluation
/// image per ε; an image is robust only if the evaluated model classifies all of them
/// correctly. The defaults give DVERGE's 3 surrogates x 5 attack versions x 2 losses = 30
/// versions, 100 steps of ε/5, ε 0.01..0.07, 1,000 test images. Fields the paper and DVERGE
/// leave open are named defaults here, each documented (rivals.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlackboxConfig {
    /// Test images in the suite (the fixed seeded subset, as `eval.images`). Default 1000.
    pub images: usize,
    /// Radii. Default 0.01, 0.02, …, 0.07.
    pub eps: Vec<f64>,
    /// Attack steps. Default 100.
    pub steps: usize,
    /// Step size as a fraction of eps. Default 0.2 (eps / 5).
    pub step_fraction: f64,
    /// Default ["ce", "cw"] (DVERGE's `xent` and `cw`; `cw-dverge` reproduces its masked margin).
    pub losses: Vec<AttackLoss>,
    /// C&W confidence kappa. Default 0.1.
    pub cw_kappa: f64,
    /// Default ["mpgd", "mdi2", "sgm"].
    pub attacks: Vec<SuiteAttack>,
    /// Random starts of momentum PGD, each its own version. Default 3.
    pub mpgd_starts: usize,
    /// Momentum decay mu of `mpgd` and `mdi2`. Default 1.0 (Dong et al., advertorch,
    /// torchattacks).
    pub momentum_decay: f64,
    /// Input-diversity probability of `mdi2`. Default 0.5.
    pub di_probability: f64,
    /// Smallest resize of `mdi2` as a fraction of the side. Default 0.9 (sizes 28..=31 at 32).
    pub di_resize_rate: f64,
    /// Default `bilinear` (torchattacks, align_corners = false).
    pub di_interpolation: crate::attack::Interpolation,
    /// Random start for `mdi2`. Default false (Xie et al. start at x).
    pub di_random_start: bool,
    /// Gradient factor of `sgm` on residual branches. Default 0.2.
    pub sgm_gamma: f64,
    /// SGM's per-block gradient normalisation. Default false.
    pub sgm_normalise: bool,
    /// Keep gamma = 1 in the first block of each stage (SGM's code). Default false.
    pub sgm_exclude_stage_first: bool,
    /// Random start for `sgm`. Default false (Wu et al. start at x).
    pub sgm_random_start: bool,
    /// Members of each surrogate baseline ensemble. Default [3, 5, 8].
    pub surrogate_sizes: Vec<usize>,
    /// The seed each surrogate ensemble is trained with, disjoint from every evaluated
    /// model's. Default [1003, 1005, 1008].
    pub surrogate_seeds: Vec<u64>,
    /// Images per attack batch. Default 500.
    pub batch_size: usize,
}

impl Default for BlackboxConfig {
    fn default() -> Self {
        BlackboxConfig {
            images: 1000,
            eps: vec![0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07],
            steps: 100,
            step_fraction: 0.2,
            losses: vec![AttackLoss::Ce, AttackLoss::Cw],
            cw_kappa: 0.1,
            attacks: vec![SuiteAttack::Mpgd, SuiteAttack::Mdi2, SuiteAttack::Sgm],
            mpgd_starts: 3,
            momentum_decay: 1.0,
            di_probability: 0.5,
            di_resize_rate: 0.9,
            di_interpolation: crate::attack::Interpolation::Bilinear,
            di_random_start: false,
            sgm_gamma: 0.2,
            sgm_normalise: false,
            sgm_exclude_stage_first: false,
            sgm_random_start: false,
            surrogate_sizes: vec![3, 5, 8],
            surrogate_seeds: vec![1003, 1005, 1008],
            batch_size: 500,
        }
    }
}

/// Deriving and fine-tuning a single path (paper Sec. 3.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeriveConfig {
    /// Fine-tuning epochs. Default 15.
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate. Default 0.001.
    pub lr: f64,
    /// Fine-tuning milestones. Default [20, 30] (the authors' script; beyond 15 epochs they
    /// never fire).
    pub milestones: Vec<usize>,
    /// Fold each conv+BN pair for deployment. Default true.
    pub fold_bn: bool,
    /// Nesterov momentum while fine-tuning (momentum and weight decay are `train`'s). Default
    /// false: the paper's fine-tuning is "SGD with learning rate 0.001, momentum 0.9 and weight
    /// decay 0.0001" (Sec. 4.1) and the authors' `finetune.py` builds `torch.optim.SGD`
    /// without Nesterov.
    pub nesterov: bool,
}

impl Default for DeriveConfig {
    fn default() -> Self {
        DeriveConfig {
            finetune_epochs: 15,
            lr: 0.001,
            milestones: vec![20, 30],
            fold_bn: true,
            nesterov: false,
        }
    }
}

/// One value that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value} {rule}")]
pub struct FieldError {
    /// Dotted path, e.g. `distill.eps`.
    pub field: String,
    /// The offending value as written.
    pub value: String,
    /// What is allowed, e.g. `is outside (0, 1]`.
    pub rule: String,
}

/// Every invalid value of a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reading or checking a config failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown field or a value of the wrong type.
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A `key=value` override that does not apply.
    #[error("--set {assignment:?}: {message}")]
    Override { assignment: String, message: String },
    /// Values out of range.
    #[error("{origin}: invalid config:\n{errors}")]
    Invalid { origin: String, errors: FieldErrors },
}

/// The named presets in `configs/`; `spec/SPEC.md` ("Presets and their sources") gives the
/// source of each value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// The paper's text (ResNet-20 on CIFAR-10, Sec. 3-4); equal to [`Config::default`].
    Paper,
    /// The authors' public code (cai-y13/Ensemble-in-One) and released checkpoint.
    Official,
    /// The authors' setup with DVERGE's distillation (momentum, no random start, train-mode
    /// BN, features before ReLU).
    Dverge,
    /// A small CPU demo on Fashion-MNIST.
    Quick,
    /// The paper's setting for VGG-16 (Sec. 4.1, Fig. 4: eps_d = 0.03).
    Vgg16,
    /// DVERGE with 3 ResNet-20 members, as its public code trains them (`train.method =
    /// "dverge"`; the paper's Table 1 rival).
    Dverge3,
    /// DVERGE with 5 members.
    Dverge5,
    /// DVERGE with 8 members.
    Dverge8,
    /// ADP with 3 members, DVERGE's port.
    Adp3,
    /// GAL with 3 members, DVERGE's port.
    Gal3,
    /// TRS with 3 members, its public code (a rival beyond the paper).
    Trs3,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 11] = [
        Preset::Paper,
        Preset::Official,
        Preset::Dverge,
        Preset::Quick,
        Preset::Vgg16,
        Preset::Dverge3,
        Preset::Dverge5,
        Preset::Dverge8,
        Preset::Adp3,
        Preset::Gal3,
        Preset::Trs3,
    ];

    /// Its name, which is also its file stem in `configs/`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Official => "official",
            Preset::Dverge => "dverge",
            Preset::Quick => "quick",
            Preset::Vgg16 => "vgg16",
            Preset::Dverge3 => "dverge-3",
            Preset::Dverge5 => "dverge-5",
            Preset::Dverge8 => "dverge-8",
            Preset::Adp3 => "adp-3",
            Preset::Gal3 => "gal-3",
            Preset::Trs3 => "trs-3",
        }
    }

    /// The preset by name.
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The TOML text, as shipped in `configs/`.
    pub fn toml(self) -> &'static str {
        match self {
            Preset::Paper => include_str!("../../configs/paper.toml"),
            Preset::Official => include_str!("../../configs/official.toml"),
            Preset::Dverge => include_str!("../../configs/dverge.toml"),
            Preset::Quick => include_str!("../../configs/quick.toml"),
            Preset::Vgg16 => include_str!("../../configs/vgg16.toml"),
            Preset::Dverge3 => include_str!("../../configs/dverge-3.toml"),
            Preset::Dverge5 => include_str!("../../configs/dverge-5.toml"),
            Preset::Dverge8 => include_str!("../../configs/dverge-8.toml"),
            Preset::Adp3 => include_str!("../../configs/adp-3.toml"),
            Preset::Gal3 => include_str!("../../configs/gal-3.toml"),
            Preset::Trs3 => include_str!("../../configs/trs-3.toml"),
        }
    }

    /// The validated config.
    ///
    /// # Errors
    /// Never for a shipped preset (a test reads each one); kept fallible for honesty.
    pub fn config(self) -> Result<Config, ConfigError> {
        Config::from_toml(self.toml(), &format!("configs/{}.toml", self.name()))
    }
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors (a file path, `--set`, …).
    ///
    /// # Errors
    /// [`ConfigError::Parse`] with line and column, or [`ConfigError::Invalid`].
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_and_column(text, span.start));
            ConfigError::Parse {
                origin: origin.to_string(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        config.validated(origin)
    }

    /// Reads, parses and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] naming the file, or any error of [`Config::from_toml`].
    pub fn load(path: &FsPath) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Applies `key=value` assignments (dotted keys, TOML values; a bare word is a string),
    /// then validates.
    ///
    /// # Errors
    /// [`ConfigError::Override`] naming the assignment, or [`ConfigError::Invalid`].
    pub fn with_overrides<S: AsRef<str>>(self, assignments: &[S]) -> Result<Config, ConfigError> {
        let mut table = toml::Table::try_from(&self).map_err(|e| ConfigError::Override {
            assignment: String::new(),
            message: e.to_string(),
        })?;
        for assignment in assignments {
            let assignment = assignment.as_ref();
            let bad = |message: String| ConfigError::Override {
                assignment: assignment.to_string(),
                message,
            };
            let (key, value) = assignment
                .split_once('=')
                .ok_or_else(|| bad("expected key=value".into()))?;
            let value = parse_value(value.trim());
            let keys: Vec<&str> = key.trim().split('.').collect();
            let (last, parents) = keys.split_last().ok_or_else(|| bad("empty key".into()))?;
            let mut slot = &mut table;
            for (depth, part) in parents.iter().enumerate() {
                slot = slot
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| bad(format!("{} is not a table", keys[..=depth].join("."))))?;
            }
            slot.insert(last.to_string(), value);
            Config::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| bad(e.message().to_string()))?;
        }
        let config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Override {
                assignment: assignments
                    .iter()
                    .map(|a| a.as_ref())
                    .collect::<Vec<_>>()
                    .join(" "),
                message: e.message().to_string(),
            })?;
        config.validated("--set")
    }

    fn validated(self, origin: &str) -> Result<Config, ConfigError> {
        self.validate().map_err(|errors| ConfigError::Invalid {
            origin: origin.to_string(),
            errors,
        })?;
        Ok(self)
    }

    /// Checks every value against what the paper's method allows.
    ///
    /// # Errors
    /// Every offending field, in declaration order.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut v = Validator::default();
        let m = &self.model;
        if m.arch == Arch::Resnet && (m.depth < 8 || !(m.depth - 2).is_multiple_of(6)) {
            v.fail(
                "model.depth",
                m.depth,
                "must be 6k+2 with k >= 1 (8, 14, 20, 32, 44, 56, 110, …)",
            );
        }
        v.positive("model.width", m.width);
        v.range("model.n", m.n, 1, crate::gates::MAX_CANDIDATES);
        v.at_least("model.classes", m.classes, 2);
        v.at_least("model.in_channels", m.in_channels, 1);
        v.at_least("model.input_size", m.input_size, 1);
        if m.arch == Arch::Vgg16 && !m.input_size.is_multiple_of(32) {
            v.fail(
                "model.input_size",
                m.input_size,
                "must be a multiple of 32 for vgg16 (five 2x2 max pools)",
            );
        }
        v.open_closed("model.leaky_slope", m.leaky_slope, 0.0, 1.0);
        if m.mean.len() != m.in_channels {
            v.fail(
                "model.mean",
                format!("{:?}", m.mean),
                &format!("must have model.in_channels = {} entries", m.in_channels),
            );
        }
        if m.std.len() != m.in_channels {
            v.fail(
                "model.std",
                format!("{:?}", m.std),
                &format!("must have model.in_channels = {} entries", m.in_channels),
            );
        }
        for (i, &s) in m.std.iter().enumerate() {
            v.positive(&format!("model.std[{i}]"), s);
        }
        for (i, &s) in m.mean.iter().enumerate() {
            if !s.is_finite() {
                v.fail(&format!("model.mean[{i}]"), s, "must be finite");
            }
        }
        if m.arch == Arch::Vgg16
            && m.vgg_gated == VggGating::ConvsAndClassifier
            && m.sharing == Sharing::SharedConv
        {
            v.fail("model.vgg_gated", "\"convs-and-classifier\"", "needs model.sharing = \"independent\" (a shared classifier has identical candidates)");
        }

        let d = &self.data;
        if d.crop_padding > 64 {
            v.fail("data.crop_padding", d.crop_padding, "must be <= 64");
        }
        if let Some(limit) = d.train_limit {
            v.at_least("data.train_limit", limit, 1);
        }

        let t = &self.train;
        v.at_least("train.epochs", t.epochs, 1);
        v.at_least("train.batch_size", t.batch_size, 1);
        v.positive("train.lr", t.lr);
        if t.milestones.windows(2).any(|w| w[0] >= w[1]) {
            v.fail(
                "train.milestones",
                format!("{:?}", t.milestones),
                "must be strictly increasing",
            );
        }
        v.open_closed("train.lr_gamma", t.lr_gamma, 0.0, 1.0);
        v.closed_open("train.momentum", t.momentum, 0.0, 1.0);
        if t.nesterov && t.momentum == 0.0 {
            v.fail("train.nesterov", true, "needs train.momentum > 0");
        }
        v.closed_open("train.weight_decay", t.weight_decay, 0.0, 1.0);
        v.at_least("train.ensemble_size", t.ensemble_size, 1);
        v.open_closed("train.adv.eps", t.adv.eps, 0.0, 1.0);
        v.open_closed("train.adv.step_size", t.adv.step_size, 0.0, 1.0);
        v.at_least("train.adv.steps", t.adv.steps, 1);

        let e = &self.eio;
        v.at_least("eio.p", e.p, 1);

        let s = &self.distill;
        v.open_closed("distill.eps", s.eps, 0.0, 1.0);
        v.at_least("distill.steps", s.steps, 1);
        v.open_closed("distill.step_fraction", s.step_fraction, 0.0, 1.0);
        v.closed_open(
            "distill.momentum_decay",
            s.momentum_decay,
            0.0,
            f64::INFINITY,
        );

        let ev = &self.eval;
        v.at_least("eval.images", ev.images, 1);
        if ev.eps.is_empty() {
            v.fail("eval.eps", "[]", "must list at least one radius");
        }
        for (i, &eps) in ev.eps.iter().enumerate() {
            v.closed("eval.eps", i, eps);
        }
        v.at_least("eval.steps", ev.steps, 1);
        v.open_closed("eval.step_fraction", ev.step_fraction, 0.0, 1.0);
        v.at_least("eval.restarts", ev.restarts, 1);
        if ev.losses.is_empty() {
            v.fail(
                "eval.losses",
                "[]",
                "must list at least one of \"ce\", \"cw\"",
            );
        }
        v.closed_open("eval.cw_kappa", ev.cw_kappa, 0.0, f64::INFINITY);
        v.at_least("eval.eot_samples", ev.eot_samples, 1);
        v.at_least("eval.batch_size", ev.batch_size, 1);

        let bb = &self.blackbox;
        v.at_least("blackbox.images", bb.images, 1);
        if bb.eps.is_empty() {
            v.fail("blackbox.eps", "[]", "must list at least one radius");
        }
        for (i, &eps) in bb.eps.iter().enumerate() {
            v.closed("blackbox.eps", i, eps);
        }
        v.at_least("blackbox.steps", bb.steps, 1);
        v.open_closed("blackbox.step_fraction", bb.step_fraction, 0.0, 1.0);
        if bb.losses.is_empty() {
            v.fail(
                "blackbox.losses",
                "[]",
                "must list at least one of \"ce\", \"cw\", \"cw-dverge\"",
            );
        }
        v.closed_open("blackbox.cw_kappa", bb.cw_kappa, 0.0, f64::INFINITY);
        if bb.attacks.is_empty() {
            v.fail(
                "blackbox.attacks",
                "[]",
                "must list at least one of \"mpgd\", \"mdi2\", \"sgm\"",
            );
        }
        v.at_least("blackbox.mpgd_starts", bb.mpgd_starts, 1);
        v.closed_open(
            "blackbox.momentum_decay",
            bb.momentum_decay,
            0.0,
            f64::INFINITY,
        );
        if !(0.0..=1.0).contains(&bb.di_probability) {
            v.fail(
                "blackbox.di_probability",
                bb.di_probability,
                "is outside [0, 1]",
            );
        }
        v.open_closed("blackbox.di_resize_rate", bb.di_resize_rate, 0.0, 1.0);
        v.open_closed("blackbox.sgm_gamma", bb.sgm_gamma, 0.0, 1.0);
        if bb.surrogate_sizes.is_empty() {
            v.fail(
                "blackbox.surrogate_sizes",
                "[]",
                "must list at least one ensemble size",
            );
        }
        for (i, &m) in bb.surrogate_sizes.iter().enumerate() {
            v.at_least(&format!("blackbox.surrogate_sizes[{i}]"), m, 1);
        }
        if bb.surrogate_seeds.len() != bb.surrogate_sizes.len() {
            v.fail(
                "blackbox.surrogate_seeds",
                format!("{:?}", bb.surrogate_seeds),
                &format!(
                    "must have one seed per surrogate ({} sizes)",
                    bb.surrogate_sizes.len()
                ),
            );
        }
        v.at_least("blackbox.batch_size", bb.batch_size, 1);
        if self.run.baselines.is_empty() {
            v.fail(
                "run.baselines",
                "[]",
                "must list at least one ensemble size",
            );
        }
        for (i, &m) in self.run.baselines.iter().enumerate() {
            v.at_least(&format!("run.baselines[{i}]"), m, 1);
        }
        for (field, eps) in [
            ("run.table_black_eps", self.run.table_black_eps),
            ("run.table_white_eps", self.run.table_white_eps),
        ] {
            if !(0.0..=1.0).contains(&eps) {
                v.fail(field, eps, "is outside [0, 1]");
            }
        }

        crate::rivals::validate(self, &mut v);

        let dr = &self.derive;
        v.positive("derive.lr", dr.lr);
        if dr.nesterov && t.momentum == 0.0 {
            v.fail("derive.nesterov", true, "needs train.momentum > 0");
        }
        if dr.milestones.windows(2).any(|w| w[0] >= w[1]) {
            v.fail(
                "derive.milestones",
                format!("{:?}", dr.milestones),
                "must be strictly increasing",
            );
        }
        v.finish()
    }

    /// The plan of [`Config::model`].
    ///
    /// # Errors
    /// As [`Plan::build`]; never for a validated config.
    pub fn plan(&self) -> Result<Plan, crate::plan::PlanError> {
        Plan::build(&self.model)
    }
}

/// A TOML value from the right-hand side of `--set`; a bare word becomes a string.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Collects [`FieldError`]s.
#[derive(Default)]
pub(crate) struct Validator(Vec<FieldError>);

impl Validator {
    pub(crate) fn fail(&mut self, field: &str, value: impl fmt::Display, rule: &str) {
        self.0.push(FieldError {
            field: field.to_string(),
            value: value.to_string(),
            rule: rule.to_string(),
        });
    }

    pub(crate) fn at_least(&mut self, field: &str, value: usize, min: usize) {
        if value < min {
            self.fail(field, value, &format!("must be >= {min}"));
        }
    }

    pub(crate) fn range(&mut self, field: &str, value: usize, min: usize, max: usize) {
        if !(min..=max).contains(&value) {
            self.fail(field, value, &format!("is outside {min}..={max}"));
        }
    }

    pub(crate) fn positive(&mut self, field: &str, value: f64) {
        if !(value > 0.0 && value.is_finite()) {
            self.fail(field, value, "must be a finite number > 0");
        }
    }

    pub(crate) fn open_closed(&mut self, field: &str, value: f64, lo: f64, hi: f64) {
        if !(value > lo && value <= hi) {
            self.fail(field, value, &format!("is outside ({lo}, {hi}]"));
        }
    }

    pub(crate) fn closed_open(&mut self, field: &str, value: f64, lo: f64, hi: f64) {
        if !(value >= lo && value < hi) {
            let hi = if hi.is_infinite() {
                "inf".to_string()
            } else {
                hi.to_string()
            };
            self.fail(field, value, &format!("is outside [{lo}, {hi})"));
        }
    }

    /// An epsilon of an evaluation sweep: in [0, 1].
    pub(crate) fn closed(&mut self, field: &str, index: usize, value: f64) {
        if !(0.0..=1.0).contains(&value) {
            self.fail(&format!("{field}[{index}]"), value, "is outside [0, 1]");
        }
    }

    fn finish(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FieldErrors(self.0))
        }
    }
}

//! The cases: proptest strategies (as functions) for small networks, paths, layers, batches and
//! the switches of Eq. 2, Algorithm 1 and PGD, and the seeded host data built from them.
//!
//! Every network is a DVERGE CIFAR ResNet-(6k+2) with k in 1..=2 at width 1/4 or 1/2 on 8x8
//! inputs, so that the f64 reference (plain loops) runs a case in milliseconds. Model states are
//! the plan's seeded initial values moved away from them ([`perturbed_values`]) so that no
//! comparison is degenerate (BatchNorm gammas of exactly 1, running statistics of exactly 0/1,
//! zero counters, zero biases).

use eio_spec::attack::{InputDiversity, Interpolation, SkipGradient};
use eio_spec::config::{
    Activation, Arch, AttackLoss, BnMode, Config, DistillConfig, EioConfig, LossScale, ModelConfig,
    Sharing, UnusedParams, VggGating,
};
use eio_spec::plan::{FeatureSite, Init, NodeId, Plan, Role, Shape};
use eio_spec::rng::Seeds;
use eio_spec::{Path, Preset};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::{Images, Values};

/// The batch sizes of the f32 single-pass cases: 2 and 3. With one image, train-mode
/// BatchNorm normalises the last stage of an 8x8 input over 4 values per channel, whose
/// standard deviation can be small; dividing by it makes the pass ill-conditioned, and f32
/// rounding of inputs and intermediates then moves gradients by up to 2e-4 of their scale
/// (measured: rounding only the inputs to f32 already moves the f64 reference's gradients by
/// 7e-6 of their scale in such a case, against 1e-6 with two images). That is the problem's
/// conditioning, not the engine's arithmetic: batch 1 is covered in f64 at 1e-9.
pub const F32_BATCHES: std::ops::RangeInclusive<usize> = 2..=3;

/// The proptest configuration of the suite: `cases` cases (or `PROPTEST_CASES`), a fixed seed
/// so that CI runs are reproducible (or `PROPTEST_RNG_SEED` to explore), and a bounded shrink
/// of 64 steps (or `PROPTEST_MAX_SHRINK_ITERS`; each case runs the slow reference several
/// times).
pub fn proptest_config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let rng_seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(RngSeed::Fixed(0x0e10_c0f0), RngSeed::Fixed);
    let max_shrink_iters = std::env::var("PROPTEST_MAX_SHRINK_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        rng_seed,
        max_shrink_iters,
        ..ProptestConfig::default()
    }
}

/// A small network: ResNet-(6k+2).
#[derive(Debug, Clone, PartialEq)]
pub struct NetSpec {
    /// k: BasicBlocks per stage (depth 6k+2).
    pub blocks: usize,
    pub width: f64,
    pub classes: usize,
    /// Candidates per RGB.
    pub n: usize,
    pub sharing: Sharing,
    pub in_channels: usize,
    pub activation: Activation,
    /// Input height and width (8 in the strategies).
    pub input_size: usize,
}

impl NetSpec {
    /// ResNet-8, width 1/4, n = 2, 3 channels, 4 classes, ReLU (the reference tests' tiny net).
    pub fn tiny(sharing: Sharing) -> Self {
        NetSpec {
            blocks: 1,
            width: 0.25,
            classes: 4,
            n: 2,
            sharing,
            in_channels: 3,
            activation: Activation::Relu,
            input_size: 8,
        }
    }

    /// The model settings.
    pub fn model(&self) -> ModelConfig {
        let (mean, std) = match self.in_channels {
            3 => (vec![0.4914, 0.4822, 0.4465], vec![0.2023, 0.1994, 0.2010]),
            c => (vec![0.286; c], vec![0.353; c]),
        };
        ModelConfig {
            arch: Arch::Resnet,
            depth: 6 * self.blocks + 2,
            width: self.width,
            n: self.n,
            sharing: self.sharing,
            classes: self.classes,
            in_channels: self.in_channels,
            input_size: self.input_size,
            activation: self.activation,
            leaky_slope: 0.1,
            mean,
            std,
            vgg_gated: VggGating::Convs,
        }
    }

    /// The plan.
    ///
    /// # Panics
    /// Never for the specs the strategies produce.
    pub fn plan(&self) -> Plan {
        Plan::build(&self.model()).expect("a valid small ResNet")
    }
}

/// Weight sharing: the paper's independent candidates or the authors' shared conv.
pub fn sharing() -> impl Strategy<Value = Sharing> {
    prop_oneof![Just(Sharing::Independent), Just(Sharing::SharedConv)]
}

/// ReLU mostly, LeakyReLU (GAL's members) sometimes.
pub fn activation() -> impl Strategy<Value = Activation> {
    prop_oneof![3 => Just(Activation::Relu), 1 => Just(Activation::LeakyRelu)]
}

/// ResNet-8 or -14, width 1/4 or 1/2, 2-5 classes, n in 1..=3, 1 or 3 input channels, 8x8.
pub fn net_spec() -> impl Strategy<Value = NetSpec> {
    (
        1usize..=2,
        prop_oneof![Just(0.25), Just(0.5)],
        2usize..=5,
        1usize..=3,
        sharing(),
        prop_oneof![Just(1usize), Just(3usize)],
        activation(),
    )
        .prop_map(
            |(blocks, width, classes, n, sharing, in_channels, activation)| NetSpec {
                blocks,
                width,
                classes,
                n,
                sharing,
                in_channels,
                activation,
                input_size: 8,
            },
        )
}

/// [`net_spec`] restricted to ResNet-8 at width 1/4 (for the cases that run many passes).
pub fn small_net_spec() -> impl Strategy<Value = NetSpec> {
    net_spec().prop_map(|net| NetSpec {
        blocks: 1,
        width: 0.25,
        ..net
    })
}

/// A path through `plan`: K gates, each uniform on 0..n (Eq. 1).
pub fn path(plan: &Plan) -> impl Strategy<Value = Path> {
    proptest::collection::vec(0..plan.n as u8, plan.k()).prop_map(Path::new)
}

/// A network, a path through it, a distillation layer l in 1..=L, a batch size and the seed
/// of the host data.
#[derive(Debug, Clone)]
pub struct PassCase {
    pub net: NetSpec,
    pub path: Path,
    pub layer: usize,
    pub batch: usize,
    pub seed: u64,
}

/// [`PassCase`]s over [`net_spec`], batches of 1 to 3.
pub fn pass_case() -> impl Strategy<Value = PassCase> {
    pass_case_over(net_spec(), 1..=3)
}

/// [`PassCase`]s over the networks of `nets` with batch sizes in `batches`.
pub fn pass_case_over(
    nets: impl Strategy<Value = NetSpec>,
    batches: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = PassCase> {
    nets.prop_flat_map(move |net| {
        let plan = net.plan();
        let l = plan.l();
        (Just(net), path(&plan), 1..=l, batches.clone(), any::<u64>()).prop_map(
            |(net, path, layer, batch, seed)| PassCase {
                net,
                path,
                layer,
                batch,
                seed,
            },
        )
    })
}

/// The host data of one case.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub plan: Plan,
    pub path: Path,
    pub layer: usize,
    /// A perturbed model state.
    pub values: Values,
    /// A second perturbed state of the same plan (an ensemble's other member).
    pub other_values: Values,
    /// A second path (an ensemble's other member).
    pub other_path: Path,
    /// The source batch (attacked, distilled from).
    pub images: Images,
    /// The target batch of Eq. 2, same shape.
    pub targets: Images,
    pub labels: Vec<usize>,
    /// A generator for anything else the test needs, seeded from the case.
    pub rng: ChaCha8Rng,
}

impl PassCase {
    /// The seeded host data of this case.
    pub fn fixture(&self) -> Fixture {
        Fixture::new(
            self.net.plan(),
            self.path.clone(),
            self.layer,
            self.batch,
            self.seed,
        )
    }
}

impl Fixture {
    /// Seeded host data for `plan`: two perturbed states, a second path, `batch` source and
    /// target images and labels, all from `seed`.
    pub fn new(plan: Plan, path: Path, layer: usize, batch: usize, seed: u64) -> Fixture {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values = perturbed_values(&plan, rng.random());
        let other_values = perturbed_values(&plan, rng.random());
        let other_path = plan.path_space().sample(&mut rng);
        let images = images(&mut rng, batch, &plan);
        let targets = images_like(&mut rng, &images);
        let labels = labels(&mut rng, batch, plan.classes);
        Fixture {
            path,
            layer,
            plan,
            values,
            other_values,
            other_path,
            images,
            targets,
            labels,
            rng,
        }
    }
}

/// The plan's seeded initial values (`Plan::initial_values`, member 0), counters as 0.
pub fn initial_values(plan: &Plan, seed: u64) -> Values {
    plan.initial_values(&Seeds::new(seed), 0)
        .into_iter()
        .collect()
}

/// The initial values of seed `seed` moved away from their defaults: BN gammas in [0.5, 1.5),
/// BN and linear biases in [-0.5, 0.5), running means in [-0.3, 0.3), running variances in
/// [0.5, 2), counters in 0..1000, every conv and linear weight scaled by a factor in
/// [0.8, 1.2). The normaliser's constants are kept.
pub fn perturbed_values(plan: &Plan, seed: u64) -> Values {
    let mut values = initial_values(plan, seed);
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x05ee_d0f5_7a7e);
    for spec in &plan.params {
        let v = values
            .get_mut(&spec.name)
            .expect("initial values name every tensor");
        match spec.role {
            Role::Counter => v[0] = f64::from(r.random_range(0u32..1000)),
            Role::Constant => {}
            Role::Learnable | Role::RunningStat => {
                let (lo, hi, scale) = match (spec.role, &spec.init) {
                    (Role::RunningStat, Init::Zeros) => (-0.3, 0.3, false),
                    (Role::RunningStat, _) => (0.5, 2.0, false),
                    (_, Init::Ones) => (0.5, 1.5, false),
                    (_, Init::Zeros) => (-0.5, 0.5, false),
                    (_, Init::Uniform { .. }) if spec.shape.len() == 1 => (-0.5, 0.5, false),
                    _ => (0.8, 1.2, true),
                };
                for x in v.iter_mut() {
                    let draw = r.random_range(lo..hi);
                    *x = if scale { *x * draw } else { draw };
                }
            }
        }
    }
    values
}

/// `batch` images of the plan's input shape, pixels uniform in [0, 1).
pub fn images(rng: &mut ChaCha8Rng, batch: usize, plan: &Plan) -> Images {
    let Shape::Map { c, h, w } = plan.input else {
        unreachable!("image input")
    };
    Images {
        dims: [batch, c, h, w],
        data: (0..batch * c * h * w)
            .map(|_| rng.random_range(0.0..1.0))
            .collect(),
    }
}

/// Fresh images of the same shape.
pub fn images_like(rng: &mut ChaCha8Rng, like: &Images) -> Images {
    Images {
        dims: like.dims,
        data: (0..like.data.len())
            .map(|_| rng.random_range(0.0..1.0))
            .collect(),
    }
}

/// `batch` labels uniform on 0..classes.
pub fn labels(rng: &mut ChaCha8Rng, batch: usize, classes: usize) -> Vec<usize> {
    (0..batch).map(|_| rng.random_range(0..classes)).collect()
}

/// Values uniform in [-1, 1) for the output of `node` over a batch of `batch` (an MSE target).
pub fn feature_target(rng: &mut ChaCha8Rng, plan: &Plan, node: NodeId, batch: usize) -> Vec<f64> {
    (0..batch * plan.nodes[node].shape.numel())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect()
}

/// Every node a test compares: each distillation layer before and after its ReLU (the logits
/// are the last layer), in increasing order.
pub fn feature_nodes(plan: &Plan) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = plan
        .layers
        .iter()
        .flat_map(|l| [l.before_relu, l.after_relu])
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// BatchNorm in train or eval mode.
pub fn bn_mode() -> impl Strategy<Value = BnMode> {
    prop_oneof![Just(BnMode::Train), Just(BnMode::Eval)]
}

/// Where the distillation feature is read.
pub fn feature_site() -> impl Strategy<Value = FeatureSite> {
    prop_oneof![Just(FeatureSite::BeforeRelu), Just(FeatureSite::AfterRelu)]
}

/// Eq. 2's switches: random start, momentum (decay 1 or 0.9), BN mode, feature site, the
/// authors' layer-1-before-ReLU rule; eps 0.03 or 0.07, step eps/10 or eps/4, 1-4 steps.
pub fn distill_config() -> impl Strategy<Value = DistillConfig> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(1.0), Just(0.9)],
        bn_mode(),
        feature_site(),
        any::<bool>(),
        prop_oneof![Just(0.03), Just(0.07)],
        prop_oneof![Just(0.1), Just(0.25)],
        1usize..=4,
    )
        .prop_map(
            |(
                random_start,
                momentum,
                momentum_decay,
                bn_mode,
                feature,
                first_layer_before_relu,
                eps,
                step_fraction,
                steps,
            )| DistillConfig {
                eps,
                steps,
                step_fraction,
                random_start,
                momentum,
                momentum_decay,
                bn_mode,
                feature,
                first_layer_before_relu,
            },
        )
}

/// Algorithm 1's switches on top of a preset's training settings: p in 1..=3, loss scale,
/// unused parameters, and the PGD-AT term (2 steps, to stay cheap).
#[derive(Debug, Clone)]
pub struct EioSwitches {
    pub preset: Preset,
    pub p: usize,
    pub loss_scale: LossScale,
    pub unused_params: UnusedParams,
    pub adversarial_term: bool,
}

/// [`EioSwitches`] over the paper, official and dverge presets.
pub fn eio_switches() -> impl Strategy<Value = EioSwitches> {
    (
        prop_oneof![
            Just(Preset::Paper),
            Just(Preset::Official),
            Just(Preset::Dverge)
        ],
        1usize..=3,
        prop_oneof![Just(LossScale::Sum), Just(LossScale::DivideByP)],
        prop_oneof![Just(UnusedParams::Step), Just(UnusedParams::Skip)],
        any::<bool>(),
    )
        .prop_map(
            |(preset, p, loss_scale, unused_params, adversarial_term)| EioSwitches {
                preset,
                p,
                loss_scale,
                unused_params,
                adversarial_term,
            },
        )
}

impl EioSwitches {
    /// The preset's config with `model`, `distill` and these switches.
    pub fn config(&self, model: ModelConfig, distill: DistillConfig) -> Config {
        let mut config = self.preset.config().expect("shipped presets are valid");
        config.model = model;
        config.distill = distill;
        config.eio = EioConfig {
            p: self.p,
            loss_scale: self.loss_scale,
            unused_params: self.unused_params,
            adversarial_term: self.adversarial_term,
            ..config.eio
        };
        config.train.adv.steps = 2;
        config
    }
}

/// What a PGD run attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// One path, in the given BN mode.
    Path(BnMode),
    /// Two members (two states, two paths), the log of their mean softmax.
    Ensemble,
    /// The randomised RGN with EOT over 2 paths.
    Randomised,
}

/// PGD settings and target.
#[derive(Debug, Clone)]
pub struct AttackCase {
    pub target: TargetKind,
    pub loss: AttackLoss,
    pub eps: f64,
    pub step_fraction: f64,
    pub steps: usize,
    pub random_start: bool,
    pub kappa: f64,
    /// MI-FGSM's decay μ (`None`: the sign of the raw gradient).
    pub momentum: Option<f64>,
    /// DI²-FGSM's transform.
    pub input_diversity: Option<InputDiversity>,
    /// SGM's backward.
    pub skip_gradient: Option<SkipGradient>,
}

impl AttackCase {
    /// The reference's settings struct (both engines take the same fields).
    pub fn settings(&self) -> eio_reference::attack::AttackSettings {
        eio_reference::attack::AttackSettings {
            eps: self.eps,
            step_size: self.eps * self.step_fraction,
            steps: self.steps,
            random_start: self.random_start,
            loss: self.loss,
            cw_kappa: self.kappa,
            momentum: self.momentum,
            input_diversity: self.input_diversity,
            skip_gradient: self.skip_gradient,
        }
    }
}

/// The target kinds a PGD case can take.
fn target_kind() -> impl Strategy<Value = TargetKind> {
    prop_oneof![
        Just(TargetKind::Path(BnMode::Eval)),
        Just(TargetKind::Path(BnMode::Train)),
        Just(TargetKind::Ensemble),
        Just(TargetKind::Randomised),
    ]
}

/// CE or C&W (κ 0, 0.1 as the paper, or 5 so that every margin is active) against a path
/// (train or eval BN), an ensemble of 2 or the randomised RGN with EOT 2; eps 0.03 or 0.07,
/// step eps/4, 1-4 steps, with or without random start; plain PGD.
pub fn attack_case() -> impl Strategy<Value = AttackCase> {
    (
        target_kind(),
        prop_oneof![Just(AttackLoss::Ce), Just(AttackLoss::Cw)],
        prop_oneof![Just(0.03), Just(0.07)],
        1usize..=4,
        any::<bool>(),
        prop_oneof![Just(0.0), Just(0.1), Just(5.0)],
    )
        .prop_map(
            |(target, loss, eps, steps, random_start, kappa)| AttackCase {
                target,
                loss,
                eps,
                step_fraction: 0.25,
                steps,
                random_start,
                kappa,
                momentum: None,
                input_diversity: None,
                skip_gradient: None,
            },
        )
}

/// The transfer attacks of the black-box suite (issue 13), each a strategy of
/// [`transfer_attack_case`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// MI-FGSM: momentum PGD.
    Momentum,
    /// M-DI²-FGSM: momentum and input diversity.
    MomentumDiversity,
    /// SGM, with or without momentum.
    SkipGradient,
}

/// MI-FGSM's decay: 1 (Dong et al., the suite's default), 0.9 or 0.5.
pub fn momentum_decay() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), Just(0.9), Just(0.5)]
}

/// DI²-FGSM's transform: probability 0.5 (M-DI²-FGSM's) or 1, resize rate 0.9 (torchattacks;
/// on the 8x8 cases only size 7 at offset 0) or 0.5 (sizes 4-7, offsets 0-3), either
/// interpolation.
pub fn input_diversity() -> impl Strategy<Value = InputDiversity> {
    (
        prop_oneof![Just(0.5), Just(1.0)],
        prop_oneof![Just(0.9), Just(0.5)],
        prop_oneof![Just(Interpolation::Bilinear), Just(Interpolation::Nearest)],
    )
        .prop_map(|(probability, resize_rate, interpolation)| InputDiversity {
            probability,
            resize_rate,
            interpolation,
        })
}

/// SGM: γ 0.2 (the suite's) or 0.5, with or without the per-block normalisation and the
/// first-block exclusion.
pub fn skip_gradient() -> impl Strategy<Value = SkipGradient> {
    (
        prop_oneof![Just(0.2), Just(0.5)],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(gamma, normalise, exclude_stage_first)| SkipGradient {
            gamma,
            normalise,
            exclude_stage_first,
        })
}

/// An attack of kind `transfer` on top of [`attack_case`]'s settings, with any of the three
/// losses (CE, C&W, DVERGE's C&W).
pub fn transfer_attack_case(transfer: Transfer) -> impl Strategy<Value = AttackCase> {
    (
        attack_case(),
        prop_oneof![
            Just(AttackLoss::Ce),
            Just(AttackLoss::Cw),
            Just(AttackLoss::CwDverge)
        ],
        momentum_decay(),
        input_diversity(),
        skip_gradient(),
        any::<bool>(),
    )
        .prop_map(
            move |(case, loss, decay, diversity, skip, sgm_momentum)| AttackCase {
                loss,
                momentum: match transfer {
                    Transfer::SkipGradient if !sgm_momentum => None,
                    _ => Some(decay),
                },
                input_diversity: (transfer == Transfer::MomentumDiversity).then_some(diversity),
                skip_gradient: (transfer == Transfer::SkipGradient).then_some(skip),
                ..case
            },
        )
}

impl Fixture {
    /// The attack target of `kind` over this fixture's states and paths.
    pub fn target(&self, kind: TargetKind) -> crate::engine::TargetSpec<'_> {
        use crate::engine::{MemberSpec, TargetSpec};
        match kind {
            TargetKind::Path(mode) => TargetSpec::Path {
                plan: &self.plan,
                values: &self.values,
                path: &self.path,
                mode,
            },
            TargetKind::Ensemble => TargetSpec::Ensemble(vec![
                MemberSpec {
                    plan: &self.plan,
                    values: &self.values,
                    path: &self.path,
                },
                MemberSpec {
                    plan: &self.plan,
                    values: &self.other_values,
                    path: &self.other_path,
                },
            ]),
            TargetKind::Randomised => TargetSpec::Randomised {
                plan: &self.plan,
                values: &self.values,
                eot: 2,
            },
        }
    }
}

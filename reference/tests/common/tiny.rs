//! Tiny seeded models for the model-level tests: a ResNet-8 at quarter width on 8x8 images
//! (K = 7 RGBs, L = 8 distillation layers), states perturbed away from their initial values,
//! seeded batches, and a finite-difference check over a subset of a tensor's entries.
#![allow(dead_code)]

use eio_reference::grad_check::{relative_error, DEFAULT_FLOOR};
use eio_reference::state::ModelState;
use eio_spec::config::{Activation, Arch, ModelConfig, Sharing, VggGating};
use eio_spec::plan::{Init, Op, ParamSpec, Plan, Role};
use eio_spec::rng::Seeds;
use eio_spec::Path;
use ndarray::{Array, Array4, ArrayD, Dimension};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The relative-error tolerance of every finite-difference check.
pub const FD_TOL: f64 = 1e-6;

/// The finite-difference step of the model-level checks. A whole network's objective carries
/// round-off of about one ulp of |f| (~1e-15), which a central difference turns into an
/// absolute error of ~1e-15 / h in the derivative; the input gradients of a tiny network are
/// as small as 1e-5, so `grad_check::DEFAULT_STEP` (1e-6) would leave round-off alone at the
/// 1e-6 tolerance. h = 1e-5 is the textbook step of central differences (cube root of the
/// machine epsilon) and keeps the truncation error (h²) far below the tolerance.
pub const FD_STEP: f64 = 1e-5;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// ResNet-8, width 1/4 (channels 4, 8, 16), `in_channels` x 8 x 8 input.
pub fn resnet8(
    n: usize,
    sharing: Sharing,
    activation: Activation,
    in_channels: usize,
    classes: usize,
) -> ModelConfig {
    let (mean, std) = match in_channels {
        3 => (vec![0.4914, 0.4822, 0.4465], vec![0.2023, 0.1994, 0.2010]),
        c => (vec![0.286; c], vec![0.353; c]),
    };
    ModelConfig {
        arch: Arch::Resnet,
        depth: 8,
        width: 0.25,
        n,
        sharing,
        classes,
        in_channels,
        input_size: 8,
        activation,
        leaky_slope: 0.1,
        mean,
        std,
        vgg_gated: VggGating::Convs,
    }
}

/// The default tiny model: n = 2, ReLU, 3 input channels, 4 classes.
pub fn tiny(sharing: Sharing) -> ModelConfig {
    resnet8(2, sharing, Activation::Relu, 3, 4)
}

/// VGG-16 at width 1/16 (channels 4..32) on 32 x 32 images.
pub fn tiny_vgg(n: usize, sharing: Sharing, classes: usize) -> ModelConfig {
    ModelConfig {
        arch: Arch::Vgg16,
        depth: 16,
        width: 1.0 / 16.0,
        n,
        sharing,
        classes,
        in_channels: 3,
        input_size: 32,
        activation: Activation::Relu,
        leaky_slope: 0.1,
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.2023, 0.1994, 0.2010],
        vgg_gated: VggGating::Convs,
    }
}

pub fn plan(model: &ModelConfig) -> Plan {
    Plan::build(model).expect("the tiny model is a valid plan")
}

/// The initial state of `plan` (seed `seed`) moved away from the initial values so that no
/// test is degenerate: BN gammas in [0.5, 1.5), BN and linear biases in [-0.5, 0.5), running
/// means in [-0.3, 0.3), running variances in [0.5, 2), counters in 0..1000, and every conv
/// and linear weight scaled by a factor in [0.8, 1.2).
pub fn perturbed_state(plan: &Plan, seed: u64) -> ModelState {
    let mut state = ModelState::init(plan, &Seeds::new(seed), 0);
    let mut r = rng(seed ^ 0x05ee_d0f5_7a7e);
    for spec in &plan.params {
        match spec.role {
            Role::Counter => {
                state
                    .counters
                    .insert(spec.name.clone(), r.random_range(0..1000));
            }
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
                let tensor = state.tensors.get_mut(&spec.name).expect("init has it");
                tensor.mapv_inplace(|v| {
                    let draw = r.random_range(lo..hi);
                    if scale {
                        v * draw
                    } else {
                        draw
                    }
                });
            }
        }
    }
    state
}

/// A batch of images with pixels uniform in [0, 1).
pub fn images(r: &mut ChaCha8Rng, batch: usize, plan: &Plan) -> Array4<f64> {
    let (c, h, w) = match plan.input {
        eio_spec::plan::Shape::Map { c, h, w } => (c, h, w),
        eio_spec::plan::Shape::Vector(_) => unreachable!("image input"),
    };
    Array4::from_shape_fn((batch, c, h, w), |_| r.random_range(0.0..1.0))
}

pub fn labels(r: &mut ChaCha8Rng, batch: usize, classes: usize) -> Vec<usize> {
    (0..batch).map(|_| r.random_range(0..classes)).collect()
}

/// Uniform in [-1, 1), any shape.
pub fn uniform_like(r: &mut ChaCha8Rng, shape: &[usize]) -> ArrayD<f64> {
    ArrayD::from_shape_fn(shape, |_| r.random_range(-1.0..1.0))
}

/// 0, 1, 0, 1, … over the K gates: uses candidate 0 and candidate n-1 (both candidates for
/// n = 2).
pub fn alternating_path(plan: &Plan) -> Path {
    Path::new(
        (0..plan.k())
            .map(|g| if g % 2 == 0 { 0 } else { (plan.n - 1) as u8 })
            .collect(),
    )
}

pub fn learnable(plan: &Plan) -> impl Iterator<Item = &ParamSpec> {
    plan.params.iter().filter(|p| p.role == Role::Learnable)
}

/// Every BatchNorm of the plan together with the path's choice: the (counter, mean, var)
/// names the path reads at nodes `0..=end`.
pub fn bns_reached(plan: &Plan, path: &Path, end: usize) -> Vec<eio_spec::plan::BnNames> {
    plan.nodes[..=end]
        .iter()
        .filter_map(|node| match &node.op {
            Op::BatchNorm { params, .. } => Some(params.select(path).clone()),
            _ => None,
        })
        .collect()
}

/// Whether any of `paths` uses candidate `spec.candidate` (tensors of no candidate are
/// always "used").
pub fn used_by_any(spec: &ParamSpec, paths: &[Path]) -> bool {
    match spec.candidate {
        Some((gate, c)) => paths.iter().any(|p| p.choice(gate) == c),
        None => true,
    }
}

/// At most `k` distinct flat indices of a tensor of `len` elements (all of them when
/// `len <= k`), in increasing order.
pub fn entries(r: &mut ChaCha8Rng, len: usize, k: usize) -> Vec<usize> {
    if len <= k {
        return (0..len).collect();
    }
    let mut v = sample(r, len, k).into_vec();
    v.sort_unstable();
    v
}

/// Central finite differences (step [`FD_STEP`]) of `f` at `x` at the flat (row-major)
/// positions `at`, compared with `analytic` by
/// [`eio_reference::grad_check::relative_error`] (floor [`DEFAULT_FLOOR`]); panics naming
/// the worst entry unless every error is below [`FD_TOL`]. Returns the worst error.
pub fn check_entries<D: Dimension, F: FnMut(&Array<f64, D>) -> f64>(
    what: &str,
    mut f: F,
    x: &Array<f64, D>,
    analytic: &Array<f64, D>,
    at: &[usize],
) -> f64 {
    assert_eq!(
        x.shape(),
        analytic.shape(),
        "{what}: analytic gradient shape"
    );
    let mut probe = x.as_standard_layout().into_owned();
    let analytic = analytic.as_standard_layout().into_owned();
    let a_flat = analytic.as_slice().expect("standard layout");
    let h = FD_STEP;
    let mut worst = (0.0, 0, 0.0, 0.0);
    for &i in at {
        let original = probe.as_slice().expect("standard layout")[i];
        probe.as_slice_mut().expect("standard layout")[i] = original + h;
        let plus = f(&probe);
        probe.as_slice_mut().expect("standard layout")[i] = original - h;
        let minus = f(&probe);
        probe.as_slice_mut().expect("standard layout")[i] = original;
        let numeric = (plus - minus) / (2.0 * h);
        let e = relative_error(a_flat[i], numeric, DEFAULT_FLOOR);
        if e > worst.0 || e.is_nan() {
            worst = (e, i, a_flat[i], numeric);
        }
    }
    assert!(
        worst.0 < FD_TOL,
        "gradient check failed for {what}: relative error {:e} >= {FD_TOL:e} at flat index {} \
         (analytic {:e}, numeric {:e})",
        worst.0,
        worst.1,
        worst.2,
        worst.3
    );
    worst.0
}

/// max |a - b| over two equally shaped arrays.
pub fn max_abs_diff<D: Dimension>(a: &Array<f64, D>, b: &Array<f64, D>) -> f64 {
    assert_eq!(a.shape(), b.shape(), "shape mismatch");
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A preset's config with the model replaced by the tiny ResNet-8 (keeping the preset's
/// weight sharing).
pub fn preset_tiny(preset: eio_spec::Preset) -> eio_spec::Config {
    let mut config = preset.config().expect("shipped presets are valid");
    config.model = tiny(config.model.sharing);
    config
}

/// The SGD of `config.train` (lr, momentum, Nesterov, weight decay).
pub fn sgd(config: &eio_spec::Config) -> eio_reference::optim::Sgd {
    eio_reference::optim::Sgd::new(eio_reference::optim::SgdConfig {
        lr: config.train.lr,
        momentum: config.train.momentum,
        weight_decay: config.train.weight_decay,
        nesterov: config.train.nesterov,
    })
}

/// The names of the tensors and counters whose values differ between `a` and `b` (bit for
/// bit), including names present in only one of them.
pub fn changed(a: &ModelState, b: &ModelState) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (name, ta) in &a.tensors {
        match b.tensors.get(name) {
            Some(tb)
                if ta.shape() == tb.shape()
                    && ta
                        .iter()
                        .zip(tb.iter())
                        .all(|(x, y)| x.to_bits() == y.to_bits()) => {}
            _ => {
                out.insert(name.clone());
            }
        }
    }
    for (name, ca) in &a.counters {
        if b.counters.get(name) != Some(ca) {
            out.insert(name.clone());
        }
    }
    for name in b.tensors.keys().chain(b.counters.keys()) {
        if !a.tensors.contains_key(name) && !a.counters.contains_key(name) {
            out.insert(name.clone());
        }
    }
    out
}

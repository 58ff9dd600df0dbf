//! Central finite-difference checks of the second-order gradients of `second_order`: the
//! derivative of s = ⟨∇ₓL, v⟩ (L the batch-mean cross-entropy, v a fixed random direction)
//! with respect to the parameters and the input, as GAL and TRS need it.
//!
//! The reference is the FIRST-ORDER function (θ, x) ↦ s = ⟨input_gradient(θ, x).grad, v⟩,
//! whose central differences along a probe direction d (in parameter and input space) are
//! compared with ⟨∂s/∂(θ, x), d⟩ from `input_gradient_vjp`. The probes:
//!
//! - single entries (d one-hot): entries of a tensor of every kind (conv weight, BN gamma,
//!   BN beta, linear weight, linear bias) and of the input;
//! - random directions, uniform in [-1, 1), over every entry of a tensor (or of all tensors of
//!   one kind) and over the whole input: every entry checked at once, each with a random
//!   weight.
//!
//! Step and tolerance. The tolerance is `tiny::FD_TOL` = 1e-6 relative
//! (`grad_check::relative_error`, floor 1e-8) and the first step `tiny::FD_STEP` = 1e-5, those
//! of the first-order model tests. Here no single step serves every probe:
//!
//! - round-off: s = Σ g⊙v sums terms far larger than some of its derivatives (Σ|g⊙v| ≈ 5
//!   where a single entry's derivative can be 2e-6); its round-off, ~3e-16 absolute, becomes
//!   ~3e-16/h in a difference quotient: 3e-11 at h = 1e-5, 1e-5 relative for such an entry
//!   (observed: 5.9e-6 at 1e-5, 2.9e-7 at 1e-4, 6e-8 at 1e-3);
//! - truncation (∝ h²): an entry of the first conv, which moves every activation, is already
//!   3e-5 relative off at h = 1e-4;
//! - kinks (below): the wider the step or the direction, the likelier one is crossed.
//!
//! So a probe is measured at `STEPS` = [1e-5, 1e-4, 1e-6] in turn, moving on only while it
//! misses the tolerance (or crossed a kink), and its error is the smallest over the usable
//! steps. Each step is a valid central difference; a wrong formula is off at all of them (the
//! broken variants below have errors of order 1 at every step), and every variant of a check
//! is measured at the same steps.
//!
//! s is only piecewise smooth: ∇ₓL jumps where a ReLU/LeakyReLU input crosses 0 or a max-pool
//! argmax changes, and a difference quotient across such a jump is meaningless. Every
//! evaluation therefore also records the activation pattern (the sign of every ReLU input, the
//! argmax of every pool window); a step whose ±h patterns differ from the base one is not
//! used, a probe with no usable step is reported and skipped, and a check fails if more than
//! one probe in ten is skipped.
//!
//! The deliberate-break tests run the same checks with a wrong second derivative (the loss's
//! ∂s/∂z seed dropped; BatchNorm's train-mode second-order term dropped, or missing its path
//! through σ) and assert that the error is then large (> 1e-3), while the correct one stays
//! below the tolerance.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use std::collections::BTreeMap;

use eio_reference::grad_check::{relative_error, weighted_sum, DEFAULT_FLOOR};
use eio_reference::model::{backward, forward, Gradients, Trace};
use eio_reference::ops::batch_norm::{batch_norm2d_tangent, batch_norm2d_tangent_backward};
use eio_reference::ops::pool::max_pool2x2_tangent;
use eio_reference::ops::{
    batch_norm2d, batch_norm2d_backward, max_pool2x2, max_pool2x2_backward, BnMode, BnRunningStats,
    BN_EPS, BN_MOMENTUM,
};
use eio_reference::second_order::{
    cross_entropy_seeds, input_gradient, input_gradient_vjp, reverse_over_forward, tangents,
};
use eio_reference::state::ModelState;
use eio_spec::config::{Activation, Arch, ModelConfig, Sharing, VggGating};
use eio_spec::plan::{
    BnNames, Gate, Gated, Init, LinearNames, Node, Op, ParamSpec, Plan, Role, Shape,
};
use eio_spec::Path;
use ndarray::{Array1, Array4, ArrayD, Ix2, Ix4};
use rand_chacha::ChaCha8Rng;

/// The steps of the central differences, in the order tried (see the module documentation):
/// `tiny::FD_STEP`, then a larger one against round-off, then a smaller one against kinks and
/// truncation.
const STEPS: [f64; 3] = [tiny::FD_STEP, 1e-4, 1e-6];

// ---------------------------------------------------------------------------------------------
// Model level
// ---------------------------------------------------------------------------------------------

/// Which ∂s/∂θ, ∂s/∂x is checked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    /// `input_gradient_vjp`.
    Correct,
    /// Deliberately wrong: the loss's ∂s/∂z seed dropped (only the ∂s/∂ż seed kept).
    NoLogitSeed,
}

/// How the parameter directions are grouped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Directions {
    /// One random direction per tensor the pass reads.
    PerTensor,
    /// One random direction per kind of tensor, over all tensors of that kind the pass reads.
    PerKind,
    /// One random direction over every tensor the pass reads.
    All,
}

struct Case {
    label: String,
    plan: Plan,
    state: ModelState,
    path: Path,
    x: Array4<f64>,
    labels: Vec<usize>,
    v: Array4<f64>,
    mode: BnMode,
    directions: Directions,
    /// Single entries per kind of tensor (of one seeded tensor of that kind), or per tensor
    /// with `Directions::PerTensor`.
    entries: usize,
    /// Single entries of the input.
    input_entries: usize,
    seed: u64,
}

/// A probe direction d in parameter and input space.
struct Probe {
    what: String,
    params: BTreeMap<String, ArrayD<f64>>,
    input: Option<Array4<f64>>,
}

/// The worst error over a set of probes and how many were skipped.
#[derive(Debug, Default, Clone)]
struct Outcome {
    worst: f64,
    worst_at: String,
    probes: usize,
    skipped: usize,
    fallbacks: usize,
}

impl Case {
    fn new(label: &str, model: &ModelConfig, mode: BnMode, batch: usize, seed: u64) -> Case {
        Case::of_plan(label, tiny::plan(model), mode, batch, seed)
    }

    /// A case on `plan` with a perturbed state, a batch of `batch` images with random labels,
    /// a random direction v in [-1, 1) and the alternating path; per-kind directions, one
    /// entry per kind and 4 input entries.
    fn of_plan(label: &str, plan: Plan, mode: BnMode, batch: usize, seed: u64) -> Case {
        let state = tiny::perturbed_state(&plan, seed);
        let mut r = tiny::rng(seed.wrapping_mul(31).wrapping_add(7));
        let x = tiny::images(&mut r, batch, &plan);
        let labels = tiny::labels(&mut r, batch, plan.classes);
        let v = uniform4(&mut r, x.shape());
        let path = tiny::alternating_path(&plan);
        Case {
            label: label.to_string(),
            plan,
            state,
            path,
            x,
            labels,
            v,
            mode,
            directions: Directions::PerKind,
            entries: 1,
            input_entries: 4,
            seed,
        }
    }

    /// s = ⟨∇ₓL, v⟩ by the first-order code at θ + t·d, x + t·d, and the activation pattern.
    fn value(&self, probe: &Probe, t: f64) -> (f64, Vec<bool>) {
        let mut state = self.state.clone();
        for (name, d) in &probe.params {
            let tensor = state.tensors.get_mut(name).expect("a tensor of the state");
            tensor.scaled_add(t, d);
        }
        let mut x = self.x.clone();
        if let Some(d) = &probe.input {
            x.scaled_add(t, d);
        }
        let ig = input_gradient(&self.plan, &state, &self.path, &x, &self.labels, self.mode);
        (
            weighted_sum(&ig.grad, &self.v),
            pattern(&self.plan, &ig.trace),
        )
    }

    /// The central difference of s along `probe` with step h, if the activation pattern is
    /// the base one at ±h.
    fn central_difference(&self, probe: &Probe, h: f64, base: &[bool]) -> Option<f64> {
        let (plus, p_plus) = self.value(probe, h);
        let (minus, p_minus) = self.value(probe, -h);
        (p_plus == base && p_minus == base).then(|| (plus - minus) / (2.0 * h))
    }

    fn analytic(&self, variant: Variant) -> Gradients {
        let ig = input_gradient(
            &self.plan,
            &self.state,
            &self.path,
            &self.x,
            &self.labels,
            self.mode,
        );
        match variant {
            Variant::Correct => {
                input_gradient_vjp(&self.plan, &self.state, &ig.trace, &self.labels, &self.v)
            }
            Variant::NoLogitSeed => {
                let end = self.plan.logits();
                let t = tangents(&self.plan, &self.state, &ig.trace, &self.v);
                let dz = t[end].clone().into_dimensionality::<Ix2>().expect("logits");
                let seeds = cross_entropy_seeds(&ig.logits, &self.labels, &dz);
                reverse_over_forward(
                    &self.plan,
                    &self.state,
                    &ig.trace,
                    &t,
                    &[],
                    &[(end, seeds.logits_tangent.into_dyn())],
                )
                .gradients
            }
        }
    }

    /// The names of the tensors the first-order backward of L reaches (the pass's tensors).
    fn used(&self) -> Vec<String> {
        let ig = input_gradient(
            &self.plan,
            &self.state,
            &self.path,
            &self.x,
            &self.labels,
            self.mode,
        );
        let seed = eio_reference::loss::cross_entropy(&ig.logits, &self.labels).grad;
        backward(
            &self.plan,
            &self.state,
            &ig.trace,
            &[(self.plan.logits(), seed.into_dyn())],
        )
        .params
        .into_keys()
        .collect()
    }

    /// The probes: random directions (per tensor or per kind, and over the input), then single
    /// entries of every kind and of the input.
    fn probes(&self, used: &[String]) -> Vec<Probe> {
        let mut r = tiny::rng(self.seed ^ 0x2d);
        let kind = |name: &String| kind_of(&self.plan, name).expect("a learnable tensor");
        let kinds: std::collections::BTreeSet<Kind> = used.iter().map(kind).collect();
        assert_eq!(
            kinds.len(),
            Kind::ALL.len(),
            "{}: the pass reads every kind of tensor",
            self.label
        );
        let mut probes = Vec::new();
        let random = |r: &mut ChaCha8Rng, name: &String| {
            tiny::uniform_like(r, self.state.tensor(name).shape())
        };
        match self.directions {
            Directions::PerTensor => {
                for name in used {
                    probes.push(Probe {
                        what: format!("direction over {name}"),
                        params: BTreeMap::from([(name.clone(), random(&mut r, name))]),
                        input: None,
                    });
                }
            }
            Directions::PerKind => {
                for k in &kinds {
                    let params: BTreeMap<_, _> = used
                        .iter()
                        .filter(|n| kind(n) == *k)
                        .map(|n| (n.clone(), random(&mut r, n)))
                        .collect();
                    probes.push(Probe {
                        what: format!("direction over every {k:?} ({} tensors)", params.len()),
                        params,
                        input: None,
                    });
                }
            }
            Directions::All => probes.push(Probe {
                what: format!("direction over all {} tensors", used.len()),
                params: used
                    .iter()
                    .map(|n| (n.clone(), random(&mut r, n)))
                    .collect(),
                input: None,
            }),
        }
        probes.push(Probe {
            what: "direction over the input".into(),
            params: BTreeMap::new(),
            input: Some(uniform4(&mut r, self.x.shape())),
        });
        let entry_tensors: Vec<&String> = match self.directions {
            Directions::PerTensor => used.iter().collect(),
            Directions::PerKind | Directions::All => kinds
                .iter()
                .map(|k| {
                    let of_kind: Vec<&String> = used.iter().filter(|n| kind(n) == *k).collect();
                    of_kind[tiny::entries(&mut r, of_kind.len(), 1)[0]]
                })
                .collect(),
        };
        for name in entry_tensors {
            let tensor = self.state.tensor(name);
            for i in tiny::entries(&mut r, tensor.len(), self.entries) {
                let mut d = ArrayD::zeros(tensor.raw_dim());
                d.as_slice_mut().expect("standard layout")[i] = 1.0;
                probes.push(Probe {
                    what: format!("{name}[{i}]"),
                    params: BTreeMap::from([(name.clone(), d)]),
                    input: None,
                });
            }
        }
        for i in tiny::entries(&mut r, self.x.len(), self.input_entries) {
            let mut d = Array4::zeros(self.x.dim());
            d.as_slice_mut().expect("standard layout")[i] = 1.0;
            probes.push(Probe {
                what: format!("input[{i}]"),
                params: BTreeMap::new(),
                input: Some(d),
            });
        }
        probes
    }

    /// Compares each variant's gradients with the same finite differences and returns the
    /// outcome per variant (asserting only that few probes were skipped).
    fn check(&self, variants: &[Variant]) -> Vec<Outcome> {
        let used = self.used();
        let grads: Vec<Gradients> = variants.iter().map(|&v| self.analytic(v)).collect();
        for (variant, g) in variants.iter().zip(&grads) {
            assert_eq!(
                g.params.keys().cloned().collect::<Vec<_>>(),
                used,
                "{} [{variant:?}]: gradients for exactly the tensors the pass used",
                self.label
            );
        }
        let no_move = Probe {
            what: String::new(),
            params: BTreeMap::new(),
            input: None,
        };
        let (_, base) = self.value(&no_move, 0.0);
        let mut outcomes = vec![Outcome::default(); variants.len()];
        for probe in self.probes(&used) {
            let analytic: Vec<f64> = grads.iter().map(|g| directional(g, &probe)).collect();
            let errors = |numeric: Option<f64>| -> Vec<Option<f64>> {
                analytic
                    .iter()
                    .map(|&a| numeric.map(|n| relative_error(a, n, DEFAULT_FLOOR)))
                    .collect()
            };
            // The smallest error over the steps tried; the next step only while some
            // variant misses the tolerance (or no step was usable yet).
            let mut errs: Vec<Option<f64>> = vec![None; variants.len()];
            let mut steps_used = 0;
            for h in STEPS {
                if errs.iter().all(|e| e.is_some_and(|e| e < tiny::FD_TOL)) {
                    break;
                }
                steps_used += 1;
                for (e, e2) in errs
                    .iter_mut()
                    .zip(errors(self.central_difference(&probe, h, &base)))
                {
                    *e = match (*e, e2) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            let fallback = steps_used > 1;
            for ((o, e), a) in outcomes.iter_mut().zip(&errs).zip(&analytic) {
                o.probes += 1;
                o.fallbacks += usize::from(fallback);
                match e {
                    None => o.skipped += 1,
                    Some(e) if *e > o.worst || e.is_nan() => {
                        o.worst = *e;
                        o.worst_at = format!("{} (analytic {a:e})", probe.what);
                    }
                    Some(_) => {}
                }
            }
            if errs.iter().all(Option::is_none) {
                eprintln!(
                    "  {}: the activation pattern changes within ±h, skipped",
                    probe.what
                );
            }
        }
        for (variant, o) in variants.iter().zip(&outcomes) {
            eprintln!(
                "{} [{variant:?}]: {} probes ({} skipped at a kink, {} re-measured at \
                 another step), worst relative error {:e} at {}",
                self.label, o.probes, o.skipped, o.fallbacks, o.worst, o.worst_at
            );
            assert!(
                o.skipped * 10 <= o.probes,
                "{}: {} of {} probes crossed a kink",
                self.label,
                o.skipped,
                o.probes
            );
        }
        outcomes
    }
}

/// ⟨∂s/∂(θ, x), d⟩ for the probe direction d.
fn directional(grads: &Gradients, probe: &Probe) -> f64 {
    let mut total = 0.0;
    for (name, d) in &probe.params {
        total += weighted_sum(&grads.params[name], d);
    }
    if let Some(d) = &probe.input {
        total += weighted_sum(grads.input.as_ref().expect("an input gradient"), d);
    }
    total
}

fn uniform4(r: &mut ChaCha8Rng, shape: &[usize]) -> Array4<f64> {
    tiny::uniform_like(r, shape)
        .into_dimensionality::<Ix4>()
        .expect("a 4-d shape")
}

/// The kinds of learnable tensors.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    ConvWeight,
    BnGamma,
    BnBeta,
    LinearWeight,
    LinearBias,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::ConvWeight,
        Kind::BnGamma,
        Kind::BnBeta,
        Kind::LinearWeight,
        Kind::LinearBias,
    ];
}

fn kind_of(plan: &Plan, name: &str) -> Option<Kind> {
    for node in &plan.nodes {
        match &node.op {
            Op::Conv { weight, .. } if weight.candidates.iter().any(|w| w == name) => {
                return Some(Kind::ConvWeight)
            }
            Op::BatchNorm { params, .. } => {
                for p in &params.candidates {
                    if p.weight == name {
                        return Some(Kind::BnGamma);
                    }
                    if p.bias == name {
                        return Some(Kind::BnBeta);
                    }
                }
            }
            Op::Linear { params, .. } => {
                for p in &params.candidates {
                    if p.weight == name {
                        return Some(Kind::LinearWeight);
                    }
                    if p.bias == name {
                        return Some(Kind::LinearBias);
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// The activation pattern of a pass: the sign of the input of every ReLU/LeakyReLU and the
/// selected element of every 2x2 max-pool window. s is smooth where it does not change.
fn pattern(plan: &Plan, trace: &Trace) -> Vec<bool> {
    let mut bits = Vec::new();
    for (id, node) in plan.nodes.iter().enumerate().take(trace.outputs.len()) {
        let x = trace.output(node.inputs.first().copied().unwrap_or(id));
        match node.op {
            Op::Relu | Op::LeakyRelu { .. } => bits.extend(x.iter().map(|&v| v > 0.0)),
            Op::MaxPool2 => {
                let x = x.clone().into_dimensionality().expect("a feature map");
                let ones = Array4::ones(max_pool2x2(&x).dim());
                bits.extend(max_pool2x2_backward(&x, &ones).iter().map(|&v| v > 0.0));
            }
            _ => {}
        }
    }
    bits
}

fn assert_correct(case: &Case) -> Outcome {
    let outcome = case.check(&[Variant::Correct]).remove(0);
    assert!(
        outcome.worst < tiny::FD_TOL,
        "{}: second-order gradient check failed: relative error {:e} >= {:e} at {}",
        case.label,
        outcome.worst,
        tiny::FD_TOL,
        outcome.worst_at
    );
    outcome
}

#[test]
fn resnet_relu_train_independent() {
    let case = Case::new(
        "resnet8 relu Train independent",
        &tiny::tiny(Sharing::Independent),
        BnMode::Train,
        3,
        101,
    );
    assert_correct(&case);
}

#[test]
fn resnet_relu_eval_shared_conv() {
    let case = Case::new(
        "resnet8 relu Eval shared-conv",
        &tiny::tiny(Sharing::SharedConv),
        BnMode::Eval,
        3,
        102,
    );
    assert_correct(&case);
}

#[test]
fn resnet_leaky_relu_both_modes() {
    let model = tiny::resnet8(2, Sharing::Independent, Activation::LeakyRelu, 3, 5);
    for (i, mode) in [BnMode::Train, BnMode::Eval].into_iter().enumerate() {
        let case = Case::new(
            &format!("resnet8 leaky-relu {mode:?}"),
            &model,
            mode,
            2,
            103 + i as u64,
        );
        assert!(case
            .plan
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::LeakyRelu { .. })));
        assert_correct(&case);
    }
}

/// A VGG-like plan small enough to check every tensor: 3x8x8 input, normaliser,
/// [conv 3→4, BN, act, max pool], [conv 4→6, BN, act, max pool] (this block an RGB with two
/// candidates), flatten (6·2·2 = 24), linear 24→3.
fn vgg_like(activation: Activation) -> Plan {
    let map = |c, h, w| Shape::Map { c, h, w };
    fn fixed<T>(v: T) -> Gated<T> {
        Gated {
            gate: None,
            candidates: vec![v],
        }
    }
    fn gated<T>(v: Vec<T>) -> Gated<T> {
        Gated {
            gate: Some(0),
            candidates: v,
        }
    }
    let act = match activation {
        Activation::Relu => Op::Relu,
        Activation::LeakyRelu => Op::LeakyRelu { slope: 0.1 },
    };
    let bn = |module: &str| BnNames {
        weight: format!("{module}.weight"),
        bias: format!("{module}.bias"),
        running_mean: format!("{module}.running_mean"),
        running_var: format!("{module}.running_var"),
        num_batches_tracked: format!("{module}.num_batches_tracked"),
    };
    let conv = |cin, cout, weight| Op::Conv {
        in_channels: cin,
        out_channels: cout,
        kernel: 3,
        stride: 1,
        padding: 1,
        weight,
    };
    let node = |op, inputs: &[usize], shape| Node {
        op,
        inputs: inputs.to_vec(),
        shape,
    };
    let nodes = vec![
        node(Op::Input, &[], map(3, 8, 8)),
        node(
            Op::Normalize {
                mean: "norm.mean".into(),
                std: "norm.std".into(),
            },
            &[0],
            map(3, 8, 8),
        ),
        node(
            conv(3, 4, fixed("f0.conv.weight".to_string())),
            &[1],
            map(4, 8, 8),
        ),
        node(
            Op::BatchNorm {
                channels: 4,
                params: fixed(bn("f0.bn")),
            },
            &[2],
            map(4, 8, 8),
        ),
        node(act.clone(), &[3], map(4, 8, 8)),
        node(Op::MaxPool2, &[4], map(4, 4, 4)),
        node(
            conv(
                4,
                6,
                gated(vec!["f1.0.conv.weight".into(), "f1.1.conv.weight".into()]),
            ),
            &[5],
            map(6, 4, 4),
        ),
        node(
            Op::BatchNorm {
                channels: 6,
                params: gated(vec![bn("f1.0.bn"), bn("f1.1.bn")]),
            },
            &[6],
            map(6, 4, 4),
        ),
        node(act, &[7], map(6, 4, 4)),
        node(Op::MaxPool2, &[8], map(6, 2, 2)),
        node(Op::Flatten, &[9], Shape::Vector(24)),
        node(
            Op::Linear {
                in_features: 24,
                out_features: 3,
                params: fixed(LinearNames {
                    weight: "fc.weight".into(),
                    bias: "fc.bias".into(),
                }),
            },
            &[10],
            Shape::Vector(3),
        ),
    ];
    let spec = |name: &str, shape: &[usize], role, init, candidate| ParamSpec {
        name: name.to_string(),
        shape: shape.to_vec(),
        role,
        init,
        candidate,
    };
    let mut params = vec![
        spec(
            "norm.mean",
            &[3],
            Role::Constant,
            Init::Values(vec![0.49, 0.48, 0.45]),
            None,
        ),
        spec(
            "norm.std",
            &[3],
            Role::Constant,
            Init::Values(vec![0.20, 0.19, 0.21]),
            None,
        ),
    ];
    let mut conv_bn = |module: &str, cin: usize, cout: usize, candidate| {
        let std = (2.0 / (9.0 * cout as f64)).sqrt();
        params.push(spec(
            &format!("{module}.conv.weight"),
            &[cout, cin, 3, 3],
            Role::Learnable,
            Init::Normal { std },
            candidate,
        ));
        let names = bn(&format!("{module}.bn"));
        for (name, role, init) in [
            (names.weight, Role::Learnable, Init::Ones),
            (names.bias, Role::Learnable, Init::Zeros),
            (names.running_mean, Role::RunningStat, Init::Zeros),
            (names.running_var, Role::RunningStat, Init::Ones),
        ] {
            params.push(spec(&name, &[cout], role, init, candidate));
        }
        params.push(spec(
            &names.num_batches_tracked,
            &[],
            Role::Counter,
            Init::Zeros,
            candidate,
        ));
    };
    conv_bn("f0", 3, 4, None);
    conv_bn("f1.0", 4, 6, Some((0, 0)));
    conv_bn("f1.1", 4, 6, Some((0, 1)));
    let bound = 1.0 / 24f64.sqrt();
    params.push(spec(
        "fc.weight",
        &[3, 24],
        Role::Learnable,
        Init::Uniform { bound },
        None,
    ));
    params.push(spec(
        "fc.bias",
        &[3],
        Role::Learnable,
        Init::Uniform { bound },
        None,
    ));
    Plan {
        name: "vgg-like".into(),
        n: 2,
        sharing: Sharing::Independent,
        input: map(3, 8, 8),
        classes: 3,
        nodes,
        gates: vec![Gate {
            module: "f1".into(),
            nodes: vec![6, 7],
        }],
        layers: Vec::new(),
        params,
    }
}

/// The VGG-like plan, per-tensor directions and 2 entries of every tensor, 8 input entries:
/// ReLU with train-mode BN, LeakyReLU with eval-mode BN.
#[test]
fn vgg_like_max_pool_every_tensor() {
    let cases = [
        (Activation::Relu, BnMode::Train),
        (Activation::LeakyRelu, BnMode::Eval),
    ];
    for (i, (activation, mode)) in cases.into_iter().enumerate() {
        let mut case = Case::of_plan(
            &format!("vgg-like {activation:?} {mode:?}"),
            vgg_like(activation),
            mode,
            3,
            140 + i as u64,
        );
        case.directions = Directions::PerTensor;
        case.entries = 2;
        case.input_entries = 8;
        assert_correct(&case);
    }
}

/// The real VGG-16 plan at width 1/32 (channels 2..16) on 32 x 32 images, the smallest the
/// plan builder allows: five max pools and the flatten. A forward and backward costs ~0.2 s
/// here, so two probes: a direction over every tensor the pass reads, one over the input (the
/// VGG-like plan above checks the same ops tensor by tensor).
#[test]
fn vgg16_train() {
    let model = ModelConfig {
        arch: Arch::Vgg16,
        depth: 16,
        width: 1.0 / 32.0,
        n: 2,
        sharing: Sharing::Independent,
        classes: 3,
        in_channels: 3,
        input_size: 32,
        activation: Activation::Relu,
        leaky_slope: 0.1,
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.2023, 0.1994, 0.2010],
        vgg_gated: VggGating::Convs,
    };
    let mut case = Case::new("vgg16/32 Train", &model, BnMode::Train, 2, 110);
    assert!(case.plan.nodes.iter().any(|n| matches!(n.op, Op::MaxPool2)));
    case.directions = Directions::All;
    case.entries = 0;
    case.input_entries = 0;
    assert_correct(&case);
}

/// Dropping the loss's ∂s/∂z seed (keeping only ∂s/∂ż) must fail the same check (the same
/// finite differences), in both BN modes, while the correct gradients pass it: the ResNet
/// with its per-kind and input directions, the VGG-like plan with its default probes.
#[test]
fn deliberate_break_missing_logit_seed_fails() {
    let mut resnet = Case::new(
        "resnet8 relu Train (break)",
        &tiny::tiny(Sharing::Independent),
        BnMode::Train,
        3,
        130,
    );
    resnet.entries = 0;
    resnet.input_entries = 0;
    let cases = [
        resnet,
        Case::of_plan(
            "vgg-like relu Eval (break)",
            vgg_like(Activation::Relu),
            BnMode::Eval,
            3,
            131,
        ),
    ];
    for case in cases {
        let outcomes = case.check(&[Variant::Correct, Variant::NoLogitSeed]);
        let (good, bad) = (&outcomes[0], &outcomes[1]);
        eprintln!(
            "{}: correct {:e}, without ∂s/∂z {:e} at {}",
            case.label, good.worst, bad.worst, bad.worst_at
        );
        assert!(
            good.worst < tiny::FD_TOL,
            "{}: the correct gradients fail: {:e} at {}",
            case.label,
            good.worst,
            good.worst_at
        );
        assert!(
            bad.worst > 1e-3,
            "{}: the broken variant must fail the check, its error is only {:e}",
            case.label,
            bad.worst
        );
    }
}

/// The tangent pass is the directional derivative of the logits, the loss seed's value is
/// ⟨∇ₓL, v⟩, the tangent cotangent reaching the input is ∇ₓL itself (s is linear in v), and in
/// train mode `input_gradient_vjp` gives the same before and after the pass is committed.
#[test]
fn tangent_pass_and_its_cotangent_are_consistent() {
    for (i, (model, mode)) in [
        (
            tiny::resnet8(2, Sharing::SharedConv, Activation::LeakyRelu, 3, 4),
            BnMode::Train,
        ),
        (tiny::tiny(Sharing::Independent), BnMode::Eval),
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case::new("tangent", &model, mode, 2, 120 + i as u64);
        let ig = input_gradient(
            &case.plan,
            &case.state,
            &case.path,
            &case.x,
            &case.labels,
            mode,
        );
        let t = tangents(&case.plan, &case.state, &ig.trace, &case.v);
        let end = case.plan.logits();
        let dz = t[end].clone().into_dimensionality::<Ix2>().expect("logits");
        // Central difference of the logits along v.
        let h = tiny::FD_STEP;
        let at = |sign: f64| {
            let x = &case.x + &(&case.v * (sign * h));
            forward(&case.plan, &case.state, &case.path, &x, mode, end).logits()
        };
        let numeric = (at(1.0) - at(-1.0)) / (2.0 * h);
        let mut worst: f64 = 0.0;
        for (a, n) in dz.iter().zip(numeric.iter()) {
            worst = worst.max(relative_error(*a, *n, DEFAULT_FLOOR));
        }
        eprintln!("tangent {mode:?}: logits tangent vs central difference {worst:e}");
        assert!(worst < tiny::FD_TOL, "logits tangent: {worst:e}");
        // s from the seeds equals ⟨g, v⟩.
        let seeds = cross_entropy_seeds(&ig.logits, &case.labels, &dz);
        let s = weighted_sum(&ig.grad, &case.v);
        assert!(
            relative_error(seeds.value, s, DEFAULT_FLOOR) < 1e-12,
            "s = {} but ⟨g, v⟩ = {s}",
            seeds.value
        );
        // ∂s/∂v = g.
        let r = reverse_over_forward(
            &case.plan,
            &case.state,
            &ig.trace,
            &t,
            &[(end, seeds.logits.into_dyn())],
            &[(end, seeds.logits_tangent.into_dyn())],
        );
        let dv = r
            .tangent_input
            .expect("the tangent cotangent reaches the input");
        let scale = ig.grad.iter().fold(0.0_f64, |m, g| m.max(g.abs()));
        let diff = tiny::max_abs_diff(&dv, &ig.grad);
        assert!(
            diff <= 1e-12 * scale,
            "∂s/∂v differs from g by {diff:e} (scale {scale:e})"
        );
        // `input_gradient_vjp` is this walk, and in train mode it reads no running statistic:
        // committing the pass first (as a training step does) changes nothing.
        let vjp = input_gradient_vjp(&case.plan, &case.state, &ig.trace, &case.labels, &case.v);
        assert_eq!(vjp.params, r.gradients.params);
        assert_eq!(vjp.input, r.gradients.input);
        if mode == BnMode::Train {
            assert!(!ig.trace.running.is_empty());
            let mut committed = case.state.clone();
            committed.commit(&ig.trace);
            let after =
                input_gradient_vjp(&case.plan, &committed, &ig.trace, &case.labels, &case.v);
            assert_eq!(after.params, vjp.params);
            assert_eq!(after.input, vjp.input);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Op level
// ---------------------------------------------------------------------------------------------

fn bn_case(
    seed: u64,
) -> (
    Array4<f64>,
    Array1<f64>,
    BnRunningStats,
    Array4<f64>,
    Array4<f64>,
) {
    let mut r: ChaCha8Rng = common::rng(seed);
    let x = common::uniform4(&mut r, (2, 3, 3, 3));
    let gamma = common::uniform(&mut r, 3, 0.5, 1.5);
    let running = BnRunningStats {
        running_mean: common::uniform1(&mut r, 3),
        running_var: common::uniform(&mut r, 3, 0.5, 2.0),
        num_batches_tracked: 5,
    };
    let u = common::uniform4(&mut r, (2, 3, 3, 3));
    let w = common::uniform4(&mut r, (2, 3, 3, 3));
    (x, gamma, running, u, w)
}

/// The tangent of BatchNorm is the derivative of its output along u.
#[test]
fn batch_norm_tangent_is_the_directional_derivative() {
    for (k, mode) in [BnMode::Train, BnMode::Eval].into_iter().enumerate() {
        let (x, gamma, running, u, w) = bn_case(200 + k as u64);
        let beta = common::uniform1(&mut common::rng(7), 3);
        let analytic = batch_norm2d_tangent(&x, &gamma, &running, mode, BN_EPS, &u);
        // d/dt Σ w ⊙ bn(x + t u) at t = 0: a gradient check along one coordinate t.
        let t0 = Array1::zeros(1);
        common::assert_grad(
            &format!("batch_norm2d_tangent {mode:?}"),
            |t: &Array1<f64>| {
                let xt = &x + &(&u * t[0]);
                weighted_sum(
                    &batch_norm2d(&xt, &gamma, &beta, &running, mode, BN_EPS, BN_MOMENTUM).output,
                    &w,
                )
            },
            &t0,
            &Array1::from_elem(1, weighted_sum(&analytic, &w)),
        );
    }
}

/// The max-pool tangent is the derivative of the pooled map along u (away from ties).
#[test]
fn max_pool_tangent_is_the_directional_derivative() {
    let mut r = common::rng(210);
    let x = common::uniform4(&mut r, (2, 2, 4, 6));
    let u = common::uniform4(&mut r, (2, 2, 4, 6));
    let w = common::uniform4(&mut r, (2, 2, 2, 3));
    let analytic = max_pool2x2_tangent(&x, &u);
    common::assert_grad(
        "max_pool2x2_tangent",
        |t: &Array1<f64>| weighted_sum(&max_pool2x2(&(&x + &(&u * t[0]))), &w),
        &Array1::zeros(1),
        &Array1::from_elem(1, weighted_sum(&analytic, &w)),
    );
    // Its backward is max_pool2x2_backward: ⟨w, P u⟩ = ⟨Pᵀ w, u⟩.
    let back = max_pool2x2_backward(&x, &w);
    assert!((weighted_sum(&analytic, &w) - weighted_sum(&back, &u)).abs() < 1e-12);
}

/// T(x, u, γ) = Σ w ⊙ batch_norm2d_tangent(x, γ, u): its gradients with respect to x (the
/// second-order term), u and γ are `batch_norm2d_tangent_backward`'s, in both modes.
#[test]
fn batch_norm_tangent_backward_gradients() {
    for (k, mode) in [BnMode::Train, BnMode::Eval].into_iter().enumerate() {
        let (x, gamma, running, u, w) = bn_case(220 + k as u64);
        let r = batch_norm2d_tangent_backward(&x, &gamma, &running, mode, BN_EPS, &u, &w);
        let t = |x: &Array4<f64>, gamma: &Array1<f64>, u: &Array4<f64>| {
            weighted_sum(
                &batch_norm2d_tangent(x, gamma, &running, mode, BN_EPS, u),
                &w,
            )
        };
        common::assert_grad(
            &format!("bn tangent backward {mode:?} x (second order)"),
            |x| t(x, &gamma, &u),
            &x,
            &r.input,
        );
        common::assert_grad(
            &format!("bn tangent backward {mode:?} u"),
            |u| t(&x, &gamma, u),
            &u,
            &r.tangent,
        );
        common::assert_grad(
            &format!("bn tangent backward {mode:?} gamma"),
            |g| t(&x, g, &u),
            &gamma,
            &r.gamma,
        );
        // ∂T/∂u is the first-order BatchNorm input backward of w (the tangent map is y's
        // Jacobian).
        let first = batch_norm2d_backward(&x, &gamma, &running, mode, BN_EPS, &w);
        common::assert_close("∂T/∂u = Jᵀw", &r.tangent, &first.input, 1e-12);
        if mode == BnMode::Eval {
            assert!(
                r.input.iter().all(|&v| v == 0.0),
                "eval: ẏ does not depend on x"
            );
        }
    }
}

/// The train-mode second-order term, deliberately broken two ways (dropped entirely; missing
/// its path through σ, the −(S/σ)·x̂/N term), fails the same op-level check.
#[test]
fn deliberate_break_batch_norm_second_order_term_fails() {
    let (x, gamma, running, u, w) = bn_case(230);
    let mode = BnMode::Train;
    let r = batch_norm2d_tangent_backward(&x, &gamma, &running, mode, BN_EPS, &u, &w);
    let numeric = eio_reference::grad_check::numerical_gradient(
        |x: &Array4<f64>| {
            weighted_sum(
                &batch_norm2d_tangent(x, &gamma, &running, mode, BN_EPS, &u),
                &w,
            )
        },
        &x,
        eio_reference::grad_check::DEFAULT_STEP,
    );
    let worst = |analytic: &Array4<f64>| {
        analytic
            .iter()
            .zip(numeric.iter())
            .map(|(a, n)| relative_error(*a, *n, DEFAULT_FLOOR))
            .fold(0.0, f64::max)
    };
    // Broken 1: no second-order term (x̄ would be the first-order BN backward of ȳ alone).
    let dropped = Array4::<f64>::zeros(x.dim());
    // Broken 2: the σ path left out: add back (S/σ)·x̂/N per channel, with
    // S = Σ_channel w ⊙ ẏ and x̂, σ from the batch statistics.
    let dy = batch_norm2d_tangent(&x, &gamma, &running, mode, BN_EPS, &u);
    let (batch, channels, h, wd) = x.dim();
    let m = (batch * h * wd) as f64;
    let mut no_sigma_path = r.input.clone();
    for c in 0..channels {
        let xc = x.index_axis(ndarray::Axis(1), c);
        let mean = xc.sum() / m;
        let var = xc.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / m;
        let sigma = (var + BN_EPS).sqrt();
        let s: f64 =
            (&w.index_axis(ndarray::Axis(1), c) * &dy.index_axis(ndarray::Axis(1), c)).sum();
        for n in 0..batch {
            for i in 0..h {
                for j in 0..wd {
                    let x_hat = (x[[n, c, i, j]] - mean) / sigma;
                    no_sigma_path[[n, c, i, j]] += s / sigma * x_hat / m;
                }
            }
        }
    }
    let (good, bad_dropped, bad_sigma) = (worst(&r.input), worst(&dropped), worst(&no_sigma_path));
    eprintln!(
        "bn train second-order term: correct {good:e}, dropped {bad_dropped:e}, \
         without the σ path {bad_sigma:e}"
    );
    assert!(good < common::TOL, "correct term: {good:e}");
    assert!(bad_dropped > 1e-3, "dropped term: only {bad_dropped:e}");
    assert!(
        bad_sigma > 1e-3,
        "term without the σ path: only {bad_sigma:e}"
    );
}

//! Model-level central finite-difference checks of `model::backward`: the gradient of a scalar
//! objective (a weighted sum of a node's output with fixed random weights, or the batch-mean
//! cross-entropy of the logits) with respect to every learnable tensor of the plan (a seeded
//! subset of the entries of the larger ones) and to the input, along a path that uses both
//! candidates, in train- and eval-mode BatchNorm.
//!
//! Tensors a pass does not read (the other candidate of each RGB, layers after a distillation
//! feature) must get no gradient, and moving them must leave the objective bit for bit
//! unchanged (a finite difference of exactly zero). The step is `tiny::FD_STEP` (1e-5, see
//! there why not 1e-6), the tolerance `tiny::FD_TOL` (1e-6). In
//! train mode the objective is recomputed from the same state each time: `forward` does not
//! touch the running statistics (only `ModelState::commit` does), so every evaluation sees
//! the same model.

#[path = "common/tiny.rs"]
mod tiny;

use eio_reference::grad_check::weighted_sum;
use eio_reference::loss::cross_entropy;
use eio_reference::model::{backward, forward, Gradients};
use eio_reference::state::ModelState;
use eio_spec::config::{Activation, BnMode, ModelConfig, Sharing};
use eio_spec::plan::{FeatureSite, NodeId, Plan, Role};
use eio_spec::Path;
use ndarray::{Array4, ArrayD, Ix2};

/// What is differentiated.
enum Objective {
    /// sum(w * output(node)).
    Weighted { node: NodeId, weights: ArrayD<f64> },
    /// Batch-mean cross-entropy of the logits.
    CrossEntropy { labels: Vec<usize> },
}

struct Case {
    label: String,
    plan: Plan,
    state: ModelState,
    path: Path,
    x: Array4<f64>,
    mode: BnMode,
    objective: Objective,
    /// Entries checked per parameter tensor the pass reads (all of a smaller tensor).
    per_tensor: usize,
    /// Checks only this many (seeded, random) of the tensors the pass reads; `None` checks
    /// all.
    tensors: Option<usize>,
    /// Entries of the input checked.
    input_entries: usize,
    seed: u64,
}

impl Case {
    /// A case on `model` with a fresh perturbed state, a batch of `batch` images and the
    /// alternating path; the objective is built by `objective` from the plan.
    fn new(
        label: &str,
        model: &ModelConfig,
        mode: BnMode,
        batch: usize,
        seed: u64,
        objective: impl FnOnce(&Plan, &mut rand_chacha::ChaCha8Rng) -> Objective,
    ) -> Case {
        let plan = tiny::plan(model);
        let state = tiny::perturbed_state(&plan, seed);
        let mut r = tiny::rng(seed.wrapping_mul(31).wrapping_add(7));
        let x = tiny::images(&mut r, batch, &plan);
        let objective = objective(&plan, &mut r);
        let path = tiny::alternating_path(&plan);
        Case {
            label: label.to_string(),
            plan,
            state,
            path,
            x,
            mode,
            objective,
            per_tensor: 2,
            tensors: None,
            input_entries: 16,
            seed,
        }
    }

    fn end(&self) -> NodeId {
        match &self.objective {
            Objective::Weighted { node, .. } => *node,
            Objective::CrossEntropy { .. } => self.plan.logits(),
        }
    }

    fn value(&self, state: &ModelState, x: &Array4<f64>) -> f64 {
        let end = self.end();
        let trace = forward(&self.plan, state, &self.path, x, self.mode, end);
        match &self.objective {
            Objective::Weighted { weights, .. } => weighted_sum(trace.output(end), weights),
            Objective::CrossEntropy { labels } => cross_entropy(&trace.logits(), labels).value,
        }
    }

    fn gradients(&self) -> Gradients {
        let end = self.end();
        let trace = forward(&self.plan, &self.state, &self.path, &self.x, self.mode, end);
        let seed = match &self.objective {
            Objective::Weighted { weights, .. } => weights.clone(),
            Objective::CrossEntropy { labels } => {
                let logits = trace
                    .output(end)
                    .clone()
                    .into_dimensionality::<Ix2>()
                    .expect("logits");
                cross_entropy(&logits, labels).grad.into_dyn()
            }
        };
        backward(&self.plan, &self.state, &trace, &[(end, seed)])
    }

    /// Checks every learnable tensor and the input; returns the worst relative error.
    fn check(&self) -> f64 {
        let grads = self.gradients();
        for name in grads.params.keys() {
            let spec = self
                .plan
                .param(name)
                .unwrap_or_else(|| panic!("{}: gradient of unknown tensor {name}", self.label));
            assert_eq!(
                spec.role,
                Role::Learnable,
                "{}: gradient of a buffer {name}",
                self.label
            );
        }
        let mut r = tiny::rng(self.seed ^ 0xfd);
        let (used, unused): (Vec<_>, Vec<_>) =
            tiny::learnable(&self.plan).partition(|spec| grads.params.contains_key(&spec.name));
        assert!(
            !used.is_empty(),
            "{}: the pass produced no parameter gradient",
            self.label
        );
        // Tensors the pass does not read: moving all of them at once leaves the objective
        // bit for bit unchanged, so their (absent) gradient is exactly right.
        let base = self.value(&self.state, &self.x);
        let mut moved = self.state.clone();
        for spec in &unused {
            let noise = tiny::uniform_like(&mut r, &spec.shape);
            let t = moved.tensors.get_mut(&spec.name).expect("state has it");
            *t += &noise;
        }
        assert_eq!(
            self.value(&moved, &self.x).to_bits(),
            base.to_bits(),
            "{}: the objective depends on a tensor that got no gradient",
            self.label
        );
        let chosen = match self.tensors {
            Some(k) => tiny::entries(&mut r, used.len(), k),
            None => (0..used.len()).collect(),
        };
        let mut worst: f64 = 0.0;
        for spec in chosen.into_iter().map(|i| used[i]) {
            let analytic = &grads.params[&spec.name];
            let at = tiny::entries(&mut r, spec.numel(), self.per_tensor);
            let mut probe_state = self.state.clone();
            let e = tiny::check_entries(
                &format!("{}: {}", self.label, spec.name),
                |t: &ArrayD<f64>| {
                    probe_state.tensors.insert(spec.name.clone(), t.clone());
                    self.value(&probe_state, &self.x)
                },
                self.state.tensor(&spec.name),
                analytic,
                &at,
            );
            worst = worst.max(e);
        }
        let input_grad = grads
            .input
            .clone()
            .unwrap_or_else(|| panic!("{}: no input gradient", self.label));
        let at = tiny::entries(&mut r, self.x.len(), self.input_entries);
        let e = tiny::check_entries(
            &format!("{}: input", self.label),
            |x: &Array4<f64>| self.value(&self.state, x),
            &self.x,
            &input_grad,
            &at,
        );
        worst = worst.max(e);
        eprintln!(
            "{}: {} of {} learnable tensors read, worst relative error {worst:e}",
            self.label,
            used.len(),
            used.len() + unused.len()
        );
        worst
    }
}

fn weighted_logits(plan: &Plan, r: &mut rand_chacha::ChaCha8Rng, batch: usize) -> Objective {
    let node = plan.logits();
    Objective::Weighted {
        node,
        weights: tiny::uniform_like(r, &[batch, plan.classes]),
    }
}

fn weighted_feature(
    plan: &Plan,
    r: &mut rand_chacha::ChaCha8Rng,
    batch: usize,
    layer: usize,
    site: FeatureSite,
) -> Objective {
    let node = plan.feature_node(layer, site, false);
    let mut shape = vec![batch];
    match plan.nodes[node].shape {
        eio_spec::plan::Shape::Map { c, h, w } => shape.extend([c, h, w]),
        eio_spec::plan::Shape::Vector(n) => shape.push(n),
    }
    Objective::Weighted {
        node,
        weights: tiny::uniform_like(r, &shape),
    }
}

fn cross_entropy_objective(
    plan: &Plan,
    r: &mut rand_chacha::ChaCha8Rng,
    batch: usize,
) -> Objective {
    Objective::CrossEntropy {
        labels: tiny::labels(r, batch, plan.classes),
    }
}

const BATCH: usize = 2;

#[test]
fn independent_weights_logits_train_and_eval() {
    for (i, mode) in [BnMode::Train, BnMode::Eval].into_iter().enumerate() {
        let case = Case::new(
            &format!("independent {mode:?} weighted logits"),
            &tiny::tiny(Sharing::Independent),
            mode,
            BATCH,
            10 + i as u64,
            |p, r| weighted_logits(p, r, BATCH),
        );
        case.check();
    }
}

#[test]
fn shared_conv_logits_train_and_eval() {
    for (i, mode) in [BnMode::Train, BnMode::Eval].into_iter().enumerate() {
        let case = Case::new(
            &format!("shared-conv {mode:?} weighted logits"),
            &tiny::tiny(Sharing::SharedConv),
            mode,
            BATCH,
            20 + i as u64,
            |p, r| weighted_logits(p, r, BATCH),
        );
        case.check();
    }
}

#[test]
fn cross_entropy_both_sharings() {
    let cases = [
        (Sharing::Independent, BnMode::Train),
        (Sharing::SharedConv, BnMode::Eval),
    ];
    for (i, (sharing, mode)) in cases.into_iter().enumerate() {
        let case = Case::new(
            &format!("{sharing:?} {mode:?} cross-entropy"),
            &tiny::tiny(sharing),
            mode,
            3,
            30 + i as u64,
            |p, r| cross_entropy_objective(p, r, 3),
        );
        case.check();
    }
}

#[test]
fn intermediate_distillation_features_before_and_after_relu() {
    // Layer 4 is layer2.0.conv1+bn (a conv+BN feature), layer 5 the layer2.0 block output
    // (the residual sum with the downsampling shortcut); each read before and after its ReLU,
    // with the backward seeded at `plan.feature_node`.
    let cases = [
        (
            5,
            FeatureSite::BeforeRelu,
            Sharing::Independent,
            BnMode::Train,
        ),
        (5, FeatureSite::AfterRelu, Sharing::SharedConv, BnMode::Eval),
        (
            4,
            FeatureSite::AfterRelu,
            Sharing::Independent,
            BnMode::Train,
        ),
        (
            4,
            FeatureSite::BeforeRelu,
            Sharing::SharedConv,
            BnMode::Eval,
        ),
    ];
    for (i, (layer, site, sharing, mode)) in cases.into_iter().enumerate() {
        let case = Case::new(
            &format!("layer {layer} {site:?} {sharing:?} {mode:?}"),
            &tiny::tiny(sharing),
            mode,
            BATCH,
            40 + i as u64,
            |p, r| weighted_feature(p, r, BATCH, layer, site),
        );
        let feature = case.plan.feature_node(layer, site, false);
        let l = case.plan.layer(layer);
        match site {
            FeatureSite::BeforeRelu => assert_eq!(feature, l.before_relu),
            FeatureSite::AfterRelu => {
                assert_eq!(feature, l.after_relu);
                assert_ne!(l.before_relu, l.after_relu, "a ReLU follows layer {layer}");
            }
        }
        case.check();
    }
}

#[test]
fn leaky_relu_network() {
    let model = tiny::resnet8(2, Sharing::Independent, Activation::LeakyRelu, 1, 3);
    let plan = tiny::plan(&model);
    assert!(
        plan.nodes
            .iter()
            .any(|n| matches!(n.op, eio_spec::plan::Op::LeakyRelu { .. })),
        "the plan uses LeakyReLU"
    );
    let case = Case::new(
        "leaky-relu Train weighted logits",
        &model,
        BnMode::Train,
        BATCH,
        50,
        |p, r| weighted_logits(p, r, BATCH),
    );
    case.check();
    let case = Case::new(
        "leaky-relu Eval layer 3 after its activation",
        &model,
        BnMode::Eval,
        BATCH,
        51,
        |p, r| weighted_feature(p, r, BATCH, 3, FeatureSite::AfterRelu),
    );
    case.check();
}

#[test]
fn vgg16_tiny_max_pool_and_flatten() {
    // Width 1/16 (4..32 channels), 32 x 32, batch 1: each forward crosses five 2x2 max pools
    // and the flatten. A forward costs ~100 ms at the test profile, so a seeded subset of 8 of
    // the tensors the path reads, one entry each, and 4 input entries (whose gradient crosses
    // every pool).
    let model = tiny::tiny_vgg(2, Sharing::Independent, 3);
    let mut case = Case::new(
        "vgg16/16 Train weighted logits",
        &model,
        BnMode::Train,
        1,
        60,
        |p, r| weighted_logits(p, r, 1),
    );
    assert!(case
        .plan
        .nodes
        .iter()
        .any(|n| matches!(n.op, eio_spec::plan::Op::MaxPool2)));
    assert!(case
        .plan
        .nodes
        .iter()
        .any(|n| matches!(n.op, eio_spec::plan::Op::Flatten)));
    case.per_tensor = 1;
    case.tensors = Some(8);
    case.input_entries = 4;
    case.check();
}

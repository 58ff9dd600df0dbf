//! SGM (Wu et al. 2020) in `model::backward_with`, checked against central finite differences
//! of the scaled graph G (`grad_check::sgm_scaled_logits`): every residual add computes
//! y₀ + c·(f·(r(x') − r₀) + (s(x') − s₀)) around the unperturbed pass at x, so G(x) is the
//! network's output and ∇G(x) is the SGM gradient exactly (f the branch factor, c = 1, or
//! 1/std of the upstream gradient with normalisation). The objective is the batch-mean
//! cross-entropy of the logits; step `tiny::FD_STEP`, tolerance `tiny::FD_TOL`.
//!
//! With normalisation, c at each block needs std(dL/dy) of the rescaled flow above it. The
//! test gets that without `backward_with`: from the last block down, dL/dy at the block's add
//! is the finite-difference gradient of G run on from that add's output (the blocks above
//! already carrying their c).
//!
//! A full forward of the reference costs ~20 ms here, so the input and parameter gradients are
//! checked at seeded subsets of their entries (as `model_gradients.rs` does).

#[path = "common/tiny.rs"]
mod tiny;

use eio_reference::grad_check::{
    numerical_gradient, sgm_scaled_logits, sgm_scaled_node, ScaledAdd,
};
use eio_reference::loss::cross_entropy;
use eio_reference::model::{backward, backward_with, logits, Gradients, Trace};
use eio_reference::state::ModelState;
use eio_spec::attack::SkipGradient;
use eio_spec::config::{Activation, BnMode, ModelConfig, Sharing};
use eio_spec::{Path, Plan};
use ndarray::{Array4, ArrayD};

struct Case {
    label: String,
    plan: Plan,
    state: ModelState,
    path: Path,
    x: Array4<f64>,
    labels: Vec<usize>,
    mode: BnMode,
}

/// The tiny ResNet of `depth` (quarter width, 8 x 8, n = 2, 4 classes) with a perturbed state,
/// a batch of 2 and the alternating path.
fn case(depth: usize, seed: u64, mode: BnMode) -> Case {
    sized_case(depth, 8, seed, mode)
}

/// [`case`] on `side` x `side` images.
fn sized_case(depth: usize, side: usize, seed: u64, mode: BnMode) -> Case {
    let model = ModelConfig {
        depth,
        input_size: side,
        ..tiny::resnet8(2, Sharing::Independent, Activation::Relu, 3, 4)
    };
    let plan = tiny::plan(&model);
    let state = tiny::perturbed_state(&plan, seed);
    let mut r = tiny::rng(seed.wrapping_mul(7919).wrapping_add(3));
    let x = tiny::images(&mut r, 2, &plan);
    let labels = tiny::labels(&mut r, 2, plan.classes);
    let path = tiny::alternating_path(&plan);
    Case {
        label: format!("resnet{depth} {side}x{side} seed {seed} {mode:?}"),
        plan,
        state,
        path,
        x,
        labels,
        mode,
    }
}

impl Case {
    fn trace(&self) -> Trace {
        logits(&self.plan, &self.state, &self.path, &self.x, self.mode).1
    }

    /// `backward_with` of the cross-entropy (plain `backward` for `None`).
    fn gradients(&self, skip: Option<&SkipGradient>) -> Gradients {
        let trace = self.trace();
        let l = cross_entropy(&trace.logits(), &self.labels);
        let seed = [(self.plan.logits(), l.grad.into_dyn())];
        match skip {
            Some(sgm) => backward_with(&self.plan, &self.state, &trace, &seed, Some(sgm)),
            None => backward(&self.plan, &self.state, &trace, &seed),
        }
    }

    /// The cross-entropy of the scaled graph at `x_prime` with model state `state`.
    fn g(&self, state: &ModelState, at: &Trace, x_prime: &Array4<f64>, adds: &[ScaledAdd]) -> f64 {
        let z = sgm_scaled_logits(&self.plan, state, &self.path, at, x_prime, adds);
        cross_entropy(&z, &self.labels).value
    }

    /// The cross-entropy of the scaled graph at x run on from node `id` with output `y` (the
    /// nodes before it as in `at`): a function of y whose gradient is dL/dy at that node.
    fn tail(&self, at: &Trace, adds: &[ScaledAdd], id: usize, y: &ArrayD<f64>) -> f64 {
        let end = self.plan.logits();
        let mut outputs: Vec<ArrayD<f64>> = at.outputs[..id].to_vec();
        outputs.push(y.clone());
        for k in id + 1..=end {
            let out = sgm_scaled_node(
                &self.plan,
                &self.state,
                &self.path,
                at,
                k,
                &outputs,
                &self.x,
                adds,
            );
            outputs.push(out);
        }
        let z = outputs[end].clone().into_dimensionality().expect("logits");
        cross_entropy(&z, &self.labels).value
    }

    /// The scaled graph's adds for `sgm`: f = branch_factor, c = 1, or with normalisation
    /// 1/std(dL/dy) from finite differences, last block first.
    fn scaled_adds(&self, at: &Trace, sgm: &SkipGradient) -> Vec<ScaledAdd> {
        let blocks = self.plan.residual_blocks();
        let mut adds: Vec<ScaledAdd> = blocks
            .iter()
            .map(|b| ScaledAdd {
                add: b.add,
                branch: sgm.branch_factor(b),
                block: 1.0,
            })
            .collect();
        if sgm.normalise {
            for k in (0..adds.len()).rev() {
                let id = adds[k].add;
                let upstream = numerical_gradient(
                    |y: &ArrayD<f64>| self.tail(at, &adds, id, y),
                    at.output(id),
                    tiny::FD_STEP,
                );
                adds[k].block = 1.0 / unbiased_std(&upstream);
            }
        }
        adds
    }

    /// Checks the SGM gradient of the input, of the stem conv (upstream of every block) and of
    /// the last block's conv2, at seeded entries, against finite differences of the scaled
    /// graph; returns the worst relative error.
    fn check(&self, sgm: &SkipGradient) -> f64 {
        let what = format!("{} {sgm:?}", self.label);
        let at = self.trace();
        let adds = self.scaled_adds(&at, sgm);
        let grads = self.gradients(Some(sgm));
        let input = grads.input.as_ref().expect("the pass starts at the input");
        let mut r = tiny::rng(self.x.len() as u64 ^ 0x56d);
        let entries = tiny::entries(&mut r, self.x.len(), 24);
        let mut worst = tiny::check_entries(
            &format!("{what}: input"),
            |x: &Array4<f64>| self.g(&self.state, &at, x, &adds),
            &self.x,
            input,
            &entries,
        );
        let last_conv2 = format!(
            "{}.conv2",
            self.plan
                .residual_blocks()
                .last()
                .expect("a ResNet has blocks")
                .module
        );
        for name in grads.params.keys().filter(|name| {
            name.starts_with("conv1.") && name.ends_with("weight")
                || name.starts_with(&last_conv2) && name.ends_with("weight")
        }) {
            let tensor = self.state.tensor(name);
            let entries = tiny::entries(&mut r, tensor.len(), 4);
            let mut probe = self.state.clone();
            let e = tiny::check_entries(
                &format!("{what}: {name}"),
                |t: &ArrayD<f64>| {
                    probe.tensors.insert(name.clone(), t.clone());
                    self.g(&probe, &at, &self.x, &adds)
                },
                tensor,
                &grads.params[name],
                &entries,
            );
            worst = worst.max(e);
        }
        eprintln!("{what}: worst relative error {worst:e}");
        worst
    }
}

/// torch.std: sqrt(Σ (v − mean)² / (E − 1)).
fn unbiased_std(v: &ArrayD<f64>) -> f64 {
    let n = v.len() as f64;
    let mean = v.sum() / n;
    (v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

fn sgm(gamma: f64, normalise: bool, exclude_stage_first: bool) -> SkipGradient {
    SkipGradient {
        gamma,
        normalise,
        exclude_stage_first,
    }
}

fn bitwise_equal(a: &Gradients, b: &Gradients) -> bool {
    let same = |x: &ArrayD<f64>, y: &ArrayD<f64>| {
        x.shape() == y.shape() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
    };
    let (ia, ib) = (
        a.input.as_ref().expect("input").clone().into_dyn(),
        b.input.as_ref().expect("input").clone().into_dyn(),
    );
    same(&ia, &ib)
        && a.params.len() == b.params.len()
        && a.params
            .iter()
            .all(|(name, g)| b.params.get(name).is_some_and(|h| same(g, h)))
}

#[test]
fn sgm_is_the_gradient_of_the_scaled_graph() {
    for seed in [1, 2, 3] {
        let c = case(8, seed, BnMode::Eval);
        c.check(&sgm(0.2, false, false));
        // SGM really changes the gradient (otherwise this test could not fail).
        let plain = c.gradients(None).input.expect("input");
        let scaled = c
            .gradients(Some(&sgm(0.2, false, false)))
            .input
            .expect("input");
        assert!(
            tiny::max_abs_diff(&plain, &scaled)
                > 1e-3 * plain.iter().fold(0.0, |m, v| v.abs().max(m)),
            "{}: SGM left the gradient unchanged",
            c.label
        );
    }
    // Train-mode BatchNorm (batch statistics couple the images) and another γ.
    case(8, 4, BnMode::Train).check(&sgm(0.5, false, false));
}

#[test]
fn sgm_excluding_each_stages_first_block_matches_the_scaled_graph() {
    // ResNet-14 has two blocks per stage: layerS.0 keeps factor 1, layerS.1 gets γ.
    for seed in [5, 6] {
        let c = case(14, seed, BnMode::Eval);
        let blocks = c.plan.residual_blocks();
        assert_eq!(
            blocks.iter().filter(|b| b.first_in_stage).count(),
            3,
            "three stages"
        );
        c.check(&sgm(0.2, false, true));
        c.check(&sgm(0.2, false, false));
        let excluded = c
            .gradients(Some(&sgm(0.2, false, true)))
            .input
            .expect("input");
        let all = c
            .gradients(Some(&sgm(0.2, false, false)))
            .input
            .expect("input");
        assert!(tiny::max_abs_diff(&excluded, &all) > 0.0, "{}", c.label);
    }
}

#[test]
fn sgm_with_normalisation_matches_the_scaled_graph() {
    // The std of every block's upstream gradient costs two forwards per element of the block's
    // output, so the deeper cases run on 4 x 4 images.
    case(8, 7, BnMode::Eval).check(&sgm(0.2, true, false));
    sized_case(8, 4, 8, BnMode::Eval).check(&sgm(0.5, true, false));
    sized_case(14, 4, 9, BnMode::Eval).check(&sgm(0.2, true, true));
}

#[test]
fn normalisation_makes_the_gradient_scale_free() {
    // With normalisation the gradient at the last block is divided by its own std, so scaling
    // the seed by 1000 leaves the input gradient unchanged (up to rounding); without it the
    // gradient scales by 1000.
    let c = case(8, 10, BnMode::Eval);
    let trace = c.trace();
    let seed = cross_entropy(&trace.logits(), &c.labels).grad.into_dyn();
    let grad = |factor: f64, skip: &SkipGradient| {
        let seeds = [(c.plan.logits(), seed.mapv(|v| v * factor))];
        backward_with(&c.plan, &c.state, &trace, &seeds, Some(skip))
            .input
            .expect("input")
    };
    let normalised = sgm(0.2, true, false);
    let (a, b) = (grad(1.0, &normalised), grad(1000.0, &normalised));
    let scale = a.iter().fold(0.0, |m: f64, v| m.max(v.abs()));
    assert!(tiny::max_abs_diff(&a, &b) <= 1e-12 * scale, "normalised");
    let plain = sgm(0.2, false, false);
    let (a, b) = (grad(1.0, &plain), grad(1000.0, &plain));
    assert!(
        tiny::max_abs_diff(&(a * 1000.0), &b) <= 1e-9 * scale * 1000.0,
        "plain"
    );
}

#[test]
fn gamma_one_is_the_plain_gradient_bit_for_bit() {
    for (depth, seed) in [(8, 11), (14, 12)] {
        let c = case(depth, seed, BnMode::Eval);
        let plain = c.gradients(None);
        for exclude in [false, true] {
            let one = c.gradients(Some(&sgm(1.0, false, exclude)));
            assert!(bitwise_equal(&plain, &one), "{} exclude {exclude}", c.label);
        }
        // And γ = 0.2 is not (so the comparison can fail).
        assert!(!bitwise_equal(
            &plain,
            &c.gradients(Some(&sgm(0.2, false, false)))
        ));
    }
}

#[test]
fn resnet8_has_only_first_blocks_so_exclusion_scales_nothing() {
    let c = case(8, 13, BnMode::Eval);
    let blocks = c.plan.residual_blocks();
    let modules: Vec<&str> = blocks.iter().map(|b| b.module.as_str()).collect();
    assert_eq!(modules, ["layer1.0", "layer2.0", "layer3.0"]);
    assert!(bitwise_equal(
        &c.gradients(None),
        &c.gradients(Some(&sgm(0.2, false, true)))
    ));
}

#[test]
fn vgg_has_no_residual_blocks_so_sgm_is_the_plain_gradient() {
    let plan = tiny::plan(&tiny::tiny_vgg(2, Sharing::Independent, 4));
    assert!(plan.residual_blocks().is_empty());
    let state = tiny::perturbed_state(&plan, 14);
    let mut r = tiny::rng(14);
    let x = tiny::images(&mut r, 2, &plan);
    let labels = tiny::labels(&mut r, 2, 4);
    let path = tiny::alternating_path(&plan);
    let (z, trace) = logits(&plan, &state, &path, &x, BnMode::Eval);
    let seed = [(plan.logits(), cross_entropy(&z, &labels).grad.into_dyn())];
    let plain = backward(&plan, &state, &trace, &seed);
    let skip = backward_with(&plan, &state, &trace, &seed, Some(&sgm(0.2, true, false)));
    assert!(bitwise_equal(&plain, &skip));
}

#[test]
fn normalising_a_zero_gradient_leaves_it_zero() {
    // std(0) = 0: the block's gradient is left as it is (torch would divide by 0 and give NaN).
    let c = case(8, 15, BnMode::Eval);
    let trace = c.trace();
    let zero = ArrayD::zeros(trace.output(c.plan.logits()).shape());
    let grads = backward_with(
        &c.plan,
        &c.state,
        &trace,
        &[(c.plan.logits(), zero)],
        Some(&sgm(0.2, true, false)),
    );
    let input = grads.input.expect("input");
    assert!(input.iter().all(|&v| v == 0.0), "{input:?}");
    assert!(grads.params.values().flatten().all(|&v| v == 0.0));
}

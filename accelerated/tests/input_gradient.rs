//! `model::input_gradient` (the input-only backward of PGD and Eq. 2) against
//! `model::backward(..).input`: bit-identical, in f64 and f32, train and eval mode, with seeds
//! at the logits and at a distillation feature, on a ResNet-8 whose plan has stride-2 convs
//! and 1x1 shortcut convs. The same for SGM's `input_gradient_with` and `backward_with`, whose
//! `None` is the plain backward and whose γ = 1 without normalisation changes nothing. And
//! the lean traces (`forward_for_backward`, `eval_logits`) against the full `forward`.

mod common;

use candle_core::{DType, Device, Tensor};
use eio_accelerated::model::{
    backward, backward_with, eval_logits, forward, forward_for_backward, input_gradient,
    input_gradient_with,
};
use eio_accelerated::ops;
use eio_accelerated::state::ModelState;
use eio_spec::attack::SkipGradient;
use eio_spec::config::{BnMode, Preset};
use eio_spec::plan::{FeatureSite, Op, Plan};
use eio_spec::rng::Seeds;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use common::{bits, random};

fn small_plan() -> Plan {
    let config = Preset::Official
        .config()
        .and_then(|c| {
            c.with_overrides(&[
                "model.depth=8",
                "model.width=0.25",
                "model.input_size=8",
                "model.n=2",
                "model.classes=5",
            ])
        })
        .expect("a valid small config");
    let plan = Plan::build(&config.model).expect("a valid small ResNet");
    let convs: Vec<(usize, usize)> = plan
        .nodes
        .iter()
        .filter_map(|node| match &node.op {
            Op::Conv { kernel, stride, .. } => Some((*kernel, *stride)),
            _ => None,
        })
        .collect();
    assert!(
        convs.contains(&(3, 2)),
        "the plan has a stride-2 3x3 conv: {convs:?}"
    );
    assert!(
        convs.contains(&(1, 2)),
        "the plan has a stride-2 1x1 shortcut conv: {convs:?}"
    );
    plan
}

fn check(dtype: DType) {
    let plan = small_plan();
    let state =
        ModelState::init(&plan, &Seeds::new(11), 0, &Device::Cpu, dtype).expect("initial state");
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let images = random(&[4, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
    let space = plan.path_space();
    for mode in [BnMode::Train, BnMode::Eval] {
        for _ in 0..2 {
            let path = space.sample(&mut rng);
            // A full pass seeded at the logits (PGD), and passes stopped at each layer's
            // feature (Eq. 2).
            let mut ends = vec![plan.logits()];
            for l in 1..=plan.l() {
                ends.push(plan.feature_node(l, FeatureSite::AfterRelu, true));
                ends.push(plan.feature_node(l, FeatureSite::BeforeRelu, false));
            }
            for end in ends {
                let trace =
                    forward(&plan, &state, &path, &images, mode, end).expect("forward pass");
                let seed = random(trace.last().dims(), -1.0, 1.0, dtype, &mut rng);
                let seeds = [(end, seed)];
                let full = backward(&plan, &state, &trace, &seeds)
                    .expect("backward")
                    .input
                    .expect("the pass starts at the input");
                let only = input_gradient(&plan, &state, &trace, &seeds).expect("input gradient");
                let what = format!("{dtype:?} {mode:?} path {path:?} seed at node {end}");
                assert_eq!(only.dims(), full.dims(), "{what}: shape");
                assert_eq!(only.dtype(), dtype, "{what}: dtype");
                assert!(
                    bits(&only) == bits(&full),
                    "{what}: input_gradient differs from backward(..).input"
                );
                assert!(
                    bits(&full).iter().any(|&b| f64::from_bits(b) != 0.0),
                    "{what}: a non-trivial gradient"
                );
            }
        }
    }
    // The ops alone, with two seeds (a sum at the input node as in the ensemble).
    let path = space.sample(&mut rng);
    let trace = forward(&plan, &state, &path, &images, BnMode::Eval, plan.logits()).expect("pass");
    let (_, g) = ops::cross_entropy(
        trace.last(),
        &Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).expect("labels"),
    )
    .expect("loss");
    let mid = plan.feature_node(2, FeatureSite::AfterRelu, true);
    let seeds = [
        (plan.logits(), g),
        (
            mid,
            random(trace.output(mid).dims(), -1.0, 1.0, dtype, &mut rng),
        ),
    ];
    let full = backward(&plan, &state, &trace, &seeds)
        .expect("backward")
        .input
        .expect("input");
    let only = input_gradient(&plan, &state, &trace, &seeds).expect("input gradient");
    assert!(bits(&only) == bits(&full), "{dtype:?}: two seeds");
}

#[test]
fn input_gradient_equals_backward_input_f64() {
    check(DType::F64);
}

#[test]
fn input_gradient_equals_backward_input_f32() {
    check(DType::F32);
}

/// SGM's passes: `input_gradient_with` is `backward_with(..).input` bit for bit (for every
/// switch), `None` is the plain pass, and γ = 1 without normalisation multiplies by 1 only.
fn check_skip_gradient(dtype: DType) {
    let plan = small_plan();
    assert_eq!(
        plan.residual_blocks().len(),
        3,
        "ResNet-8: one block per stage"
    );
    let state =
        ModelState::init(&plan, &Seeds::new(12), 0, &Device::Cpu, dtype).expect("initial state");
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let images = random(&[3, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
    let path = plan.path_space().sample(&mut rng);
    for mode in [BnMode::Train, BnMode::Eval] {
        let trace = forward(&plan, &state, &path, &images, mode, plan.logits()).expect("pass");
        let seeds = [(
            plan.logits(),
            random(trace.last().dims(), -1.0, 1.0, dtype, &mut rng),
        )];
        let plain = input_gradient(&plan, &state, &trace, &seeds).expect("plain");
        let none = input_gradient_with(&plan, &state, &trace, &seeds, None).expect("None");
        assert!(
            bits(&none) == bits(&plain),
            "{dtype:?} {mode:?}: None is the plain pass"
        );
        let one = SkipGradient {
            gamma: 1.0,
            normalise: false,
            exclude_stage_first: false,
        };
        let unit = input_gradient_with(&plan, &state, &trace, &seeds, Some(&one)).expect("γ = 1");
        assert!(
            bits(&unit) == bits(&plain),
            "{dtype:?} {mode:?}: γ = 1 changes nothing"
        );
        for (gamma, normalise, exclude_stage_first) in
            [(0.2, false, false), (0.2, true, false), (0.5, true, true)]
        {
            let skip = SkipGradient {
                gamma,
                normalise,
                exclude_stage_first,
            };
            let what = format!("{dtype:?} {mode:?} {skip:?}");
            let full = backward_with(&plan, &state, &trace, &seeds, Some(&skip))
                .expect("backward_with")
                .input
                .expect("input");
            let only =
                input_gradient_with(&plan, &state, &trace, &seeds, Some(&skip)).expect("input");
            assert!(
                bits(&only) == bits(&full),
                "{what}: input_gradient_with differs"
            );
            assert!(bits(&only) != bits(&plain), "{what}: SGM changed nothing");
        }
    }
}

#[test]
fn skip_gradient_passes_agree_f64() {
    check_skip_gradient(DType::F64);
}

#[test]
fn skip_gradient_passes_agree_f32() {
    check_skip_gradient(DType::F32);
}

/// `eval_logits` (no trace, activations dropped after their last reader) gives the logits of
/// an eval-mode `forward`, bit for bit, in f64 and f32, on every sampled path.
#[test]
fn eval_logits_equal_the_traced_logits() {
    let plan = small_plan();
    for dtype in [DType::F64, DType::F32] {
        let state = ModelState::init(&plan, &Seeds::new(12), 0, &Device::Cpu, dtype)
            .expect("initial state");
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let images = random(&[5, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
        for _ in 0..4 {
            let path = plan.path_space().sample(&mut rng);
            let traced = forward(&plan, &state, &path, &images, BnMode::Eval, plan.logits())
                .expect("forward pass");
            let lean = eval_logits(&plan, &state, &path, &images).expect("eval logits");
            assert_eq!(lean.dims(), traced.last().dims());
            assert!(
                bits(&lean) == bits(traced.last()),
                "{dtype:?} path {path:?}: eval_logits differ from the traced logits"
            );
        }
    }
}

/// `forward_for_backward` (fused ops, outputs nothing reads not kept) against `forward`:
/// every kept output, the running statistics and both backward passes bit for bit, in f64
/// and f32, train and eval mode, to the logits and to each layer's features; and the fusions
/// apply (a BatchNorm's output before its ReLU and a residual block's last BatchNorm are not
/// kept).
#[test]
fn lean_traces_give_the_full_traces_gradients() {
    let plan = small_plan();
    for dtype in [DType::F64, DType::F32] {
        let state = ModelState::init(&plan, &Seeds::new(13), 0, &Device::Cpu, dtype)
            .expect("initial state");
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let images = random(&[4, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
        for mode in [BnMode::Train, BnMode::Eval] {
            let path = plan.path_space().sample(&mut rng);
            let mut ends = vec![plan.logits()];
            for l in 1..=plan.l() {
                ends.push(plan.feature_node(l, FeatureSite::AfterRelu, true));
                ends.push(plan.feature_node(l, FeatureSite::BeforeRelu, false));
            }
            for end in ends {
                let what = format!("{dtype:?} {mode:?} path {path:?} end {end}");
                let full = forward(&plan, &state, &path, &images, mode, end).expect("forward");
                let lean = forward_for_backward(&plan, &state, &path, &images, mode, end)
                    .expect("lean forward");
                assert_eq!(lean.len(), full.len(), "{what}: nodes run");
                let mut dropped = Vec::new();
                for (id, kept) in lean.outputs.iter().enumerate() {
                    match kept {
                        Some(t) => assert!(
                            bits(t) == bits(full.output(id)),
                            "{what}: output of node {id}"
                        ),
                        None => dropped.push(id),
                    }
                }
                assert!(lean.outputs[end].is_some(), "{what}: the end is kept");
                if end == plan.logits() {
                    let kinds: Vec<&Op> = dropped.iter().map(|&id| &plan.nodes[id].op).collect();
                    assert!(
                        kinds.iter().any(|op| matches!(op, Op::BatchNorm { .. }))
                            && kinds.iter().any(|op| matches!(op, Op::Add)),
                        "{what}: the fused ops apply (dropped {dropped:?})"
                    );
                }
                // The same updates (a fused BatchNorm's comes with its add, so the order may
                // differ; committing is by name).
                let by_name = |t: &eio_accelerated::model::Trace| {
                    let mut v: Vec<_> = t.running.clone();
                    v.sort_by(|a, b| a.mean_name.cmp(&b.mean_name));
                    v
                };
                let (lean_running, full_running) = (by_name(&lean), by_name(&full));
                assert_eq!(lean_running.len(), full_running.len(), "{what}: updates");
                for (a, b) in lean_running.iter().zip(&full_running) {
                    assert_eq!(a.mean_name, b.mean_name, "{what}: updated BatchNorms");
                    assert!(
                        bits(&a.mean) == bits(&b.mean) && bits(&a.var) == bits(&b.var),
                        "{what}: running statistics of {}",
                        a.mean_name
                    );
                }
                let seed = random(full.last().dims(), -1.0, 1.0, dtype, &mut rng);
                let seeds = [(end, seed)];
                let want = backward(&plan, &state, &full, &seeds).expect("backward");
                let got = backward(&plan, &state, &lean, &seeds).expect("lean backward");
                assert!(
                    bits(got.input.as_ref().expect("input"))
                        == bits(want.input.as_ref().expect("input")),
                    "{what}: dL/dx"
                );
                assert_eq!(
                    got.params.keys().collect::<Vec<_>>(),
                    want.params.keys().collect::<Vec<_>>(),
                    "{what}: parameters"
                );
                for (name, g) in &want.params {
                    assert!(bits(&got.params[name]) == bits(g), "{what}: dL/d{name}");
                }
                let only = input_gradient(&plan, &state, &lean, &seeds).expect("input gradient");
                assert!(
                    bits(&only) == bits(want.input.as_ref().expect("input")),
                    "{what}: input_gradient of the lean trace"
                );
            }
        }
    }
}

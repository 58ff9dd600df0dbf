//! Path batching against the passes it replaces, bit for bit: `model::forward_groups` (one
//! group of images per path) against `forward_for_backward` along each path in turn, with its
//! running statistics, `input_gradient`, `backward_groups` and `backward`; and
//! `distill::eq2_distill_paths` (the p distillations in lock-step) against `eq2_distill` for
//! each path in turn, with the random numbers it draws; a whole EIO iteration either way; and
//! `attack::pgd_versions` (an evaluation's attack versions in lock-step) against each
//! version's own `pgd_run`. In f64 and f32, train and eval mode,
//! on a ResNet-8 with shared convolutions (one convolution serves every group) and with
//! independent ones (one per run of groups that select the same weight), with paths that
//! agree and disagree at each gate.

mod common;

use candle_core::{DType, Device, Tensor};
use eio_accelerated::attack::{pgd_versions, AttackSettings, Member, Target};
use eio_accelerated::distill::{eq2_distill, eq2_distill_paths};
use eio_accelerated::eio::{eq4_iteration_with, EioBatch, IterationReport};
use eio_accelerated::model::{
    backward, backward_groups, forward_for_backward, forward_groups, input_gradient, Gradients,
};
use eio_accelerated::optim::{Sgd, SgdConfig};
use eio_accelerated::path_batching::PathBatching;
use eio_accelerated::state::ModelState;
use eio_spec::config::{AttackLoss, BnMode, Config, Preset};
use eio_spec::plan::{FeatureSite, Op, Plan};
use eio_spec::rng::Seeds;
use eio_spec::sampler::IterationDraw;
use eio_spec::Path;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::{bits, random};

/// Images per group.
const N: usize = 3;

fn config(sharing: &str) -> Config {
    Preset::Official
        .config()
        .and_then(|c| {
            c.with_overrides(&[
                "model.depth=8",
                "model.width=0.25",
                "model.input_size=8",
                "model.n=2",
                "model.classes=5",
                &format!("model.sharing={sharing}"),
            ])
        })
        .expect("a valid small config")
}

#[track_caller]
fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    assert!(bits(got) == bits(want), "{what}: values differ");
}

fn group(t: &Tensor, g: usize) -> Tensor {
    t.narrow(0, g * N, N).expect("a group")
}

fn assert_same_gradients(what: &str, got: &Gradients, want: &Gradients) {
    assert_eq!(
        got.params.keys().collect::<Vec<_>>(),
        want.params.keys().collect::<Vec<_>>(),
        "{what}: the parameters with gradients"
    );
    for (name, g) in &want.params {
        assert_same(&format!("{what} d/d{name}"), &got.params[name], g);
    }
    match (&got.input, &want.input) {
        (Some(a), Some(b)) => assert_same(&format!("{what} dL/dx"), a, b),
        (a, b) => assert_eq!(a.is_some(), b.is_some(), "{what}: input gradient"),
    }
}

fn assert_same_state(what: &str, got: &ModelState, want: &ModelState) {
    assert_eq!(got.counters, want.counters, "{what}: counters");
    for (name, t) in &want.tensors {
        assert_same(&format!("{what} {name}"), &got.tensors[name], t);
    }
}

/// A state whose BatchNorm candidates differ (at initialisation every candidate has γ = 1,
/// β = 0 and the same running statistics, which would hide a group given another's).
fn state(plan: &Plan, seed: u64, dtype: DType, rng: &mut ChaCha8Rng) -> ModelState {
    let mut state =
        ModelState::init(plan, &Seeds::new(seed), 0, &Device::Cpu, dtype).expect("initial state");
    for node in &plan.nodes {
        if let Op::BatchNorm { channels, params } = &node.op {
            for names in &params.candidates {
                for (name, lo, hi) in [
                    (&names.weight, 0.5, 1.5),
                    (&names.bias, -0.2, 0.2),
                    (&names.running_mean, -0.2, 0.2),
                    (&names.running_var, 0.5, 1.5),
                ] {
                    let values = random(&[*channels], lo, hi, dtype, rng);
                    state.tensors.insert(name.clone(), values);
                }
            }
        }
    }
    state
}

/// Three paths whose groups form runs of equal and different choices at every gate: all
/// zeros, all zeros, all ones; and all ones, a random path, all zeros.
fn path_sets(plan: &Plan, rng: &mut ChaCha8Rng) -> Vec<Vec<Path>> {
    let k = plan.k();
    let zeros = Path::new(vec![0; k]);
    let ones = Path::new(vec![1; k]);
    let random = plan.path_space().sample(rng);
    vec![
        vec![zeros.clone(), zeros.clone(), ones.clone()],
        vec![ones, random, zeros],
    ]
}

fn passes(sharing: &str, dtype: DType) {
    let config = config(sharing);
    let plan = Plan::build(&config.model).expect("a valid small ResNet");
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let state = state(&plan, 11, dtype, &mut rng);
    for paths in path_sets(&plan, &mut rng) {
        let images = random(&[paths.len() * N, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
        for mode in [BnMode::Train, BnMode::Eval] {
            for end in [
                plan.logits(),
                plan.feature_node(2, FeatureSite::AfterRelu, true),
                plan.feature_node(3, FeatureSite::BeforeRelu, false),
            ] {
                let what = format!("{sharing} {dtype:?} {mode:?} {paths:?} end {end}");
                let batched = forward_groups(&plan, &state, &paths, &images, mode, end)
                    .expect("batched pass");
                let seed = random(batched.last().dims(), -1.0, 1.0, dtype, &mut rng);
                let seeds = [(end, seed.clone())];
                let per_group = backward_groups(&plan, &state, &batched, &seeds).expect("backward");
                let input = input_gradient(&plan, &state, &batched, &seeds).expect("dL/dx");
                let summed = backward(&plan, &state, &batched, &seeds).expect("summed backward");
                // The passes one after the other, each committing its running statistics.
                let mut one_by_one = state.clone();
                let mut total = Gradients::default();
                for (g, path) in paths.iter().enumerate() {
                    let what = format!("{what} group {g}");
                    let own = forward_for_backward(
                        &plan,
                        &one_by_one,
                        path,
                        &group(&images, g),
                        mode,
                        end,
                    )
                    .expect("own pass");
                    one_by_one.commit(&own);
                    assert_eq!(own.len(), batched.len(), "{what}: nodes run");
                    for id in 0..own.len() {
                        match (&own.outputs[id], &batched.outputs[id]) {
                            (Some(want), Some(got)) => {
                                assert_same(&format!("{what} node {id}"), &group(got, g), want)
                            }
                            (want, got) => {
                                assert_eq!(got.is_some(), want.is_some(), "{what}: node {id} kept")
                            }
                        }
                    }
                    let own_seeds = [(end, group(&seed, g))];
                    let own_grads = backward(&plan, &state, &own, &own_seeds).expect("backward");
                    assert_same_gradients(&format!("{what} backward"), &per_group[g], &own_grads);
                    assert_same(
                        &format!("{what} input_gradient"),
                        &group(&input, g),
                        &input_gradient(&plan, &state, &own, &own_seeds).expect("dL/dx"),
                    );
                    total.add(own_grads).expect("sum");
                }
                let mut batched_state = state.clone();
                batched_state.commit(&batched);
                assert_same_state(
                    &format!("{what} running statistics"),
                    &batched_state,
                    &one_by_one,
                );
                // backward sums the groups in order; its dL/dx is the whole batch's.
                total.input = Some(input.clone());
                assert_same_gradients(&format!("{what} summed"), &summed, &total);
            }
        }
    }
}

#[test]
fn batched_passes_are_each_paths_own_shared_conv() {
    passes("shared-conv", DType::F64);
    passes("shared-conv", DType::F32);
}

#[test]
fn batched_passes_are_each_paths_own_independent() {
    passes("independent", DType::F64);
    passes("independent", DType::F32);
}

fn distillations(sharing: &str, dtype: DType) {
    let mut config = config(sharing);
    let plan = Plan::build(&config.model).expect("a valid small ResNet");
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let state = state(&plan, 3, dtype, &mut rng);
    let x_s = random(&[N, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
    let x_t = random(&[N, 3, 8, 8], 0.0, 1.0, dtype, &mut rng);
    config.distill.steps = 3;
    for paths in path_sets(&plan, &mut rng) {
        for (mode, momentum, random_start) in [
            (BnMode::Eval, false, true),
            (BnMode::Eval, true, false),
            (BnMode::Train, true, true),
        ] {
            config.distill.bn_mode = mode;
            config.distill.momentum = momentum;
            config.distill.random_start = random_start;
            let what = format!("{sharing} {dtype:?} {mode:?} momentum {momentum} {paths:?}");
            let layer = 2;
            let (mut batched_state, mut one_by_one) = (state.clone(), state.clone());
            let (mut batched_rng, mut own_rng) =
                (ChaCha8Rng::seed_from_u64(1), ChaCha8Rng::seed_from_u64(1));
            let batched = eq2_distill_paths(
                &plan,
                &mut batched_state,
                &paths,
                layer,
                (&x_t, &x_s),
                &config.distill,
                PathBatching::Batched,
                &mut batched_rng,
            )
            .expect("lock-step distillations");
            assert_eq!(batched.len(), paths.len(), "{what}: one per path");
            for (g, path) in paths.iter().enumerate() {
                let own = eq2_distill(
                    &plan,
                    &mut one_by_one,
                    path,
                    layer,
                    &x_t,
                    &x_s,
                    &config.distill,
                    &mut own_rng,
                )
                .expect("own distillation");
                let what = format!("{what} path {g}");
                assert_same(&format!("{what} x'"), &batched[g].images, &own.images);
                assert_eq!(
                    batched[g]
                        .losses
                        .iter()
                        .map(|l| l.to_bits())
                        .collect::<Vec<_>>(),
                    own.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                    "{what}: losses"
                );
                assert_eq!(batched[g].sign_ties, own.sign_ties, "{what}: sign ties");
                assert!(
                    bits(&(&own.images - &x_s).expect("diff"))
                        .iter()
                        .any(|&b| b != 0),
                    "{what}: the distillation moved the images"
                );
            }
            assert_same_state(&format!("{what} state"), &batched_state, &one_by_one);
            assert_eq!(
                batched_rng.random::<u64>(),
                own_rng.random::<u64>(),
                "{what}: the same random numbers drawn"
            );
        }
    }
}

#[test]
fn lock_step_distillations_are_each_paths_own() {
    for sharing in ["shared-conv", "independent"] {
        distillations(sharing, DType::F64);
        distillations(sharing, DType::F32);
    }
}

#[test]
fn batches_that_do_not_split_into_groups_are_refused() {
    let config = config("shared-conv");
    let plan = Plan::build(&config.model).expect("a valid small ResNet");
    let state = ModelState::init(&plan, &Seeds::new(1), 0, &Device::Cpu, DType::F32)
        .expect("initial state");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let paths = path_sets(&plan, &mut rng).remove(0);
    let images = random(&[7, 3, 8, 8], 0.0, 1.0, DType::F32, &mut rng);
    let err = forward_groups(&plan, &state, &paths, &images, BnMode::Eval, plan.logits())
        .expect_err("7 images in 3 groups");
    assert!(
        err.to_string().contains("7 images") && err.to_string().contains("3 equal groups"),
        "{err}"
    );
    assert!(forward_groups(&plan, &state, &[], &images, BnMode::Eval, plan.logits()).is_err());
    let images = random(&[6, 3, 8, 8], 0.0, 1.0, DType::F32, &mut rng);
    let trace = forward_groups(
        &plan,
        &state,
        &paths[..2],
        &images,
        BnMode::Eval,
        plan.logits(),
    )
    .expect("two groups");
    assert!(
        trace.one_path().is_err(),
        "a batched trace has no single path"
    );
}

/// A whole EIO iteration (Algorithm 1 lines 13-24: the p distillations, cross-training and
/// the SGD step) gives the same bits with either schedule, two iterations in a row.
#[test]
fn eio_iterations_are_the_same_batched_or_not() {
    for sharing in ["shared-conv", "independent"] {
        let config = config(sharing);
        let plan = Plan::build(&config.model).expect("a valid small ResNet");
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let start = state(&plan, 6, DType::F32, &mut rng);
        let batch = EioBatch {
            source: random(&[N, 3, 8, 8], 0.0, 1.0, DType::F32, &mut rng),
            labels: Tensor::new(&[1u32, 0, 4], &Device::Cpu).expect("labels"),
            target: random(&[N, 3, 8, 8], 0.0, 1.0, DType::F32, &mut rng),
        };
        let draws: Vec<IterationDraw> = path_sets(&plan, &mut rng)
            .into_iter()
            .zip([3, 1])
            .map(|(paths, layer)| IterationDraw { layer, paths })
            .collect();
        let run = |batching: PathBatching| {
            let mut state = start.clone();
            let mut sgd = Sgd::new(SgdConfig {
                lr: config.train.lr,
                momentum: config.train.momentum,
                weight_decay: config.train.weight_decay,
                nesterov: config.train.nesterov,
            });
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let reports: Vec<_> = draws
                .iter()
                .map(|draw| {
                    eq4_iteration_with(
                        &plan, &mut state, &mut sgd, &config, &batch, draw, batching, &mut rng,
                    )
                    .expect("iteration")
                })
                .collect();
            (state, reports)
        };
        let (batched, batched_reports) = run(PathBatching::Batched);
        let (sequential, reports) = run(PathBatching::Sequential);
        assert_same_state(
            &format!("{sharing} after two iterations"),
            &batched,
            &sequential,
        );
        for (b, s) in batched_reports.iter().zip(&reports) {
            let losses = |r: &IterationReport| {
                let all = r.path_losses.iter().chain(&r.distill_losses);
                all.map(|l| l.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(losses(b), losses(s), "{sharing}: losses");
            assert_eq!(b.sign_ties, s.sign_ties, "{sharing}: sign ties");
        }
        let fc = plan
            .nodes
            .iter()
            .find_map(|node| match &node.op {
                Op::Linear { params, .. } => Some(params.candidates[0].weight.clone()),
                _ => None,
            })
            .expect("a linear layer");
        assert!(
            bits(&(&batched.tensors[&fc] - &start.tensors[&fc]).expect("diff"))
                .iter()
                .any(|&b| f64::from_bits(b) != 0.0),
            "{sharing}: the iterations trained the model"
        );
    }
}

/// The versions of an evaluation (radii, losses, restarts, each with its own random stream)
/// in lock-step give each version's own attack, bit for bit: against one path, an ensemble and
/// the randomised RGN with EOT (whose paths each version draws), plain and momentum PGD.
#[test]
fn lock_step_attacks_are_each_versions_own() {
    let config = config("shared-conv");
    let plan = Plan::build(&config.model).expect("a valid small ResNet");
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let (state_a, state_b) = (
        state(&plan, 1, DType::F32, &mut rng),
        state(&plan, 2, DType::F32, &mut rng),
    );
    let x = random(&[N, 3, 8, 8], 0.0, 1.0, DType::F32, &mut rng);
    let labels = Tensor::new(&[2u32, 0, 4], &Device::Cpu).expect("labels");
    let paths = path_sets(&plan, &mut rng).remove(1);
    let members = vec![
        Member {
            plan: &plan,
            state: &state_a,
            path: &paths[0],
        },
        Member {
            plan: &plan,
            state: &state_b,
            path: &paths[1],
        },
    ];
    let targets = [
        (
            "one path",
            Target::Path {
                plan: &plan,
                state: &state_a,
                path: &paths[2],
                mode: BnMode::Eval,
            },
        ),
        ("ensemble", Target::Ensemble(members)),
        (
            "randomised",
            Target::Randomised {
                plan: &plan,
                state: &state_b,
                eot: 2,
            },
        ),
    ];
    for (name, target) in &targets {
        for momentum in [None, Some(1.0)] {
            let mut versions = Vec::new();
            for eps in [0.03, 0.01] {
                for loss in [AttackLoss::Ce, AttackLoss::Cw] {
                    for restart in 0..2u64 {
                        let mut settings = AttackSettings::white_box(&config.eval, eps, loss);
                        settings.steps = 3;
                        settings.random_start = true;
                        settings.momentum = momentum;
                        let seed = versions.len() as u64 * 10 + restart;
                        versions.push((settings, ChaCha8Rng::seed_from_u64(seed)));
                    }
                }
            }
            let what = format!("{name} momentum {momentum:?}");
            let mut own = versions.clone();
            let runs = |versions: &mut [(AttackSettings, ChaCha8Rng)], batching| {
                let mut runs = Vec::new();
                pgd_versions(target, (&x, &labels), versions, batching, |v, run| {
                    assert_eq!(v, runs.len(), "versions handed over in order");
                    runs.push(run);
                    Ok::<_, candle_core::Error>(())
                })
                .expect("attacks");
                runs
            };
            let batched = runs(&mut versions, PathBatching::Batched);
            let sequential = runs(&mut own, PathBatching::Sequential);
            assert_eq!(batched.len(), 8, "{what}: one run per version");
            for (v, (b, s)) in batched.iter().zip(&sequential).enumerate() {
                assert_same(&format!("{what} version {v}"), &b.images, &s.images);
                assert_eq!(b.sign_ties, s.sign_ties, "{what} version {v}: sign ties");
                assert!(
                    bits(&(&s.images - &x).expect("diff"))
                        .iter()
                        .any(|&b| b != 0),
                    "{what} version {v}: the attack moved the images"
                );
            }
            for (v, ((_, b), (_, s))) in versions.iter_mut().zip(&mut own).enumerate() {
                assert_eq!(
                    b.random::<u64>(),
                    s.random::<u64>(),
                    "{what} version {v}: draws"
                );
            }
        }
    }
}

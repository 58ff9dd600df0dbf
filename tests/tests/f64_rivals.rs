//! The rival ensemble methods, f64 CPU against the reference at 1e-9: two consecutive
//! iterations of ADP (`adp_iteration`), DVERGE (`dverge_iteration`, with and without
//! `plus_adv`), GAL (`gal_iteration`, second order, with its noise) and TRS (`trs_iteration`,
//! second order, with and without its smoothness PGD) over 2 and 3 members of a tiny plain ResNet-8, with SGD (momentum, weight
//! decay) and Adam (coupled weight decay), from perturbed states. Compared after each
//! iteration: the reported loss and every named term, DVERGE's distillation loss and sign
//! ties; after both: every tensor and counter of every member (the second iteration also
//! tests the optimisers' state: momentum buffers, Adam moments and step counts).
//!
//! The engines' functions are called directly (not through the `Engine` trait).

use candle_core::{DType, Device, Tensor};
use eio_spec::config::{Activation, Config, Optimizer, Sharing};
use eio_spec::Plan;
use eio_tests::accelerated::Accelerated;
use eio_tests::cases::{images, images_like, labels, perturbed_values, NetSpec};
use eio_tests::checks::assert_state_close;
use eio_tests::engine::{Images, Values};
use eio_tests::tolerance::{assert_close_scalar, Tolerance};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const TOL: Tolerance = Tolerance::F64_STRICT;

/// The members' network: ResNet-8 at width 1/4, 4 classes, 8x8 inputs, one candidate per
/// gate (a plain network, as the ensemble methods train).
fn member_net() -> NetSpec {
    NetSpec {
        n: 1,
        ..NetSpec::tiny(Sharing::Independent)
    }
}

/// The rivals' settings on the member network: `optimizer` with momentum 0.9 and weight
/// decay 1e-2 (large enough to matter over two steps), Adam eps 1e-7 (the ports'); a short
/// distillation (3 steps of ε/4 from a random start when `random_start`) and a 2-step
/// training PGD.
fn config(optimizer: Optimizer, plus_adv: bool, random_start: bool) -> Config {
    let mut config = Config {
        model: member_net().model(),
        ..Config::default()
    };
    config.train.optimizer = optimizer;
    config.train.momentum = 0.9;
    config.train.weight_decay = 1e-2;
    config.train.adam.eps = 1e-7;
    config.train.adv.steps = 2;
    config.distill.steps = 3;
    config.distill.step_fraction = 0.25;
    config.distill.random_start = random_start;
    config.dverge.plus_adv = plus_adv;
    config
}

fn lr(optimizer: Optimizer) -> f64 {
    match optimizer {
        Optimizer::Sgd => 0.05,
        Optimizer::Adam => 1e-3,
    }
}

/// The host data of one case: member states, and per iteration a source batch, a target
/// batch and labels.
struct Case {
    plan: Plan,
    members: Vec<Values>,
    batches: Vec<(Images, Images, Vec<usize>)>,
}

fn case(plan: Plan, members: usize, seed: u64) -> Case {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let members = (0..members)
        .map(|m| perturbed_values(&plan, seed.wrapping_mul(31).wrapping_add(m as u64)))
        .collect();
    let batches = (0..2)
        .map(|_| {
            let source = images(&mut rng, 3, &plan);
            let target = images_like(&mut rng, &source);
            let y = labels(&mut rng, 3, plan.classes);
            (source, target, y)
        })
        .collect();
    Case {
        plan,
        members,
        batches,
    }
}

/// What one engine reported per iteration, and the members' values afterwards.
struct Run {
    reports: Vec<Report>,
    members: Vec<Values>,
}

/// An engine-neutral copy of a `MethodReport`.
#[derive(Debug)]
struct Report {
    loss: f64,
    terms: Vec<(&'static str, f64)>,
    distill_loss: Option<f64>,
    sign_ties: usize,
}

#[derive(Debug, Clone, Copy)]
enum Method {
    Adp,
    Dverge,
    Gal,
    Trs,
}

/// TRS's PGD radius in the tests: large enough that the smoothness PGD moves the images.
const TRS_RADIUS: f64 = 0.05;

/// The distillation layer of iteration `it`: a middle layer, then the logits.
fn layer(plan: &Plan, it: usize) -> usize {
    if it == 0 {
        2
    } else {
        plan.l()
    }
}

fn run_reference(method: Method, c: &Case, config: &Config, seed: u64) -> Run {
    use eio_reference::optim::Optimiser;
    let mut states: Vec<_> = c
        .members
        .iter()
        .map(|v| eio_tests::reference::state(&c.plan, v))
        .collect();
    let lr = lr(config.train.optimizer);
    let mut optimisers: Vec<_> = states
        .iter()
        .map(|_| Optimiser::for_config(config, lr))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut reports = Vec::new();
    for (it, (source, target, y)) in c.batches.iter().enumerate() {
        let source = eio_tests::reference::array(source);
        let r = match method {
            Method::Adp => eio_reference::adp::adp_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                y,
            ),
            Method::Dverge => eio_reference::dverge::dverge_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                y,
                &eio_tests::reference::array(target),
                layer(&c.plan, it),
                &mut rng,
            ),
            Method::Gal => eio_reference::gal::gal_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                y,
                &mut rng,
            ),
            Method::Trs => eio_reference::trs::trs_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                y,
                TRS_RADIUS,
                &mut rng,
            ),
        };
        reports.push(Report {
            loss: r.loss,
            terms: r.terms,
            distill_loss: r.distill_loss,
            sign_ties: r.sign_ties,
        });
    }
    Run {
        reports,
        members: states.iter().map(eio_tests::reference::values).collect(),
    }
}

fn run_accelerated(method: Method, c: &Case, config: &Config, seed: u64) -> Run {
    use eio_accelerated::optim::Optimiser;
    let engine = Accelerated::f64_cpu();
    let mut states: Vec<_> = c.members.iter().map(|v| engine.state(&c.plan, v)).collect();
    let lr = lr(config.train.optimizer);
    let mut optimisers: Vec<_> = states
        .iter()
        .map(|_| Optimiser::for_config(config, lr))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut reports = Vec::new();
    for (it, (source, target, y)) in c.batches.iter().enumerate() {
        let source = engine.tensor(source);
        let y: Vec<u32> = y.iter().map(|&v| v as u32).collect();
        let y = Tensor::from_vec(y.clone(), y.len(), &Device::Cpu).expect("labels");
        let r = match method {
            Method::Adp => eio_accelerated::adp::adp_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                &y,
            ),
            Method::Dverge => eio_accelerated::dverge::dverge_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                &y,
                &engine.tensor(target),
                layer(&c.plan, it),
                &mut rng,
            ),
            Method::Gal => eio_accelerated::gal::gal_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                &y,
                &mut rng,
            ),
            Method::Trs => eio_accelerated::trs::trs_iteration(
                &c.plan,
                &mut states,
                &mut optimisers,
                config,
                &source,
                &y,
                TRS_RADIUS,
                &mut rng,
            ),
        }
        .unwrap_or_else(|e| panic!("accelerated {method:?} iteration {it}: {e}"));
        reports.push(Report {
            loss: r.loss,
            terms: r.terms,
            distill_loss: r.distill_loss,
            sign_ties: r.sign_ties,
        });
    }
    let members = states
        .iter()
        .map(|s| {
            s.to_values()
                .unwrap_or_else(|e| panic!("accelerated state to host: {e}"))
        })
        .collect();
    Run { reports, members }
}

/// Runs `method` in both engines on `case(members, seed)` under `config` and compares.
fn check(what: &str, method: Method, members: usize, seed: u64, config: &Config) {
    assert_eq!(
        Accelerated::f64_cpu().dtype,
        DType::F64,
        "the f64 engine computes in f64"
    );
    let c = case(config.plan().expect("a valid model"), members, seed);
    let r = run_reference(method, &c, config, seed ^ 0xd1ff);
    let a = run_accelerated(method, &c, config, seed ^ 0xd1ff);
    for (it, (rr, ar)) in r.reports.iter().zip(&a.reports).enumerate() {
        let at = format!("{what}: iteration {it}");
        assert_eq!(rr.sign_ties, ar.sign_ties, "{at}: sign ties");
        assert!(rr.loss.is_finite(), "{at}: loss {}", rr.loss);
        assert_close_scalar(&format!("{at}: loss"), rr.loss, ar.loss, TOL);
        let names = |r: &Report| r.terms.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(names(rr), names(ar), "{at}: term names");
        for ((name, e), (_, v)) in rr.terms.iter().zip(&ar.terms) {
            assert_close_scalar(&format!("{at}: term {name}"), *e, *v, TOL);
        }
        match (rr.distill_loss, ar.distill_loss) {
            (Some(e), Some(v)) => {
                assert_close_scalar(&format!("{at}: distill loss"), e, v, TOL);
            }
            (e, v) => assert_eq!(e, v, "{at}: distill loss"),
        }
    }
    assert_eq!(r.members.len(), a.members.len());
    for (m, (rv, av)) in r.members.iter().zip(&a.members).enumerate() {
        assert_state_close(
            &format!("{what}: member {m} after 2 iterations"),
            &c.plan,
            rv,
            av,
            TOL,
        );
    }
    // The members moved: the comparison is not of untouched states.
    assert!(
        r.members
            .iter()
            .zip(&c.members)
            .all(|(after, before)| after != before),
        "{what}: a member did not change"
    );
}

#[test]
fn adp_matches_reference() {
    for (members, optimizer, seed) in [
        (2, Optimizer::Adam, 1u64),
        (3, Optimizer::Adam, 2),
        (2, Optimizer::Sgd, 3),
        (3, Optimizer::Sgd, 4),
    ] {
        check(
            &format!("ADP, {members} members, {optimizer:?}"),
            Method::Adp,
            members,
            seed,
            &config(optimizer, false, false),
        );
    }
}

#[test]
fn dverge_matches_reference() {
    for (members, optimizer, plus_adv, random_start, seed) in [
        (2, Optimizer::Sgd, false, false, 11u64),
        (3, Optimizer::Sgd, false, false, 12),
        (2, Optimizer::Sgd, true, true, 13),
        (3, Optimizer::Sgd, true, false, 14),
        (3, Optimizer::Adam, true, true, 15),
    ] {
        check(
            &format!(
                "DVERGE, {members} members, {optimizer:?}, plus_adv {plus_adv}, start {random_start}"
            ),
            Method::Dverge,
            members,
            seed,
            &config(optimizer, plus_adv, random_start),
        );
    }
}

#[test]
fn dverge_coeff_weighs_the_cross_training_sum() {
    let mut c = config(Optimizer::Sgd, true, false);
    c.dverge.coeff = 0.25;
    check("DVERGE, coeff 0.25", Method::Dverge, 2, 16, &c);
}

#[test]
fn gal_matches_reference() {
    for (members, second_forward, probability, activation, seed) in [
        (2, true, 0.5, Activation::Relu, 21u64),
        (3, false, 1.0, Activation::LeakyRelu, 22),
        (3, true, 0.5, Activation::LeakyRelu, 23),
    ] {
        let mut c = config(Optimizer::Adam, false, false);
        c.model.activation = activation;
        c.gal.second_forward = second_forward;
        c.gal.noise_probability = probability;
        check(
            &format!("GAL, {members} members, second forward {second_forward}, noise p {probability}, {activation:?}"),
            Method::Gal,
            members,
            seed,
            &c,
        );
    }
}

#[test]
fn trs_matches_reference() {
    for (members, plus_adv, accumulate, seed) in [
        (2, true, true, 31u64),
        (3, true, false, 32),
        (3, false, true, 33),
    ] {
        let mut c = config(Optimizer::Adam, false, false);
        c.trs.plus_adv = plus_adv;
        c.trs.pgd_accumulate = accumulate;
        c.trs.pgd_steps = 2;
        check(
            &format!("TRS, {members} members, plus_adv {plus_adv}, accumulate {accumulate}"),
            Method::Trs,
            members,
            seed,
            &c,
        );
    }
}

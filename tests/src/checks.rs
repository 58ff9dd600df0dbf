//! The checks, written once against [`Engine`] (burn's backend-generic test suite idea): each
//! runs one case on the reference and on a candidate engine and compares under a
//! [`Tolerance`]. The test files only choose engines, tolerances and cases.

use std::io::Write;

use eio_spec::config::{AttackLoss, BnMode, Config, DistillConfig, EvalConfig};
use eio_spec::plan::{NodeId, Plan, Role};
use eio_spec::rng::Seeds;
use rand_chacha::ChaCha8Rng;

use crate::cases::{feature_nodes, feature_target, AttackCase, Fixture};
use crate::engine::{
    AttackRun, DistillRun, EioIteration, Engine, Grads, Images, Objective, Optimiser, Outcome,
    StepGrads, TargetSpec, Values,
};
use crate::tolerance::{
    assert_close, assert_close_except, assert_close_scalar, assert_close_with_scale, scale_of,
    Tolerance,
};

/// Prints a line straight to the process's stderr (not captured by the test harness), for
/// facts a passing run must still show: sign ties, skipped elements, allowed divergences.
pub fn note(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn label(reference: &dyn Engine, candidate: &dyn Engine) -> String {
    format!("{} vs {}", reference.name(), candidate.name())
}

/// Whether every element is accepted (no panic; for the tie rules).
pub fn all_accepted(expected: &[f64], actual: &[f64], tol: Tolerance) -> bool {
    let scale = crate::tolerance::scale_of(expected);
    expected.len() == actual.len()
        && expected
            .iter()
            .zip(actual)
            .all(|(&e, &a)| tol.accepts(e, a, scale))
}

/// Asserts two states hold the same tensors with close values (counters exactly).
#[track_caller]
pub fn assert_state_close(
    what: &str,
    plan: &Plan,
    expected: &Values,
    actual: &Values,
    tol: Tolerance,
) {
    let names = |v: &Values| v.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(expected),
        names(actual),
        "{what}: the states name different tensors"
    );
    for spec in &plan.params {
        let t = if spec.role == Role::Counter {
            Tolerance::EXACT
        } else {
            tol
        };
        assert_close(
            &format!("{what}: tensor {}", spec.name),
            &expected[&spec.name],
            &actual[&spec.name],
            t,
        );
    }
}

/// Forward to every distillation layer (before and after its ReLU) and the logits in `mode`,
/// then the state after the pass (train mode updates running statistics and counters).
pub fn check_forward(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    mode: BnMode,
    tol: Tolerance,
) -> Outcome<()> {
    let nodes = feature_nodes(&fx.plan);
    let r = reference.forward(&fx.plan, &fx.values, &fx.path, &fx.images, mode, &nodes)?;
    let c = candidate.forward(&fx.plan, &fx.values, &fx.path, &fx.images, mode, &nodes)?;
    let who = label(reference, candidate);
    for &id in &nodes {
        let layer = fx
            .plan
            .layers
            .iter()
            .find(|l| l.before_relu == id || l.after_relu == id)
            .map_or(String::new(), |l| {
                let site = if l.before_relu == l.after_relu {
                    "output"
                } else if l.before_relu == id {
                    "before ReLU"
                } else {
                    "after ReLU"
                };
                format!(" (layer {} {}, {site})", l.index, l.name)
            });
        assert_close(
            &format!("{who}: forward {mode:?} node {id}{layer}"),
            &r.outputs[&id],
            &c.outputs[&id],
            tol,
        );
    }
    assert_state_close(
        &format!("{who}: state after a {mode:?} forward"),
        &fx.plan,
        &r.state,
        &c.state,
        tol,
    );
    Ok(())
}

/// Compares two engines' gradients of one objective: the loss, dL/d(input), and the same set
/// of parameter gradients with close values.
#[track_caller]
pub fn assert_grads_close(what: &str, r: &Grads, c: &Grads, tol: Tolerance) {
    assert_close(&format!("{what}: output"), &r.output, &c.output, tol);
    // A loss is a difference or mean of terms as large as its output's elements (a C&W margin
    // z_y − z_o + κ, a squared feature difference): its floor takes that scale.
    let scale = r.loss.abs().max(scale_of(&r.output));
    assert_close_with_scale(&format!("{what}: loss"), &[r.loss], &[c.loss], tol, scale);
    assert_close(&format!("{what}: dL/dinput"), &r.input, &c.input, tol);
    let names = |g: &Grads| g.params.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(r),
        names(c),
        "{what}: the engines give gradients for different tensors"
    );
    for (name, g) in &r.params {
        assert_close(&format!("{what}: dL/d{name}"), g, &c.params[name], tol);
    }
}

/// Gradients of `objective` along the fixture's path in `mode`.
pub fn check_gradients(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    mode: BnMode,
    objective: &Objective,
    tol: Tolerance,
) -> Outcome<()> {
    let r = reference.gradients(&fx.plan, &fx.values, &fx.path, &fx.images, mode, objective)?;
    let c = candidate.gradients(&fx.plan, &fx.values, &fx.path, &fx.images, mode, objective)?;
    let what = match objective {
        Objective::CrossEntropy { .. } => "CE at the logits".to_string(),
        Objective::CarliniWagner { kappa, .. } => format!("C&W (kappa {kappa}) at the logits"),
        Objective::Mse { node, .. } => format!("MSE at node {node}"),
    };
    assert_grads_close(
        &format!(
            "{}: {mode:?} gradients of {what}",
            label(reference, candidate)
        ),
        &r,
        &c,
        tol,
    );
    Ok(())
}

/// The MSE objective at the fixture's layer (before or after its ReLU) against a seeded
/// random target.
pub fn mse_objective(fx: &Fixture, node: NodeId) -> Objective {
    let mut rng = fx.rng.clone();
    Objective::Mse {
        node,
        target: feature_target(&mut rng, &fx.plan, node, fx.images.batch()),
    }
}

/// κ of the single-pass C&W objective: larger than any logit gap of these models, so every
/// sample's margin is active and the gradient is not trivially zero.
pub const CW_ACTIVE_KAPPA: f64 = 5.0;

/// One case's single passes, in BN train and eval mode: forward to every layer, gradients of
/// CE and C&W at the logits, and of MSE at the case's layer before and after its ReLU.
pub fn check_single_passes(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    tol: Tolerance,
) -> Outcome<()> {
    let layer = fx.plan.layer(fx.layer);
    let objectives = [
        Objective::CrossEntropy {
            labels: fx.labels.clone(),
        },
        Objective::CarliniWagner {
            labels: fx.labels.clone(),
            kappa: CW_ACTIVE_KAPPA,
        },
        mse_objective(fx, layer.before_relu),
        mse_objective(fx, layer.after_relu),
    ];
    for mode in [BnMode::Train, BnMode::Eval] {
        check_forward(reference, candidate, fx, mode, tol)?;
        for objective in &objectives {
            check_gradients(reference, candidate, fx, mode, objective, tol)?;
        }
    }
    Ok(())
}

/// The learnable tensors after each optimiser step.
pub fn check_optimiser(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    plan: &Plan,
    optimiser: Optimiser,
    params: &Values,
    steps: &[StepGrads],
    tol: Tolerance,
) -> Outcome<()> {
    let r = reference.optimise(plan, optimiser, params, steps)?;
    let c = candidate.optimise(plan, optimiser, params, steps)?;
    let who = label(reference, candidate);
    assert_eq!(r.len(), c.len());
    for (k, (rs, cs)) in r.iter().zip(&c).enumerate() {
        assert_eq!(
            rs.keys().collect::<Vec<_>>(),
            cs.keys().collect::<Vec<_>>(),
            "{who}: optimiser step {}: different tensors",
            k + 1
        );
        for (name, v) in rs {
            assert_close(
                &format!("{who}: {optimiser:?} step {}: {name}", k + 1),
                v,
                &cs[name],
                tol,
            );
        }
    }
    Ok(())
}

/// What [`check_distill`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DistillSummary {
    /// Sign ties counted by the reference and by the candidate.
    pub ties: (usize, usize),
    /// The step after which the trajectories were allowed to part because of a tie (1-based).
    pub diverged_at: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
fn distill_run(
    engine: &dyn Engine,
    fx: &Fixture,
    config: &DistillConfig,
    steps: usize,
    rng: &ChaCha8Rng,
) -> Outcome<DistillRun> {
    let mut config = config.clone();
    config.steps = steps;
    engine.distill(
        &fx.plan,
        &fx.values,
        &fx.path,
        fx.layer,
        &fx.targets,
        &fx.images,
        &config,
        rng.clone(),
    )
}

/// The sign-tie rule at a step that counted `ties` tied direction entries (on either engine):
/// the images after the step may differ in at most `ties` elements, each by at most 2α (one
/// sign step each way); anything else fails. Returns whether any element differed (then the
/// trajectories may part from here, which is printed).
#[track_caller]
pub fn tie_step_parts(
    what: &str,
    expected: &[f64],
    actual: &[f64],
    ties: usize,
    alpha: f64,
    tol: Tolerance,
) -> bool {
    let scale = crate::tolerance::scale_of(expected);
    let differing: Vec<usize> = (0..expected.len())
        .filter(|&i| !tol.accepts(expected[i], actual[i], scale))
        .collect();
    assert!(
        differing.len() <= ties,
        "{what}: {} image elements differ but only {ties} sign ties were counted",
        differing.len()
    );
    for &i in &differing {
        let d = (expected[i] - actual[i]).abs();
        assert!(
            d <= 2.0 * alpha + tol.floor(scale) + tol.rel,
            "{what}: element {i} differs by {d:e}, more than two sign steps (2α = {:e})",
            2.0 * alpha
        );
    }
    if !differing.is_empty() {
        note(&format!(
            "note: {what}: {} of {ties} tied elements stepped differently; trajectories may part from here",
            differing.len()
        ));
    }
    !differing.is_empty()
}

/// A whole Eq. 2 distillation, step by step.
///
/// Without sign ties (|m| < 1e-12 counted by neither engine) the per-step losses, the final
/// images and the state afterwards must agree under `tol`. With ties, the run is replayed with
/// 1, 2, … steps: every step up to the first one that counted a tie must agree exactly as
/// above; at that step at most as many image elements as ties were counted may differ, each
/// by at most 2α (one sign step each way), and from there on the trajectories may part (the
/// divergence is printed). A mismatch anywhere else fails.
pub fn check_distill(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    config: &DistillConfig,
    rng: &ChaCha8Rng,
    tol: Tolerance,
) -> Outcome<DistillSummary> {
    let who = label(reference, candidate);
    let r = distill_run(reference, fx, config, config.steps, rng)?;
    let c = distill_run(candidate, fx, config, config.steps, rng)?;
    let mut summary = DistillSummary {
        ties: (r.sign_ties, c.sign_ties),
        diverged_at: None,
    };
    assert_eq!(r.losses.len(), config.steps, "{who}: one loss per step");
    assert_eq!(c.losses.len(), config.steps, "{who}: one loss per step");
    if r.sign_ties == 0 && c.sign_ties == 0 {
        assert_close(
            &format!("{who}: Eq. 2 per-step losses"),
            &r.losses,
            &c.losses,
            tol,
        );
        assert_close(
            &format!("{who}: Eq. 2 images after {} steps", config.steps),
            &r.images.data,
            &c.images.data,
            tol,
        );
        assert_state_close(
            &format!("{who}: state after Eq. 2"),
            &fx.plan,
            &r.state,
            &c.state,
            tol,
        );
        return Ok(summary);
    }
    note(&format!(
        "note: {who}: Eq. 2 counted sign ties (reference {}, candidate {}); comparing step by step",
        r.sign_ties, c.sign_ties
    ));
    let alpha = config.step_size();
    let (mut prev_r, mut prev_c) = (0, 0);
    for k in 1..=config.steps {
        let rk = distill_run(reference, fx, config, k, rng)?;
        let ck = distill_run(candidate, fx, config, k, rng)?;
        let ties_here = (rk.sign_ties - prev_r).max(ck.sign_ties - prev_c);
        (prev_r, prev_c) = (rk.sign_ties, ck.sign_ties);
        // The loss before step k is computed from the images after step k - 1, which agreed.
        assert_close(
            &format!("{who}: Eq. 2 losses up to step {k}"),
            &rk.losses,
            &ck.losses,
            tol,
        );
        assert_state_close(
            &format!("{who}: state after Eq. 2 step {k}"),
            &fx.plan,
            &rk.state,
            &ck.state,
            tol,
        );
        if ties_here == 0 {
            assert_close(
                &format!("{who}: Eq. 2 images after step {k} (no tie counted)"),
                &rk.images.data,
                &ck.images.data,
                tol,
            );
            continue;
        }
        if tie_step_parts(
            &format!("{who}: Eq. 2 step {k}"),
            &rk.images.data,
            &ck.images.data,
            ties_here,
            alpha,
            tol,
        ) {
            summary.diverged_at = Some(k);
            return Ok(summary);
        }
    }
    // Ties were counted but every step agreed (ties on exact zeros step by 0 on both sides).
    assert_close(
        &format!("{who}: Eq. 2 images after {} steps", config.steps),
        &r.images.data,
        &c.images.data,
        tol,
    );
    Ok(summary)
}

/// What [`check_eio`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EioSummary {
    /// Sign ties over all distillations (reference, candidate).
    pub ties: (usize, usize),
    /// Whether a tie let the runs part (then only layers and paths were compared exactly).
    pub diverged: bool,
}

/// Consecutive EIO iterations: layers and paths exactly; without sign ties the path losses,
/// the distillation losses, the tie counts and the final state under `tol`. With ties counted
/// the same comparisons must still pass unless the tie made the runs part, which is printed.
pub fn check_eio(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    plan: &Plan,
    config: &Config,
    values: &Values,
    iterations: &[EioIteration],
    tol: Tolerance,
) -> Outcome<EioSummary> {
    let who = label(reference, candidate);
    let r = reference.eio(plan, config, values, iterations)?;
    let c = candidate.eio(plan, config, values, iterations)?;
    assert_eq!(r.reports.len(), c.reports.len());
    let ties = (
        r.reports.iter().map(|x| x.sign_ties).sum::<usize>(),
        c.reports.iter().map(|x| x.sign_ties).sum::<usize>(),
    );
    let mut agree = true;
    for (i, (rr, cr)) in r.reports.iter().zip(&c.reports).enumerate() {
        assert_eq!(rr.layer, cr.layer, "{who}: iteration {i}: layer");
        assert_eq!(rr.paths, cr.paths, "{who}: iteration {i}: paths");
        agree &= rr.sign_ties == cr.sign_ties
            && all_accepted(&rr.path_losses, &cr.path_losses, tol)
            && all_accepted(&rr.distill_losses, &cr.distill_losses, tol);
    }
    agree &= plan.params.iter().all(|p| {
        let t = if p.role == Role::Counter {
            Tolerance::EXACT
        } else {
            tol
        };
        all_accepted(&r.state[&p.name], &c.state[&p.name], t)
    });
    if !agree && ties != (0, 0) {
        note(&format!(
            "note: {who}: EIO runs parted after sign ties (reference {}, candidate {}); losses and state not compared",
            ties.0, ties.1
        ));
        return Ok(EioSummary {
            ties,
            diverged: true,
        });
    }
    for (i, (rr, cr)) in r.reports.iter().zip(&c.reports).enumerate() {
        assert_eq!(
            rr.sign_ties, cr.sign_ties,
            "{who}: iteration {i}: sign ties"
        );
        assert_close(
            &format!("{who}: iteration {i}: path losses"),
            &rr.path_losses,
            &cr.path_losses,
            tol,
        );
        assert_close(
            &format!("{who}: iteration {i}: distillation losses"),
            &rr.distill_losses,
            &cr.distill_losses,
            tol,
        );
    }
    assert_state_close(
        &format!("{who}: state after {} EIO iterations", iterations.len()),
        plan,
        &r.state,
        &c.state,
        tol,
    );
    Ok(EioSummary {
        ties,
        diverged: false,
    })
}

/// Clean pre-training iterations (Algorithm 1 lines 4-5): each loss and the state afterwards.
pub fn check_pretrain(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    plan: &Plan,
    config: &Config,
    values: &Values,
    batches: &[(eio_spec::Path, Images, Vec<usize>)],
    tol: Tolerance,
) -> Outcome<()> {
    let who = label(reference, candidate);
    let (rl, rs) = reference.pretrain(plan, config, values, batches)?;
    let (cl, cs) = candidate.pretrain(plan, config, values, batches)?;
    assert_close(&format!("{who}: pre-training losses"), &rl, &cl, tol);
    assert_state_close(
        &format!(
            "{who}: state after {} pre-training iterations",
            batches.len()
        ),
        plan,
        &rs,
        &cs,
        tol,
    );
    Ok(())
}

/// The PGD start of `case` on `images` (the host draws both engines make) and the generator
/// as it is afterwards (a randomised target draws its EOT paths from it).
pub fn pgd_start(case: &AttackCase, images: &Images, rng: &ChaCha8Rng) -> (Images, ChaCha8Rng) {
    let mut rng = rng.clone();
    if !case.random_start {
        return (images.clone(), rng);
    }
    let noise = eio_spec::rng::uniform_start(images.data.len(), case.eps, &mut rng);
    let data = images
        .data
        .iter()
        .zip(noise)
        .map(|(x, n)| (x + n).clamp(0.0, 1.0))
        .collect();
    (
        Images {
            dims: images.dims,
            data,
        },
        rng,
    )
}

/// What [`check_pgd`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttackSummary {
    /// Sign ties counted by the reference and by the candidate.
    pub ties: (usize, usize),
    /// The step after which the trajectories were allowed to part because of a tie (1-based).
    pub diverged_at: Option<usize>,
}

fn attack_run(
    engine: &dyn Engine,
    fx: &Fixture,
    case: &AttackCase,
    steps: usize,
    rng: &ChaCha8Rng,
) -> Outcome<AttackRun> {
    let mut settings = case.settings();
    settings.steps = steps;
    engine.pgd(
        &fx.target(case.target),
        &fx.images,
        &fx.labels,
        &settings,
        rng.clone(),
    )
}

/// A whole attack run (f64; plain PGD, momentum, input diversity, SGM as `case` says): the
/// adversarial images, then each engine's attack loss and input gradient (through SGM's
/// backward when set; without the input-diversity transform) and predictions at its own
/// result.
///
/// Sign ties (|direction| < 1e-12, counted by either engine) are always printed. When the
/// final images agree under `tol` everything else is compared as without ties (most ties are
/// exact zeros on both sides, e.g. a sample whose C&W margin is inactive). When they do not,
/// and ties were counted, [`check_distill`]'s rule applies: the run is replayed with 1, 2, …
/// steps; every step up to the first one that counted a tie must agree under `tol`; at that
/// step at most as many image elements as ties were counted may differ, each by at most 2α
/// ([`tie_step_parts`]), and from there on the trajectories may part (printed; the final
/// loss, gradient and predictions are then not compared). Without a tie everything must agree.
pub fn check_pgd(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    case: &AttackCase,
    rng: &ChaCha8Rng,
    tol: Tolerance,
) -> Outcome<AttackSummary> {
    let who = label(reference, candidate);
    let target = fx.target(case.target);
    let r = attack_run(reference, fx, case, case.steps, rng)?;
    let c = attack_run(candidate, fx, case, case.steps, rng)?;
    let mut summary = AttackSummary {
        ties: (r.sign_ties, c.sign_ties),
        diverged_at: None,
    };
    let agree = all_accepted(&r.images.data, &c.images.data, tol);
    if summary.ties != (0, 0) {
        note(&format!(
            "note: {who}: PGD {case:?} counted sign ties (reference {}, candidate {}); {}",
            r.sign_ties,
            c.sign_ties,
            if agree {
                "the final images agree"
            } else {
                "the final images differ: comparing step by step"
            }
        ));
    }
    if !agree && summary.ties != (0, 0) {
        let alpha = case.eps * case.step_fraction;
        let (mut prev_r, mut prev_c) = (0, 0);
        for k in 1..=case.steps {
            let rk = attack_run(reference, fx, case, k, rng)?;
            let ck = attack_run(candidate, fx, case, k, rng)?;
            let ties_here = (rk.sign_ties - prev_r).max(ck.sign_ties - prev_c);
            (prev_r, prev_c) = (rk.sign_ties, ck.sign_ties);
            if ties_here == 0 {
                assert_close(
                    &format!("{who}: PGD {case:?}: images after step {k} (no tie counted)"),
                    &rk.images.data,
                    &ck.images.data,
                    tol,
                );
            } else if tie_step_parts(
                &format!("{who}: PGD {case:?}: step {k}"),
                &rk.images.data,
                &ck.images.data,
                ties_here,
                alpha,
                tol,
            ) {
                summary.diverged_at = Some(k);
                return Ok(summary);
            }
        }
    }
    assert_close(
        &format!("{who}: PGD {case:?}: adversarial images"),
        &r.images.data,
        &c.images.data,
        tol,
    );
    let skip = case.skip_gradient.as_ref();
    let (lr, gr) = reference.attack_loss(
        &target,
        &r.images,
        &fx.labels,
        case.loss,
        case.kappa,
        skip,
        rng.clone(),
    )?;
    let (lc, gc) = candidate.attack_loss(
        &target,
        &c.images,
        &fx.labels,
        case.loss,
        case.kappa,
        skip,
        rng.clone(),
    )?;
    assert_close_scalar(&format!("{who}: PGD {case:?}: final loss"), lr, lc, tol);
    assert_close(
        &format!("{who}: PGD {case:?}: input gradient at the result"),
        &gr,
        &gc,
        tol,
    );
    let pr = reference.predict(&target, &r.images, rng.clone())?;
    let pc = candidate.predict(&target, &c.images, rng.clone())?;
    assert_eq!(pr, pc, "{who}: PGD {case:?}: predictions at the result");
    Ok(summary)
}

/// The white-box all-or-nothing evaluation: clean accuracy, and per ε the robust flags, robust
/// count, accuracy and per-version accuracies, all exactly (they count whole images).
pub fn check_white_box(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    target: &TargetSpec<'_>,
    images: &Images,
    labels: &[usize],
    config: &EvalConfig,
    seeds: &Seeds,
) -> Outcome<()> {
    let who = label(reference, candidate);
    let r = reference.white_box(target, images, labels, config, seeds)?;
    let c = candidate.white_box(target, images, labels, config, seeds)?;
    assert_eq!(r, c, "{who}: white-box report");
    Ok(())
}

/// Elements of a sign step an f32 engine cannot be held to: |g| below this fraction of the
/// largest |g| of the batch. The f32 single-pass gradients agree with the reference to 1e-4
/// relative or 1e-4 of the largest |g| ([`Tolerance::F32`]), so an element's f32 error is at
/// most 1e-4 · max|g|: at |g| >= 1e-3 · max|g| (a factor 10 above) the sign is resolved and a
/// flipped one is a bug; below, f32 may legitimately round it either way.
pub const F32_SIGN_RESOLVED: f64 = 1e-3;

/// Image pixels after an f32 PGD step: the start, the step and the two clamps each round once
/// to f32 (≤ 6e-8 at pixel values ≤ 1), so 1e-6 bounds f32 representation; a wrong sign moves a
/// pixel by a whole step (≥ 7.5e-3 here).
pub const F32_PIXEL: Tolerance = Tolerance {
    rel: 0.0,
    abs: 1e-6,
    abs_of_max: 0.0,
};

/// What [`check_sign_attack_f32`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SignAttackSummary {
    /// Pixels of the first step compared and skipped (|g| < [`F32_SIGN_RESOLVED`] · max|g|).
    pub compared: usize,
    pub skipped: usize,
    /// |final loss difference| between the engines' own runs.
    pub loss_diff: f64,
    /// Images whose final prediction differs.
    pub prediction_flips: usize,
}

/// An f32 engine's multi-step sign attack (plain PGD, momentum, input diversity, SGM, as
/// `case` says) against the f64 reference.
///
/// * First step, exactly: the images after one step agree to [`F32_PIXEL`] at every
///   element whose reference direction at the start is resolved by f32
///   (|g| >= [`F32_SIGN_RESOLVED`] · max|g|, g the gradient through SGM's backward and the
///   first step's input-diversity draw); the others are skipped and counted.
/// * Whole run, within a bound: each engine's attack loss at its own final images agrees to
///   `loss_bound` (absolute), and at most `max_flips` images are classified differently.
#[allow(clippy::too_many_arguments)]
pub fn check_sign_attack_f32(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    case: &AttackCase,
    rng: &ChaCha8Rng,
    loss_bound: f64,
    max_flips: usize,
) -> Outcome<SignAttackSummary> {
    let who = label(reference, candidate);
    let target = fx.target(case.target);
    let skip = case.skip_gradient.as_ref();
    // First step: the reference's direction at the start, through the first step's
    // input-diversity draw when there is one (the momentum of a first step is the gradient
    // divided by a positive per-sample norm: the same signs).
    let (start, mut after_start) = pgd_start(case, &fx.images, rng);
    let side = fx.images.dims[3];
    let diversity = case.input_diversity.and_then(|di| {
        di.draw(side, &mut after_start)
            .map(|d| (d, di.interpolation))
    });
    let at = match &diversity {
        Some((draw, interpolation)) => reference.input_diversity(&start, draw, *interpolation)?,
        None => start.clone(),
    };
    let (_, g) = reference.attack_loss(
        &target,
        &at,
        &fx.labels,
        case.loss,
        case.kappa,
        skip,
        after_start,
    )?;
    let g = match &diversity {
        Some((draw, interpolation)) => {
            let grad = Images {
                dims: start.dims,
                data: g,
            };
            reference
                .input_diversity_backward(&grad, draw, *interpolation)?
                .data
        }
        None => g,
    };
    let max_g = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let skip_pixels: Vec<bool> = g
        .iter()
        .map(|v| v.abs() < F32_SIGN_RESOLVED * max_g || max_g == 0.0)
        .collect();
    let r1 = attack_run(reference, fx, case, 1, rng)?;
    let c1 = attack_run(candidate, fx, case, 1, rng)?;
    let closeness = assert_close_except(
        &format!("{who}: first PGD step {case:?} (f32-resolved gradient signs)"),
        &r1.images.data,
        &c1.images.data,
        F32_PIXEL,
        Some(&skip_pixels),
    );
    let skipped = skip_pixels.iter().filter(|&&s| s).count();
    // Whole run.
    let r = attack_run(reference, fx, case, case.steps, rng)?.images;
    let c = attack_run(candidate, fx, case, case.steps, rng)?.images;
    let (lr, _) = reference.attack_loss(
        &target,
        &r,
        &fx.labels,
        case.loss,
        case.kappa,
        skip,
        rng.clone(),
    )?;
    let (lc, _) = candidate.attack_loss(
        &target,
        &c,
        &fx.labels,
        case.loss,
        case.kappa,
        skip,
        rng.clone(),
    )?;
    let loss_diff = (lr - lc).abs();
    assert!(
        loss_diff <= loss_bound,
        "{who}: PGD {case:?}: final loss {lc} against the reference's {lr}: difference {loss_diff:e} above the bound {loss_bound:e}"
    );
    let pr = reference.predict(&target, &r, rng.clone())?;
    let pc = candidate.predict(&target, &c, rng.clone())?;
    let flips = pr.iter().zip(&pc).filter(|(a, b)| a != b).count();
    assert!(
        flips <= max_flips,
        "{who}: PGD {case:?}: {flips} of {} final predictions differ (bound {max_flips}): reference {pr:?}, candidate {pc:?}",
        pr.len()
    );
    Ok(SignAttackSummary {
        compared: closeness.len,
        skipped,
        loss_diff,
        prediction_flips: flips,
    })
}

/// One seeded EIO iteration's inputs for `plan` and `config`: (l, paths) from
/// `eio_spec::sampler::draw_iteration`, the batch from `rng`, the distillation starts from
/// `Stream::DistillStart` split by iteration (as a training loop draws them).
pub fn eio_iteration(
    plan: &Plan,
    config: &Config,
    seeds: &Seeds,
    iteration: u64,
    batch: usize,
    rng: &mut ChaCha8Rng,
) -> EioIteration {
    let draw = eio_spec::sampler::draw_iteration(plan, &config.eio, seeds, 0, iteration)
        .expect("clip never refuses");
    let source = crate::cases::images(rng, batch, plan);
    let labels = crate::cases::labels(rng, batch, plan.classes);
    let target = crate::cases::images_like(rng, &source);
    EioIteration {
        source,
        labels,
        target,
        draw,
        rng: seeds.stream(eio_spec::rng::Stream::DistillStart, iteration),
    }
}

/// The attack losses every PGD test runs.
pub const ATTACK_LOSSES: [AttackLoss; 2] = [AttackLoss::Ce, AttackLoss::Cw];

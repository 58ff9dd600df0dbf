//! The transfer attacks of the black-box suite in `attack::pgd_run`: MI-FGSM momentum (Dong et
//! al. 2018), DI²-FGSM input diversity (Xie et al. 2019) and SGM (Wu et al. 2020), with the
//! CE, C&W and DVERGE's masked C&W losses, on a path, an ensemble and the randomised RGN.
//!
//! * the update rule of `eio_spec::attack` step by step (momentum with its decay; the
//!   draw order: the transform's draw, then a randomised target's EOT paths);
//! * input diversity with probability 0 is plain PGD;
//! * every attack stays in the ε-ball and [0, 1] and is reproducible from its seed;
//! * sign ties are counted;
//! * SGM's gradient on every target is the gradient of the same target built from the
//!   members' scaled graphs (`grad_check::sgm_scaled_logits`): for an ensemble, the per-member
//!   SGM gradients combined through the log of the mean softmax.

#[path = "common/tiny.rs"]
mod tiny;

use eio_reference::attack::{pgd, pgd_run, AttackRun, AttackSettings, Member, Target};
use eio_reference::grad_check::{sgm_scaled_logits, ScaledAdd};
use eio_reference::input_diversity::{input_diversity, input_diversity_backward};
use eio_reference::loss::{
    cross_entropy, cw_dverge_loss, cw_loss, log_mean_softmax, ENSEMBLE_PROB_FLOOR,
};
use eio_reference::model::logits;
use eio_reference::state::ModelState;
use eio_spec::attack::{InputDiversity, Interpolation, SkipGradient};
use eio_spec::config::{AttackLoss, BnMode, Sharing};
use eio_spec::{Path, Plan};
use ndarray::{Array2, Array4, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const LOSSES: [AttackLoss; 3] = [AttackLoss::Ce, AttackLoss::Cw, AttackLoss::CwDverge];

/// A tiny RGN (ResNet-8, 8 x 8, n = 2), a second state for a second ensemble member, two paths,
/// a batch of 2 images with some pixels exactly at 0 or 1, and labels.
struct World {
    plan: Plan,
    state: ModelState,
    other_state: ModelState,
    path: Path,
    other_path: Path,
    x: Array4<f64>,
    labels: Vec<usize>,
}

fn world(seed: u64) -> World {
    let plan = tiny::plan(&tiny::tiny(Sharing::Independent));
    let state = tiny::perturbed_state(&plan, seed);
    let other_state = tiny::perturbed_state(&plan, seed + 1000);
    let mut r = tiny::rng(seed);
    let x = tiny::images(&mut r, 2, &plan).mapv(|v| {
        if v < 0.1 {
            0.0
        } else if v > 0.9 {
            1.0
        } else {
            v
        }
    });
    let labels = tiny::labels(&mut r, 2, plan.classes);
    let path = tiny::alternating_path(&plan);
    let other_path = Path::new((0..plan.k()).map(|g| (g % 3 == 0) as u8).collect());
    World {
        plan,
        state,
        other_state,
        path,
        other_path,
        x,
        labels,
    }
}

/// The three target kinds, in the order Path, Ensemble, Randomised.
fn target(w: &World, kind: usize) -> Target<'_> {
    match kind {
        0 => Target::Path {
            plan: &w.plan,
            state: &w.state,
            path: &w.path,
            mode: BnMode::Eval,
        },
        1 => Target::Ensemble(vec![
            Member {
                plan: &w.plan,
                state: &w.state,
                path: &w.path,
            },
            Member {
                plan: &w.plan,
                state: &w.other_state,
                path: &w.other_path,
            },
        ]),
        _ => Target::Randomised {
            plan: &w.plan,
            state: &w.state,
            eot: 2,
        },
    }
}

fn plain(loss: AttackLoss) -> AttackSettings {
    AttackSettings {
        eps: 0.03,
        step_size: 0.012,
        steps: 3,
        random_start: true,
        loss,
        // A wide C&W margin: the tiny random models misclassify most images by more than the
        // usual κ = 0.1, where both C&W losses have no gradient at all.
        cw_kappa: 5.0,
        momentum: None,
        input_diversity: None,
        skip_gradient: None,
    }
}

/// Input diversity for 8 x 8 images: sizes 4..=7, offsets up to 3.
fn diversity(probability: f64, interpolation: Interpolation) -> InputDiversity {
    InputDiversity {
        probability,
        resize_rate: 0.5,
        interpolation,
    }
}

/// The attacks of the suite and their combinations, by name.
fn attacks(loss: AttackLoss) -> Vec<(&'static str, AttackSettings)> {
    vec![
        (
            "momentum",
            AttackSettings {
                momentum: Some(1.0),
                ..plain(loss)
            },
        ),
        (
            "m-di2 bilinear",
            AttackSettings {
                momentum: Some(1.0),
                input_diversity: Some(diversity(0.5, Interpolation::Bilinear)),
                ..plain(loss)
            },
        ),
        (
            "di2 nearest",
            AttackSettings {
                input_diversity: Some(diversity(1.0, Interpolation::Nearest)),
                ..plain(loss)
            },
        ),
        (
            "sgm",
            AttackSettings {
                skip_gradient: Some(SkipGradient::default()),
                ..plain(loss)
            },
        ),
        (
            "all three",
            AttackSettings {
                momentum: Some(1.0),
                input_diversity: Some(diversity(0.5, Interpolation::Bilinear)),
                skip_gradient: Some(SkipGradient {
                    normalise: true,
                    ..SkipGradient::default()
                }),
                ..plain(loss)
            },
        ),
    ]
}

fn run(target: &Target<'_>, w: &World, settings: &AttackSettings, seed: u64) -> AttackRun {
    pgd_run(
        target,
        &w.x,
        &w.labels,
        settings,
        &mut ChaCha8Rng::seed_from_u64(seed),
    )
}

fn assert_in_ball(what: &str, z: &Array4<f64>, x: &Array4<f64>, eps: f64) {
    assert_eq!(z.dim(), x.dim(), "{what}: shape");
    for (i, (&zi, &xi)) in z.iter().zip(x.iter()).enumerate() {
        assert!(
            zi >= xi - eps && zi <= xi + eps && (0.0..=1.0).contains(&zi),
            "{what}: entry {i} = {zi} is outside the eps = {eps} ball around {xi} or [0, 1]"
        );
    }
}

fn bitwise_eq(a: &Array4<f64>, b: &Array4<f64>) -> bool {
    a.dim() == b.dim() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Every attack with every loss on target kind `kind`: in the ball and [0, 1], moved away from
/// x, the same images and tie counts from the same seed, and other images from another seed.
fn every_attack_on(kind: usize) {
    let w = world(40 + kind as u64);
    let t = target(&w, kind);
    for loss in LOSSES {
        for (name, mut settings) in attacks(loss) {
            settings.steps = 2;
            let what = format!("target {kind}, {name}, {loss:?}");
            let a = run(&t, &w, &settings, 7);
            assert_in_ball(&what, &a.images, &w.x, settings.eps);
            let b = run(&t, &w, &settings, 7);
            assert!(bitwise_eq(&a.images, &b.images), "{what}: not reproducible");
            assert_eq!(a.sign_ties, b.sign_ties, "{what}: ties not reproducible");
            let c = run(&t, &w, &settings, 8);
            assert!(
                !bitwise_eq(&a.images, &c.images),
                "{what}: the seed is ignored"
            );
        }
    }
}

#[test]
fn every_attack_on_a_path_stays_in_the_ball_and_is_reproducible() {
    every_attack_on(0);
}

#[test]
fn every_attack_on_an_ensemble_stays_in_the_ball_and_is_reproducible() {
    every_attack_on(1);
}

#[test]
fn every_attack_on_the_randomised_rgn_stays_in_the_ball_and_is_reproducible() {
    every_attack_on(2);
}

/// m / max(‖m‖₁, 1e−12) per sample, written out.
fn l1_normalised(g: &Array4<f64>) -> Array4<f64> {
    let mut out = g.clone();
    for mut sample in out.axis_iter_mut(Axis(0)) {
        let l1: f64 = sample.iter().map(|v| v.abs()).sum();
        sample.mapv_inplace(|v| v / l1.max(1e-12));
    }
    out
}

/// clamp(clamp(a + α·sign(d), x − ε, x + ε), 0, 1), sign(0) = 0.
fn sign_step(
    a: &Array4<f64>,
    d: &Array4<f64>,
    x: &Array4<f64>,
    alpha: f64,
    eps: f64,
) -> Array4<f64> {
    let mut out = a.clone();
    ndarray::Zip::from(&mut out)
        .and(d)
        .and(x)
        .for_each(|o, &di, &xi| {
            let s = if di > 0.0 {
                1.0
            } else if di < 0.0 {
                -1.0
            } else {
                0.0
            };
            *o = (*o + alpha * s).clamp(xi - eps, xi + eps).clamp(0.0, 1.0);
        });
    out
}

#[test]
fn momentum_follows_the_mi_fgsm_rule_step_by_step() {
    // Two steps from x (no random start) with μ = 0.7 and α large enough that the second step
    // is clipped to the ball: m_0 = g_0/‖g_0‖₁, m_1 = 0.7·m_0 + g_1/‖g_1‖₁.
    let w = world(50);
    let t = target(&w, 0);
    let settings = AttackSettings {
        eps: 0.03,
        step_size: 0.02,
        steps: 2,
        random_start: false,
        momentum: Some(0.7),
        ..plain(AttackLoss::Ce)
    };
    let mut unused = ChaCha8Rng::seed_from_u64(0);
    let mut grad = |at: &Array4<f64>| {
        t.loss_and_input_grad(at, &w.labels, AttackLoss::Ce, 5.0, None, &mut unused)
            .1
    };
    let g0 = grad(&w.x);
    let m0 = l1_normalised(&g0);
    let x1 = sign_step(&w.x, &m0, &w.x, 0.02, 0.03);
    let g1 = grad(&x1);
    let m1 = &m0 * 0.7 + &l1_normalised(&g1);
    let x2 = sign_step(&x1, &m1, &w.x, 0.02, 0.03);
    let got = run(&t, &w, &settings, 1);
    assert!(
        bitwise_eq(&got.images, &x2),
        "momentum PGD differs from the rule"
    );
    let ties = m0.iter().chain(&m1).filter(|v| v.abs() < 1e-12).count();
    assert_eq!(got.sign_ties, ties);
    // The case is not degenerate: momentum steps somewhere against the new gradient, so plain
    // PGD ends elsewhere, and the second step is clipped somewhere.
    assert!(m1.iter().zip(&g1).any(|(m, g)| m * g < 0.0));
    let plain_run = pgd(
        &t,
        &w.x,
        &w.labels,
        &AttackSettings {
            momentum: None,
            ..settings.clone()
        },
        &mut ChaCha8Rng::seed_from_u64(1),
    );
    assert!(!bitwise_eq(&plain_run, &x2));
    assert!(x2
        .iter()
        .zip(&w.x)
        .any(|(a, x)| ((a - x).abs() - 0.03).abs() < 1e-12));
}

#[test]
fn input_diversity_with_probability_zero_is_plain_pgd() {
    // A deterministic target: the transform's skipped draws consume the rng, but nothing else
    // reads it after the random start. (A randomised target would draw other paths.)
    let w = world(60);
    for kind in [0, 1] {
        let t = target(&w, kind);
        for loss in LOSSES {
            for momentum in [None, Some(1.0)] {
                let base = AttackSettings {
                    momentum,
                    ..plain(loss)
                };
                let never = AttackSettings {
                    input_diversity: Some(diversity(0.0, Interpolation::Bilinear)),
                    ..base.clone()
                };
                let a = run(&t, &w, &base, 3);
                let b = run(&t, &w, &never, 3);
                assert!(
                    bitwise_eq(&a.images, &b.images) && a.sign_ties == b.sign_ties,
                    "target {kind}, {loss:?}, momentum {momentum:?}"
                );
            }
        }
    }
}

#[test]
fn a_step_draws_the_transform_then_the_eot_paths() {
    // Two steps of momentum + DI (probability 1) + SGM on the randomised RGN from x, replayed
    // by hand from a clone of the generator: per step, the diversity draw, then the target's
    // EOT paths (inside loss_and_input_grad), the gradient mapped back through Tᵀ.
    let w = world(70);
    let t = target(&w, 2);
    let di = diversity(1.0, Interpolation::Bilinear);
    let sgm = SkipGradient::default();
    let settings = AttackSettings {
        steps: 2,
        random_start: false,
        momentum: Some(1.0),
        input_diversity: Some(di),
        skip_gradient: Some(sgm),
        ..plain(AttackLoss::Cw)
    };
    let mut r = ChaCha8Rng::seed_from_u64(5);
    let mut adv = w.x.clone();
    let mut momentum: Option<Array4<f64>> = None;
    let mut draws = Vec::new();
    for _ in 0..2 {
        let draw = di.draw(8, &mut r).expect("probability 1");
        draws.push(draw);
        let transformed = input_diversity(&adv, &draw, Interpolation::Bilinear);
        let (_, g) = t.loss_and_input_grad(
            &transformed,
            &w.labels,
            AttackLoss::Cw,
            settings.cw_kappa,
            Some(&sgm),
            &mut r,
        );
        let g = input_diversity_backward(&g, &draw, Interpolation::Bilinear);
        let m = match &momentum {
            Some(m) => m * 1.0 + &l1_normalised(&g),
            None => l1_normalised(&g),
        };
        adv = sign_step(&adv, &m, &w.x, settings.step_size, settings.eps);
        momentum = Some(m);
    }
    assert!(draws.iter().any(|d| d.top > 0 && d.left > 0), "{draws:?}");
    let got = run(&t, &w, &settings, 5);
    assert!(
        bitwise_eq(&got.images, &adv),
        "draws {draws:?}: pgd_run differs from the documented order"
    );
}

#[test]
fn sign_ties_are_counted() {
    // κ = −1000: the C&W margin is negative everywhere, the gradient is exactly 0, so every
    // entry of every step is a tie (with momentum: 0 / the L1 floor = 0) and x stays put.
    let w = world(80);
    for kind in 0..3 {
        let t = target(&w, kind);
        for momentum in [None, Some(1.0)] {
            let settings = AttackSettings {
                random_start: false,
                cw_kappa: -1000.0,
                momentum,
                input_diversity: Some(diversity(0.5, Interpolation::Bilinear)),
                ..plain(AttackLoss::Cw)
            };
            let got = run(&t, &w, &settings, 4);
            assert_eq!(got.sign_ties, settings.steps * w.x.len(), "target {kind}");
            assert!(bitwise_eq(&got.images, &w.x));
        }
    }
    // A real attack has (almost) none.
    let got = run(&target(&w, 0), &w, &plain(AttackLoss::Ce), 4);
    assert!(got.sign_ties < w.x.len() / 10, "{} ties", got.sign_ties);
}

/// The attack loss of output `z`.
fn loss_value(z: &Array2<f64>, labels: &[usize], loss: AttackLoss, kappa: f64) -> f64 {
    match loss {
        AttackLoss::Ce => cross_entropy(z, labels).value,
        AttackLoss::Cw => cw_loss(z, labels, kappa).value,
        AttackLoss::CwDverge => cw_dverge_loss(z, labels, kappa).value,
    }
}

/// The scaled graph's adds of SGM without normalisation.
fn scaled_adds(plan: &Plan, sgm: &SkipGradient) -> Vec<ScaledAdd> {
    plan.residual_blocks()
        .iter()
        .map(|b| ScaledAdd {
            add: b.add,
            branch: sgm.branch_factor(b),
            block: 1.0,
        })
        .collect()
}

#[test]
fn sgm_on_every_target_is_the_gradient_of_its_scaled_graphs() {
    // Each member (path) of the target becomes its scaled graph G around the pass at x; the
    // target's loss built from the Gs (the log of the mean softmax for the ensemble, the mean
    // over the same EOT paths for the randomised RGN) has the SGM gradient as its gradient.
    // The C&W losses run with κ = 5 so that every one has a gradient to check (see `plain`).
    let w = world(90);
    let sgm = SkipGradient::default();
    let adds = scaled_adds(&w.plan, &sgm);
    let mut r = tiny::rng(91);
    let entries = tiny::entries(&mut r, w.x.len(), 16);
    for kind in 0..3 {
        let t = target(&w, kind);
        for loss in LOSSES {
            let kappa = 5.0;
            let members: Vec<(&ModelState, Path)> = match kind {
                0 => vec![(&w.state, w.path.clone())],
                1 => vec![
                    (&w.state, w.path.clone()),
                    (&w.other_state, w.other_path.clone()),
                ],
                _ => {
                    let mut replay = ChaCha8Rng::seed_from_u64(5);
                    (0..2)
                        .map(|_| (&w.state, w.plan.path_space().sample(&mut replay)))
                        .collect()
                }
            };
            let traces: Vec<_> = members
                .iter()
                .map(|(state, path)| logits(&w.plan, state, path, &w.x, BnMode::Eval).1)
                .collect();
            let g = |x: &Array4<f64>| -> f64 {
                let outputs: Vec<Array2<f64>> = members
                    .iter()
                    .zip(&traces)
                    .map(|((state, path), at)| {
                        sgm_scaled_logits(&w.plan, state, path, at, x, &adds)
                    })
                    .collect();
                match kind {
                    1 => loss_value(
                        &log_mean_softmax(&outputs, ENSEMBLE_PROB_FLOOR),
                        &w.labels,
                        loss,
                        kappa,
                    ),
                    _ => {
                        outputs
                            .iter()
                            .map(|z| loss_value(z, &w.labels, loss, kappa))
                            .sum::<f64>()
                            / outputs.len() as f64
                    }
                }
            };
            let (value, grad) = t.loss_and_input_grad(
                &w.x,
                &w.labels,
                loss,
                kappa,
                Some(&sgm),
                &mut ChaCha8Rng::seed_from_u64(5),
            );
            let what = format!("target {kind}, {loss:?}");
            assert!((value - g(&w.x)).abs() <= 1e-12, "{what}: loss value");
            assert!(
                grad.iter().any(|&v| v != 0.0),
                "{what}: no gradient to check"
            );
            tiny::check_entries(&what, g, &w.x, &grad, &entries);
        }
    }
}

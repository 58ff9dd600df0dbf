//! The transfer attacks of the black-box suite (issue 13), f64 CPU against the reference at
//! 1e-9: MI-FGSM momentum PGD (Dong et al. 2018), M-DI²-FGSM (momentum and the input-diversity
//! transform of Xie et al. 2019, both interpolations) and SGM (Wu et al. 2020, with and
//! without its per-block normalisation and first-block exclusion), each with CE, C&W and
//! DVERGE's C&W against one path, an ensemble of 2 and the randomised RGN with EOT 2. Sign
//! ties are counted by both engines and handled by `check_pgd`'s step-by-step rule (printed,
//! never hidden). Then the input-diversity transform and its adjoint, exactly and by known
//! answers, and SGM's special cases whose answer is known.

use eio_spec::attack::{DiversityDraw, InputDiversity, Interpolation, SkipGradient};
use eio_spec::config::{AttackLoss, Sharing};
use eio_tests::cases::{
    net_spec, pass_case_over, proptest_config, small_net_spec, transfer_attack_case, AttackCase,
    NetSpec, PassCase, TargetKind, Transfer,
};
use eio_tests::checks::{check_pgd, note};
use eio_tests::engine::{or_skip, Engine, Images};
use eio_tests::{assert_close, Accelerated, Reference, Tolerance};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The case against each kind of target (the path in the case's BN mode), each with one of
/// the suite's losses: the three losses in turn, starting at `first_loss` (so that the cases
/// of a property cover every pairing between them).
fn every_target(attack: &AttackCase, first_loss: usize) -> Vec<AttackCase> {
    let path = match attack.target {
        TargetKind::Path(mode) => TargetKind::Path(mode),
        _ => TargetKind::Path(eio_spec::config::BnMode::Eval),
    };
    let losses = [AttackLoss::Ce, AttackLoss::Cw, AttackLoss::CwDverge];
    [path, TargetKind::Ensemble, TargetKind::Randomised]
        .into_iter()
        .enumerate()
        .map(|(i, target)| AttackCase {
            target,
            loss: losses[(first_loss + i) % losses.len()],
            ..attack.clone()
        })
        .collect()
}

/// [`check_pgd`] for `attack` against every kind of target on the fixture of `case` (see
/// [`every_target`]), with a note where ties let the runs part.
fn check_transfer(test: &str, case: &PassCase, attack: &AttackCase, first_loss: usize) {
    let fx = case.fixture();
    for attack in every_target(attack, first_loss) {
        if let Some(s) = or_skip(
            test,
            check_pgd(
                &Reference,
                &Accelerated::f64_cpu(),
                &fx,
                &attack,
                &fx.rng,
                Tolerance::F64_STRICT,
            ),
        ) {
            if let Some(k) = s.diverged_at {
                note(&format!(
                    "note: {test}: {:?} {:?}: sign ties {:?}, runs parted after step {k}",
                    attack.target, attack.loss, s.ties
                ));
            }
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(4))]

    /// MI-FGSM: the sign of the per-sample L1-normalised momentum (decay 1, 0.9 or 0.5).
    #[test]
    fn momentum_pgd_matches_reference(
        case in pass_case_over(small_net_spec(), 1..=3),
        attack in transfer_attack_case(Transfer::Momentum),
    ) {
        let first_loss = (case.seed % 3) as usize;
        check_transfer("f64_transfer_attacks::momentum_pgd_matches_reference", &case, &attack, first_loss);
    }

    /// M-DI²-FGSM: momentum on gradients taken at the transformed images and mapped back
    /// through the transform's adjoint (probability 0.5 or 1, sizes from resize rate 0.9 or
    /// 0.5, bilinear or nearest).
    #[test]
    fn momentum_diversity_matches_reference(
        case in pass_case_over(small_net_spec(), 1..=3),
        attack in transfer_attack_case(Transfer::MomentumDiversity),
    ) {
        let first_loss = (case.seed % 3) as usize;
        check_transfer("f64_transfer_attacks::momentum_diversity_matches_reference", &case, &attack, first_loss);
    }

    /// SGM on ResNet-8 and ResNet-14 at width 1/4 (so that the first-block exclusion leaves
    /// some blocks scaled), γ 0.2 or 0.5, with or without normalisation and momentum.
    #[test]
    fn skip_gradient_matches_reference(
        case in pass_case_over(net_spec().prop_map(|net| NetSpec { width: 0.25, ..net }), 1..=2),
        attack in transfer_attack_case(Transfer::SkipGradient),
    ) {
        let first_loss = (case.seed % 3) as usize;
        check_transfer("f64_transfer_attacks::skip_gradient_matches_reference", &case, &attack, first_loss);
    }
}

/// The suite's own settings (momentum 1; DI with probability 0.5, resize rate 0.9, bilinear;
/// SGM γ 0.2), 4 steps of ε/5 at ε 0.03 with a random start, on 16x16 images so that the
/// torchattacks ranges draw sizes 14-15 at offsets 0-1.
#[test]
fn suite_versions_match_reference() {
    let net = NetSpec {
        input_size: 12,
        ..NetSpec::tiny(Sharing::Independent)
    };
    let plan = net.plan();
    let case = PassCase {
        path: plan.path_space().sample(&mut ChaCha8Rng::seed_from_u64(31)),
        net,
        layer: 1,
        batch: 2,
        seed: 32,
    };
    let base = AttackCase {
        target: TargetKind::Path(eio_spec::config::BnMode::Eval),
        loss: AttackLoss::Ce,
        eps: 0.03,
        step_fraction: 0.2,
        steps: 4,
        random_start: true,
        kappa: 0.1,
        momentum: Some(1.0),
        input_diversity: None,
        skip_gradient: None,
    };
    let versions = [
        ("mpgd", base.clone()),
        (
            "mdi2",
            AttackCase {
                input_diversity: Some(InputDiversity::default()),
                ..base.clone()
            },
        ),
        (
            "sgm",
            AttackCase {
                skip_gradient: Some(SkipGradient::default()),
                ..base
            },
        ),
    ];
    for (first_loss, (name, attack)) in versions.into_iter().enumerate() {
        check_transfer(
            &format!("f64_transfer_attacks::suite_versions_match_reference ({name})"),
            &case,
            &attack,
            first_loss,
        );
    }
}

/// An input-diversity case: a batch of `[N, C, H, W]` images, a draw that fits them, an
/// interpolation and an image-shaped gradient.
#[derive(Debug, Clone)]
struct DiversityCase {
    images: Images,
    grad: Images,
    draw: DiversityDraw,
    interpolation: Interpolation,
}

fn diversity_case() -> impl Strategy<Value = DiversityCase> {
    (1usize..=2, 1usize..=3, 1usize..=9, 1usize..=9, any::<u64>())
        .prop_flat_map(|(n, c, h, w, seed)| {
            let side = h.min(w);
            (
                Just((n, c, h, w, seed)),
                (1..=side).prop_flat_map(move |size| (Just(size), 0..=h - size, 0..=w - size)),
                prop_oneof![Just(Interpolation::Bilinear), Just(Interpolation::Nearest)],
            )
        })
        .prop_map(|((n, c, h, w, seed), (size, top, left), interpolation)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut random = |lo: f64, hi: f64| Images {
                dims: [n, c, h, w],
                data: (0..n * c * h * w)
                    .map(|_| rng.random_range(lo..hi))
                    .collect(),
            };
            DiversityCase {
                images: random(0.0, 1.0),
                grad: random(-1.0, 1.0),
                draw: DiversityDraw { size, top, left },
                interpolation,
            }
        })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

proptest! {
    #![proptest_config(proptest_config(64))]

    /// T(x) and Tᵀg against the reference's loops at 1e-9, on square and non-square images of
    /// side 1-9 with every size and offset that fits; and Tᵀ is T's adjoint:
    /// ⟨T x, g⟩ = ⟨x, Tᵀ g⟩ to 1e-12 relative.
    #[test]
    fn input_diversity_matches_reference(case in diversity_case()) {
        let engine = Accelerated::f64_cpu();
        let what = format!("{} vs {}: input diversity {case:?}", Reference.name(), engine.name());
        let (r, c) = (
            Reference.input_diversity(&case.images, &case.draw, case.interpolation),
            engine.input_diversity(&case.images, &case.draw, case.interpolation),
        );
        let (r, c) = (r.expect("reference"), c.expect("f64 cpu"));
        assert_eq!(r.dims, case.images.dims, "{what}: shape");
        assert_close(&format!("{what}: T(x)"), &r.data, &c.data, Tolerance::F64_STRICT);
        let (rb, cb) = (
            Reference.input_diversity_backward(&case.grad, &case.draw, case.interpolation),
            engine.input_diversity_backward(&case.grad, &case.draw, case.interpolation),
        );
        let (rb, cb) = (rb.expect("reference"), cb.expect("f64 cpu"));
        assert_close(&format!("{what}: Tᵀ g"), &rb.data, &cb.data, Tolerance::F64_STRICT);
        let (lhs, rhs) = (dot(&c.data, &case.grad.data), dot(&case.images.data, &cb.data));
        let scale = case.grad.data.iter().map(|g| g.abs()).sum::<f64>().max(1.0);
        prop_assert!(
            (lhs - rhs).abs() <= 1e-12 * scale,
            "{what}: ⟨T x, g⟩ = {lhs} but ⟨x, Tᵀ g⟩ = {rhs}"
        );
    }
}

/// Agreement with numbers derived by hand, to 1e-14 (every value is a sum of at most four
/// products of fractions, each rounded to f64: a few ulps).
#[track_caller]
fn assert_known(what: &str, engine: &dyn Engine, got: &Images, want: &[f64]) {
    assert_close(
        &format!("{}: {what}", engine.name()),
        want,
        &got.data,
        Tolerance {
            rel: 1e-14,
            abs: 1e-14,
            abs_of_max: 0.0,
        },
    );
}

/// Known answers of the transform and its adjoint, on both engines.
///
/// Bilinear, 4x4 -> 3x3 placed at top 1, left 0. Along each axis (in 4, out 3, scale 4/3)
/// output i reads source coordinate (i + ½)·4/3 − ½ = 1/6, 3/2, 17/6, so the resize matrix is
///
/// ```text
/// M = [5/6 1/6  0   0 ]
///     [ 0  1/2 1/2  0 ]
///     [ 0   0  1/6 5/6]
/// ```
///
/// For the image x[r][c] = 4r + c (affine, and bilinear weights reproduce affine functions)
/// the resized value is 4·s_i + s_j with s = (1/6, 3/2, 17/6), written at row 1 + i, column j
/// (e.g. 4·1/6 + 1/6 = 5/6, 4·3/2 + 17/6 = 53/6); row 0 and column 3 are padding (0). A second channel holds −x and gives the negated result.
///
/// The adjoint of the gradient g[p][q] = (p + 1)(q + 1) reads only the placed 3x3 block and is
/// separable: (Tᵀg)[a][b] = v_a·z_b with v_a = Σ_i M[i][a]·(i + 2) (rows 1-3 of g) =
/// (5/3, 11/6, 13/6, 10/3) and z_b = Σ_j M[j][b]·(j + 1) (columns 0-2) = (5/6, 7/6, 3/2, 5/2).
///
/// Nearest, 5x5 -> 3x3 at top 0, left 2: output i reads ⌊i·5/3⌋ = 0, 1, 3. For
/// x[r][c] = 5r + c the output at (i, 2 + j) is 5·p_i + p_j with p = (0, 1, 3); the adjoint of
/// g[p][q] = 10p + q puts g[i][2 + j] = 10i + j + 2 at (p_i, p_j) and 0 on rows and columns 2
/// and 4, which no output reads.
#[test]
fn input_diversity_known_answers() {
    let x4: Vec<f64> = (0..16).map(f64::from).collect();
    let images = Images {
        dims: [1, 2, 4, 4],
        data: x4.iter().copied().chain(x4.iter().map(|v| -v)).collect(),
    };
    let resized = [
        [0.0, 0.0, 0.0, 0.0],
        [5.0 / 6.0, 13.0 / 6.0, 7.0 / 2.0, 0.0],
        [37.0 / 6.0, 15.0 / 2.0, 53.0 / 6.0, 0.0],
        [23.0 / 2.0, 77.0 / 6.0, 85.0 / 6.0, 0.0],
    ]
    .concat();
    let bilinear_forward: Vec<f64> = resized
        .iter()
        .copied()
        .chain(resized.iter().map(|v| -v))
        .collect();
    let g4: Vec<f64> = (0..4)
        .flat_map(|p| (0..4).map(move |q| f64::from((p + 1) * (q + 1))))
        .collect();
    let grad = Images {
        dims: [1, 2, 4, 4],
        data: g4.iter().copied().chain(g4.iter().map(|v| -v)).collect(),
    };
    let v = [5.0 / 3.0, 11.0 / 6.0, 13.0 / 6.0, 10.0 / 3.0];
    let z = [5.0 / 6.0, 7.0 / 6.0, 1.5, 2.5];
    let adjoint: Vec<f64> = v
        .iter()
        .flat_map(|a| z.iter().map(move |b| a * b))
        .collect();
    let bilinear_backward: Vec<f64> = adjoint
        .iter()
        .copied()
        .chain(adjoint.iter().map(|v| -v))
        .collect();
    let bilinear = DiversityDraw {
        size: 3,
        top: 1,
        left: 0,
    };

    let x5 = Images {
        dims: [1, 1, 5, 5],
        data: (0..25).map(f64::from).collect(),
    };
    let g5 = Images {
        dims: [1, 1, 5, 5],
        data: (0..5)
            .flat_map(|p| (0..5).map(move |q| f64::from(10 * p + q)))
            .collect(),
    };
    let p = [0, 1, 3];
    let mut nearest_forward = vec![0.0; 25];
    let mut nearest_backward = vec![0.0; 25];
    for i in 0..3 {
        for j in 0..3 {
            nearest_forward[i * 5 + 2 + j] = f64::from(5 * p[i] + p[j]);
            nearest_backward[p[i] as usize * 5 + p[j] as usize] = (10 * i + j + 2) as f64;
        }
    }
    let nearest = DiversityDraw {
        size: 3,
        top: 0,
        left: 2,
    };

    let engines: [&dyn Engine; 2] = [&Reference, &Accelerated::f64_cpu()];
    for engine in engines {
        let run = |x: &Images, draw: &DiversityDraw, i: Interpolation, back: bool| {
            let out = if back {
                engine.input_diversity_backward(x, draw, i)
            } else {
                engine.input_diversity(x, draw, i)
            };
            out.expect("both engines run the transform")
        };
        let b = Interpolation::Bilinear;
        let n = Interpolation::Nearest;
        assert_known(
            "bilinear 4x4 -> 3x3 at (1, 0)",
            engine,
            &run(&images, &bilinear, b, false),
            &bilinear_forward,
        );
        assert_known(
            "bilinear adjoint",
            engine,
            &run(&grad, &bilinear, b, true),
            &bilinear_backward,
        );
        assert_known(
            "nearest 5x5 -> 3x3 at (0, 2)",
            engine,
            &run(&x5, &nearest, n, false),
            &nearest_forward,
        );
        assert_known(
            "nearest adjoint",
            engine,
            &run(&g5, &nearest, n, true),
            &nearest_backward,
        );
    }
}

/// The input gradient of CE along the fixture's path with SGM `skip` (or none).
fn sgm_gradient(engine: &dyn Engine, case: &PassCase, skip: Option<&SkipGradient>) -> Vec<f64> {
    let fx = case.fixture();
    let target = fx.target(TargetKind::Path(eio_spec::config::BnMode::Eval));
    engine
        .attack_loss(
            &target,
            &fx.images,
            &fx.labels,
            AttackLoss::Ce,
            0.0,
            skip,
            fx.rng.clone(),
        )
        .expect("both engines run SGM")
        .1
}

/// SGM's answers that are known without running SGM, on both engines:
///
/// * γ = 1 without normalisation is the plain gradient (the backward is unchanged);
/// * on ResNet-8 every block is the first of its stage, so `exclude_stage_first` leaves every
///   branch at 1: the plain gradient again;
/// * γ = 1 with normalisation divides the gradient at each add by its standard deviation, and
///   every path from the logits to the input crosses every add of a ResNet, so the result is
///   the plain gradient times one positive number;
/// * γ = 0.2 is none of these (and equals the reference's at 1e-9).
#[test]
fn skip_gradient_known_answers() {
    let resnet = |blocks: usize, seed: u64| {
        let net = NetSpec {
            blocks,
            ..NetSpec::tiny(Sharing::SharedConv)
        };
        let path = net
            .plan()
            .path_space()
            .sample(&mut ChaCha8Rng::seed_from_u64(seed));
        PassCase {
            net,
            path,
            layer: 1,
            batch: 3,
            seed,
        }
    };
    let (resnet8, resnet14) = (resnet(1, 41), resnet(2, 42));
    let sgm = |gamma: f64, normalise: bool, exclude_stage_first: bool| SkipGradient {
        gamma,
        normalise,
        exclude_stage_first,
    };
    let f64_cpu = Accelerated::f64_cpu();
    let engines: [&dyn Engine; 2] = [&Reference, &f64_cpu];
    for engine in engines {
        let name = engine.name();
        for case in [&resnet8, &resnet14] {
            let depth = 6 * case.net.blocks + 2;
            let plain = sgm_gradient(engine, case, None);
            let identity = sgm_gradient(engine, case, Some(&sgm(1.0, false, false)));
            assert_close(
                &format!("{name}: ResNet-{depth}: SGM γ = 1 against the plain gradient"),
                &plain,
                &identity,
                Tolerance::F64_STRICT,
            );
            let normalised = sgm_gradient(engine, case, Some(&sgm(1.0, true, false)));
            let (i, _) = plain.iter().enumerate().fold((0, 0.0), |m, (i, v)| {
                if v.abs() > m.1 {
                    (i, v.abs())
                } else {
                    m
                }
            });
            let ratio = normalised[i] / plain[i];
            assert!(
                ratio > 0.0,
                "{name}: ResNet-{depth}: normalised SGM flips the gradient"
            );
            let scaled: Vec<f64> = plain.iter().map(|v| v * ratio).collect();
            assert_close(
                &format!("{name}: ResNet-{depth}: normalised SGM γ = 1 against a multiple of the plain gradient"),
                &scaled,
                &normalised,
                Tolerance::F64_STRICT,
            );
            let scaled_sgm = sgm_gradient(engine, case, Some(&sgm(0.2, false, false)));
            let moved = plain
                .iter()
                .zip(&scaled_sgm)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f64, f64::max);
            assert!(
                moved > 1e-3 * plain.iter().map(|v| v.abs()).fold(0.0f64, f64::max),
                "{name}: ResNet-{depth}: SGM γ = 0.2 did not change the gradient"
            );
        }
        let excluded = sgm_gradient(engine, &resnet8, Some(&sgm(0.2, false, true)));
        assert_close(
            &format!("{name}: ResNet-8: SGM excluding the first blocks against the plain gradient"),
            &sgm_gradient(engine, &resnet8, None),
            &excluded,
            Tolerance::F64_STRICT,
        );
    }
    for case in [&resnet8, &resnet14] {
        for skip in [sgm(0.2, false, false), sgm(0.2, true, true)] {
            assert_close(
                &format!(
                    "SGM {skip:?} on ResNet-{}: reference vs f64 cpu",
                    6 * case.net.blocks + 2
                ),
                &sgm_gradient(&Reference, case, Some(&skip)),
                &sgm_gradient(&f64_cpu, case, Some(&skip)),
                Tolerance::F64_STRICT,
            );
        }
    }
}

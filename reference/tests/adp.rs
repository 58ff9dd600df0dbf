//! ADP's loss (DVERGE's port of Pang et al. 2019): central finite differences of the loss with
//! respect to every member's logits for N = 2, 3, 5 members (each term alone and all
//! together), hand-computed values of the entropy and the log-det, the Cholesky log-det and
//! its inverse, and one iteration's bookkeeping (running statistics, report, update).

mod common;

use common::{rng, uniform, TOL};
use eio_reference::adp::{adp_iteration, adp_loss, spd_log_det};
use eio_reference::grad_check::{numerical_gradient, relative_error, DEFAULT_FLOOR};
use eio_reference::loss::{cross_entropy, softmax};
use eio_reference::model::logits;
use eio_reference::optim::{Optimiser, Sgd, SgdConfig};
use eio_reference::state::ModelState;
use eio_spec::config::{
    Activation, AdpConfig, Arch, BnMode, Config, ModelConfig, Sharing, VggGating,
};
use eio_spec::rng::Seeds;
use eio_spec::{Path, Plan};
use ndarray::{Array2, Array4};
use rand::Rng;

/// The finite-difference derivative: central differences at h and h/2 combined by
/// Richardson extrapolation, (4·D(h/2) − D(h))/3, with h = 2e-3. The loss carries round-off
/// of ~1e-14 (sums over members, classes and the batch of terms up to 10), which plain
/// central differences at h = 1e-5 turn into ~1e-10 absolute error: a relative 1e-6 of the
/// smallest gradient entries (~1e-4). The extrapolation cancels the h² truncation term, so a
/// step 200 times larger leaves both errors near 1e-12 (measured: worst relative error 3e-9
/// for N = 5, against 1.2e-6 at h = 1e-5). Through a whole network the curvature is larger
/// and the step smaller (2e-4).
fn numeric(f: impl Fn(&Array2<f64>) -> f64, x: &Array2<f64>, h: f64) -> Array2<f64> {
    let d = numerical_gradient(&f, x, h);
    let d_half = numerical_gradient(&f, x, h / 2.0);
    (d_half * 4.0 - d) / 3.0
}

/// Asserts `analytic` ≈ the [`numeric`] derivative of `f` at `x` with step `h` (relative
/// error below [`TOL`], floor 1e-8) and returns the worst relative error.
fn assert_derivative(
    what: &str,
    f: impl Fn(&Array2<f64>) -> f64,
    x: &Array2<f64>,
    analytic: &Array2<f64>,
    h: f64,
) -> f64 {
    let numeric = numeric(f, x, h);
    let mut worst = 0.0f64;
    for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
        let e = relative_error(*a, *n, DEFAULT_FLOOR);
        assert!(
            e < TOL,
            "{what}: entry {i}: analytic {a:e}, numeric {n:e} (relative error {e:e})"
        );
        worst = worst.max(e);
    }
    eprintln!("{what}: max relative error {worst:e}");
    worst
}

fn members(seed: u64, n: usize, batch: usize, classes: usize) -> (Vec<Array2<f64>>, Vec<usize>) {
    let mut r = rng(seed);
    let z = (0..n)
        .map(|_| uniform(&mut r, (batch, classes), -3.0, 3.0))
        .collect();
    let labels = (0..batch).map(|_| r.random_range(0..classes)).collect();
    (z, labels)
}

/// Checks dL/dz_m of `config`'s loss for every member m by central differences.
fn check_all_members(what: &str, z: &[Array2<f64>], labels: &[usize], config: &AdpConfig) {
    let loss = adp_loss(z, labels, config);
    for m in 0..z.len() {
        let f = |zm: &Array2<f64>| {
            let mut probe = z.to_vec();
            probe[m] = zm.clone();
            adp_loss(&probe, labels, config).value
        };
        assert_derivative(
            &format!("{what}, member {m}"),
            f,
            &z[m],
            &loss.grads[m],
            2e-3,
        );
    }
}

#[test]
fn loss_gradient_matches_finite_differences() {
    for (seed, n) in [(1u64, 2usize), (2, 3), (3, 5)] {
        let (z, labels) = members(seed, n, 3, 10);
        check_all_members(&format!("ADP N = {n}"), &z, &labels, &AdpConfig::default());
    }
}

/// Each term alone (the other weights 0), a large offset, and few classes (K − 1 = 2 < N = 3:
/// G is singular and δ alone keeps the log-det finite).
#[test]
fn each_term_gradient_matches_finite_differences() {
    let base = AdpConfig::default();
    let cases = [
        (
            "CE only",
            AdpConfig {
                alpha: 0.0,
                beta: 0.0,
                ..base.clone()
            },
        ),
        (
            "entropy only",
            AdpConfig {
                beta: 0.0,
                ..base.clone()
            },
        ),
        (
            "log-det only",
            AdpConfig {
                alpha: 0.0,
                ..base.clone()
            },
        ),
        (
            "large offsets",
            AdpConfig {
                det_offset: 0.1,
                log_offset: 1e-3,
                ..base.clone()
            },
        ),
    ];
    for (what, config) in &cases {
        for (seed, n) in [(10u64, 2usize), (11, 3), (12, 5)] {
            let (z, labels) = members(seed, n, 2, 6);
            check_all_members(&format!("{what}, N = {n}"), &z, &labels, config);
        }
    }
    let (z, labels) = members(13, 3, 2, 3);
    check_all_members(
        "K - 1 < N, offset 1e-2",
        &z,
        &labels,
        &AdpConfig {
            det_offset: 1e-2,
            ..base
        },
    );
}

/// The terms by hand on one sample: CE summed over members, the entropy of the mean softmax,
/// and for N = 2 log det [[1 + δ, c], [c, 1 + δ]] = log((1 + δ)² − c²) with c the cosine of
/// the two members' non-true probabilities.
#[test]
fn terms_by_hand() {
    let (z, labels) = members(20, 2, 1, 5);
    let config = AdpConfig::default();
    let loss = adp_loss(&z, &labels, &config);
    let ce: f64 = z.iter().map(|z| cross_entropy(z, &labels).value).sum();
    let s: Vec<Array2<f64>> = z.iter().map(softmax).collect();
    let y = labels[0];
    let p: Vec<f64> = (0..5)
        .map(|k| (s[0][[0, k]] + s[1][[0, k]]) / 2.0)
        .collect();
    let entropy: f64 = -p.iter().map(|p| p * (p + 1e-20).ln()).sum::<f64>();
    let u = |m: usize| -> Vec<f64> { (0..5).filter(|&k| k != y).map(|k| s[m][[0, k]]).collect() };
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (u0, u1) = (u(0), u(1));
    let c = u0.iter().zip(&u1).map(|(a, b)| a * b).sum::<f64>() / (norm(&u0) * norm(&u1));
    let log_det = ((1.0 + 1e-6f64).powi(2) - c * c).ln();
    let close = |what: &str, a: f64, e: f64| {
        assert!(
            (a - e).abs() <= 1e-12 * e.abs().max(1.0),
            "{what}: {a} against {e}"
        );
    };
    close("ce", loss.ce, ce);
    close("entropy", loss.entropy, entropy);
    close("log_det", loss.log_det, log_det);
    close(
        "value",
        loss.value,
        ce - config.alpha * entropy - config.beta * log_det,
    );
    // One member: G = [1], log det = log(1 + δ), and the log-det moves nothing.
    let one = adp_loss(&z[..1], &labels, &config);
    close("N = 1 log_det", one.log_det, (1.0 + 1e-6f64).ln());
}

#[test]
fn spd_log_det_known_answers() {
    // det [[4, 2], [2, 3]] = 8, inverse [[3, −2], [−2, 4]] / 8.
    let (ld, inv) = spd_log_det(&[4.0, 2.0, 2.0, 3.0], 2);
    assert!((ld - 8f64.ln()).abs() < 1e-15, "log det {ld}");
    for (a, e) in inv
        .iter()
        .zip([3.0 / 8.0, -2.0 / 8.0, -2.0 / 8.0, 4.0 / 8.0])
    {
        assert!((a - e).abs() < 1e-15, "inverse {inv:?}");
    }
    // A random 4 x 4 SPD matrix M Mᵀ + I: A·A⁻¹ = I, and log det against the product of the
    // pivots of a plain Gaussian elimination.
    let mut r = rng(30);
    let m = uniform(&mut r, (4, 4), -1.0, 1.0);
    let a = m.dot(&m.t()) + Array2::<f64>::eye(4);
    let flat: Vec<f64> = a.iter().copied().collect();
    let (ld, inv) = spd_log_det(&flat, 4);
    let inv = Array2::from_shape_vec((4, 4), inv).expect("4 x 4");
    let id = a.dot(&inv);
    for ((i, j), v) in id.indexed_iter() {
        let e = if i == j { 1.0 } else { 0.0 };
        assert!((v - e).abs() < 1e-13, "A A^-1 [{i}, {j}] = {v}");
    }
    let mut g = a.clone();
    let mut det = 1.0;
    for k in 0..4 {
        det *= g[[k, k]];
        for i in k + 1..4 {
            let f = g[[i, k]] / g[[k, k]];
            for j in k..4 {
                g[[i, j]] -= f * g[[k, j]];
            }
        }
    }
    assert!(
        (ld - det.ln()).abs() < 1e-13,
        "log det {ld} against {}",
        det.ln()
    );
    // Not positive definite: NaN, as torch.logdet of a negative determinant.
    let (ld, inv) = spd_log_det(&[1.0, 2.0, 2.0, 1.0], 2);
    assert!(ld.is_nan() && inv.iter().all(|v| v.is_nan()));
}

fn member_model() -> ModelConfig {
    ModelConfig {
        arch: Arch::Resnet,
        depth: 8,
        width: 0.25,
        n: 1,
        sharing: Sharing::Independent,
        classes: 4,
        in_channels: 3,
        input_size: 8,
        activation: Activation::Relu,
        leaky_slope: 0.1,
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.2023, 0.1994, 0.2010],
        vgg_gated: VggGating::Convs,
    }
}

/// One iteration with plain SGD (lr 0.1, no momentum, no decay): the report is the loss of
/// the members' train-mode logits before the update, each member's running statistics are
/// those of exactly one train-mode forward, and each parameter moved by −lr·∂L/∂θ (checked
/// against central differences of L on a few entries of the last linear layer's weight).
#[test]
fn iteration_reports_loss_commits_once_and_steps() {
    let config = Config {
        model: member_model(),
        ..Config::default()
    };
    let plan: Plan = config.plan().expect("plan");
    let path = Path::new(vec![0; plan.k()]);
    let n = 3;
    let before: Vec<ModelState> = (0..n)
        .map(|m| ModelState::init(&plan, &Seeds::new(7), m as u64))
        .collect();
    let mut r = rng(40);
    let images: Array4<f64> = uniform(&mut r, (4, 3, 8, 8), 0.0, 1.0);
    let labels: Vec<usize> = (0..4).map(|_| r.random_range(0..4)).collect();
    let lr = 0.1;
    let mut optimisers: Vec<Optimiser> = (0..n)
        .map(|_| {
            Optimiser::Sgd(Sgd::new(SgdConfig {
                lr,
                momentum: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            }))
        })
        .collect();
    let mut members = before.clone();
    let report = adp_iteration(
        &plan,
        &mut members,
        &mut optimisers,
        &config,
        &images,
        &labels,
    );

    let forward = |states: &[ModelState]| -> Vec<Array2<f64>> {
        states
            .iter()
            .map(|s| logits(&plan, s, &path, &images, BnMode::Train).0)
            .collect()
    };
    let expected = adp_loss(&forward(&before), &labels, &config.adp);
    assert!((report.loss - expected.value).abs() < 1e-12 * expected.value.abs().max(1.0));
    assert_eq!(
        report.terms,
        vec![
            ("ce", expected.ce),
            ("entropy", expected.entropy),
            ("log_det", expected.log_det)
        ]
    );
    assert_eq!(report.distill_loss, None);

    for (m, (after, start)) in members.iter().zip(&before).enumerate() {
        let (_, trace) = logits(&plan, start, &path, &images, BnMode::Train);
        let mut once = start.clone();
        once.commit(&trace);
        assert_eq!(after.counters, once.counters, "member {m}: counters");
        for spec in plan
            .params
            .iter()
            .filter(|p| p.role == eio_spec::plan::Role::RunningStat)
        {
            assert_eq!(
                after.tensors[&spec.name], once.tensors[&spec.name],
                "member {m}: {}",
                spec.name
            );
        }
    }

    // θ_after = θ_before − lr·∂L/∂θ on the classifier weight of member 1.
    let weight_name = plan
        .params
        .iter()
        .rfind(|p| p.role == eio_spec::plan::Role::Learnable && p.shape.len() == 2)
        .map(|p| p.name.clone())
        .expect("the classifier's weight");
    let w0 = before[1].tensors[&weight_name].clone();
    let step = &w0 - &members[1].tensors[&weight_name];
    let analytic = step.mapv(|d| d / lr);
    let fixed = forward(&before);
    let f = |w: &ndarray::ArrayD<f64>| {
        let mut state = before[1].clone();
        state.tensors.insert(weight_name.clone(), w.clone());
        let mut z = fixed.clone();
        z[1] = logits(&plan, &state, &path, &images, BnMode::Train).0;
        adp_loss(&z, &labels, &config.adp).value
    };
    let w0 = w0.into_dimensionality::<ndarray::Ix2>().expect("a matrix");
    let analytic = analytic
        .into_dimensionality::<ndarray::Ix2>()
        .expect("a matrix");
    assert_derivative(
        &format!("dL/d{weight_name} through the iteration"),
        |w| f(&w.clone().into_dyn()),
        &w0,
        &analytic,
        2e-4,
    );
}

//! Losses and the softmax family: finite-difference checks and hand-computed
//! answers.

mod common;

use common::{assert_close, assert_grad, rng, uniform};
use eio_reference::grad_check::weighted_sum;
use eio_reference::loss::{
    cross_entropy, cw_loss, log_mean_softmax, log_mean_softmax_backward, log_softmax,
    log_softmax_backward, mse_loss, softmax, softmax_backward, ENSEMBLE_PROB_FLOOR,
};
use ndarray::{array, Array2, Array4};

// ---------------------------------------------------------------------------
// Finite-difference checks
// ---------------------------------------------------------------------------

#[test]
fn log_softmax_and_softmax_gradients() {
    let mut r = rng(1000);
    let z = uniform(&mut r, (4, 5), -3.0, 3.0);
    let w: Array2<f64> = uniform(&mut r, (4, 5), -1.0, 1.0);
    assert_grad(
        "log_softmax",
        |z| weighted_sum(&log_softmax(z), &w),
        &z,
        &log_softmax_backward(&z, &w),
    );
    assert_grad(
        "softmax",
        |z| weighted_sum(&softmax(z), &w),
        &z,
        &softmax_backward(&z, &w),
    );
}

#[test]
fn cross_entropy_gradient() {
    let mut r = rng(1001);
    let z = uniform(&mut r, (5, 4), -3.0, 3.0);
    let labels = [0, 3, 1, 1, 2];
    let grad = cross_entropy(&z, &labels).grad;
    assert_grad(
        "cross_entropy",
        |z| cross_entropy(z, &labels).value,
        &z,
        &grad,
    );
}

#[test]
fn cw_loss_gradient_away_from_kinks() {
    let kappa = 0.1;
    let mut r = rng(1002);
    let mut z: Array2<f64> = uniform(&mut r, (8, 5), -2.0, 2.0);
    let labels = [0, 1, 2, 3, 4, 0, 1, 2];
    // Boost the true logit of every other sample so that both the active
    // (m > 0) and the inactive (m < 0) regime occur.
    for n in (0..8).step_by(2) {
        z[[n, labels[n]]] += 2.0;
    }
    // Preconditions: every margin is away from the ReLU kink and no two
    // competitors tie for the max, so the loss is smooth around z.
    let (mut active, mut inactive) = (0, 0);
    for (n, &y) in labels.iter().enumerate() {
        let mut others: Vec<f64> = (0..5).filter(|&k| k != y).map(|k| z[[n, k]]).collect();
        others.sort_by(f64::total_cmp);
        assert!(
            others[3] - others[2] > 1e-3,
            "sample {n}: near-tie of the max"
        );
        let margin = z[[n, y]] - others[3] + kappa;
        assert!(
            margin.abs() > 1e-3,
            "sample {n}: margin {margin} near the kink"
        );
        if margin > 0.0 {
            active += 1;
        } else {
            inactive += 1;
        }
    }
    assert!(
        active >= 2 && inactive >= 2,
        "want both regimes: {active} active, {inactive} inactive"
    );
    let grad = cw_loss(&z, &labels, kappa).grad;
    assert_grad("cw_loss", |z| cw_loss(z, &labels, kappa).value, &z, &grad);
}

#[test]
fn mse_loss_gradient() {
    let mut r = rng(1003);
    let x: Array4<f64> = uniform(&mut r, (2, 3, 2, 2), -1.0, 1.0);
    let t: Array4<f64> = uniform(&mut r, (2, 3, 2, 2), -1.0, 1.0);
    let grad = mse_loss(&x, &t).grad;
    assert_grad("mse_loss rank 4", |x| mse_loss(x, &t).value, &x, &grad);
    let x2: Array2<f64> = uniform(&mut r, (3, 4), -1.0, 1.0);
    let t2: Array2<f64> = uniform(&mut r, (3, 4), -1.0, 1.0);
    let grad2 = mse_loss(&x2, &t2).grad;
    assert_grad("mse_loss rank 2", |x| mse_loss(x, &t2).value, &x2, &grad2);
}

#[test]
fn log_mean_softmax_gradient_to_every_member() {
    let mut r = rng(1004);
    let members: Vec<Array2<f64>> = (0..3).map(|_| uniform(&mut r, (4, 5), -3.0, 3.0)).collect();
    let w: Array2<f64> = uniform(&mut r, (4, 5), -1.0, 1.0);
    for floor in [0.0, ENSEMBLE_PROB_FLOOR] {
        let grads = log_mean_softmax_backward(&members, floor, &w);
        assert_eq!(grads.len(), 3);
        for (m, grad) in grads.iter().enumerate() {
            assert_grad(
                &format!("log_mean_softmax member {m} floor {floor}"),
                |z| {
                    let mut ms = members.clone();
                    ms[m] = z.clone();
                    weighted_sum(&log_mean_softmax(&ms, floor), &w)
                },
                &members[m],
                grad,
            );
        }
    }
}

#[test]
fn ensemble_cross_entropy_gradient_chain() {
    // The ensemble attack objective: CE of the log-mean-softmax, chained by
    // hand (CE grad -> log_mean_softmax_backward).
    let mut r = rng(1005);
    let members: Vec<Array2<f64>> = (0..2).map(|_| uniform(&mut r, (3, 4), -3.0, 3.0)).collect();
    let labels = [2, 0, 3];
    let objective =
        |ms: &[Array2<f64>]| cross_entropy(&log_mean_softmax(ms, ENSEMBLE_PROB_FLOOR), &labels);
    let upstream = objective(&members).grad;
    let grads = log_mean_softmax_backward(&members, ENSEMBLE_PROB_FLOOR, &upstream);
    for (m, grad) in grads.iter().enumerate() {
        assert_grad(
            &format!("ensemble CE member {m}"),
            |z| {
                let mut ms = members.clone();
                ms[m] = z.clone();
                objective(&ms).value
            },
            &members[m],
            grad,
        );
    }
}

// ---------------------------------------------------------------------------
// Hand-computed answers
// ---------------------------------------------------------------------------

#[test]
fn cross_entropy_known_value() {
    // logits [1, 2, 3], label 2: L = log(e^1 + e^2 + e^3) - 3
    //   = log(1 + e^-1 + e^-2) = log(1.5032147244080551) = 0.40760596444438013
    // softmax = [e, e^2, e^3] / (e + e^2 + e^3)
    //         = [0.09003057317038046, 0.24472847105479764, 0.6652409557748218]
    let z = array![[1.0, 2.0, 3.0]];
    let out = cross_entropy(&z, &[2]);
    let expected = (1.0f64.exp() + 2.0f64.exp() + 3.0f64.exp()).ln() - 3.0;
    assert!((out.value - expected).abs() < 1e-15);
    assert!((out.value - 0.40760596444438013).abs() < 1e-15);
    assert_close(
        "CE grad",
        &out.grad,
        &array![[
            0.09003057317038046,
            0.24472847105479764,
            0.6652409557748218 - 1.0
        ]],
        1e-15,
    );
    // Mean over the batch: a second row of equal logits with label 0 adds
    // log 3, and every gradient row is divided by N = 2.
    let z2 = array![[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]];
    let out2 = cross_entropy(&z2, &[2, 0]);
    assert!((out2.value - (0.40760596444438013 + 3.0f64.ln()) / 2.0).abs() < 1e-15);
    assert_close(
        "CE grad batch row 1",
        &out2.grad.row(1).to_owned(),
        &array![(1.0 / 3.0 - 1.0) / 2.0, 1.0 / 6.0, 1.0 / 6.0],
        1e-15,
    );
}

#[test]
fn softmax_family_known_values_and_stability() {
    let s = softmax(&array![[1.0, 2.0, 3.0]]);
    assert_close(
        "softmax",
        &s,
        &array![[0.09003057317038046, 0.24472847105479764, 0.6652409557748218]],
        1e-15,
    );
    // Huge logits do not overflow.
    let ls = log_softmax(&array![[1000.0, 1000.0], [-1000.0, 0.0]]);
    let ln2 = 2.0f64.ln();
    assert_close(
        "log_softmax stable",
        &ls,
        &array![[-ln2, -ln2], [-1000.0, 0.0]],
        1e-12,
    );
}

#[test]
fn cw_loss_known_values_with_tie_rule() {
    // kappa = 0.5, 3 samples:
    //  [2, 5, 1], y = 1: max other = 2 (index 0); m = 5 - 2 + 0.5 = 3.5 -> -3.5
    //  [4, 1, 4], y = 1: max other = 4 (tie 0/2); m = 1 - 4 + 0.5 < 0   -> 0
    //  [3, 3, 7], y = 2: max other = 3, tie of indices 0 and 1, first (0) wins;
    //                    m = 7 - 3 + 0.5 = 4.5                         -> -4.5
    // L = (-3.5 + 0 - 4.5) / 3 = -8/3.
    let z = array![[2.0, 5.0, 1.0], [4.0, 1.0, 4.0], [3.0, 3.0, 7.0]];
    let out = cw_loss(&z, &[1, 1, 2], 0.5);
    assert!(
        (out.value - (-8.0 / 3.0)).abs() < 1e-15,
        "value {}",
        out.value
    );
    let t = 1.0 / 3.0;
    let expected = array![[t, -t, 0.0], [0.0, 0.0, 0.0], [t, 0.0, -t]];
    assert_close("cw grad", &out.grad, &expected, 1e-15);
}

#[test]
fn cw_loss_at_the_kink_has_zero_gradient() {
    // m = 1.5 - 2 + 0.5 = 0 exactly: value 0, gradient 0 (ReLU tests m > 0).
    let out = cw_loss(&array![[2.0, 1.5, 0.0]], &[1], 0.5);
    assert_eq!(out.value, 0.0);
    assert_eq!(out.grad, array![[0.0, 0.0, 0.0]]);
}

#[test]
fn mse_loss_known_value() {
    // diffs [1, 0, -2, 0] -> (1 + 0 + 4 + 0) / 4 = 1.25; grad 2 d / 4.
    let out = mse_loss(&array![1.0, 2.0, 3.0, 4.0], &array![0.0, 2.0, 5.0, 4.0]);
    assert_eq!(out.value, 1.25);
    assert_eq!(out.grad, array![0.5, 0.0, -1.0, 0.0]);
}

#[test]
fn log_mean_softmax_known_values() {
    // softmax([0, 0]) = [0.5, 0.5], softmax([ln 3, 0]) = [0.75, 0.25];
    // mean = [0.625, 0.375]; log = [-0.4700036292457356, -0.9808292530117262].
    let members = vec![array![[0.0, 0.0]], array![[3.0f64.ln(), 0.0]]];
    let out = log_mean_softmax(&members, ENSEMBLE_PROB_FLOOR);
    assert_close(
        "log mean softmax",
        &out,
        &array![[-0.4700036292457356, -0.9808292530117262]],
        1e-15,
    );
    // One member: plain log-softmax.
    let single = vec![array![[1.0, 2.0, 3.0]]];
    assert_close(
        "single member",
        &log_mean_softmax(&single, 0.0),
        &log_softmax(&single[0]),
        1e-15,
    );
}

#[test]
fn log_mean_softmax_clamp_blocks_the_gradient() {
    // p = softmax([0, -200]) = [~1, e^-200 ~ 1.4e-87]; with the 1e-40 floor
    // the second output is log(1e-40) and passes no gradient.
    let members = vec![array![[0.0, -200.0]]];
    let out = log_mean_softmax(&members, ENSEMBLE_PROB_FLOOR);
    assert!((out[[0, 1]] - 1e-40f64.ln()).abs() < 1e-12);
    assert!(out[[0, 0]].abs() < 1e-15);
    let g = array![[0.0, 1.0]];
    let grads = log_mean_softmax_backward(&members, ENSEMBLE_PROB_FLOOR, &g);
    assert_eq!(grads[0], array![[0.0, 0.0]]);
    // Without the floor: out = z - logsumexp(z), so d out[1] / dz = [-s0, 1 - s1] ~ [-1, 1].
    let unclamped = log_mean_softmax(&members, 0.0);
    assert!((unclamped[[0, 1]] + 200.0).abs() < 1e-12);
    let grads = log_mean_softmax_backward(&members, 0.0, &g);
    assert_close("unclamped grad", &grads[0], &array![[-1.0, 1.0]], 1e-12);
}

#[test]
#[should_panic(expected = "label 3 of sample 0 is out of range")]
fn cross_entropy_rejects_out_of_range_label() {
    cross_entropy(&array![[1.0, 2.0, 3.0]], &[3]);
}

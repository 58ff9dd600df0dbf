//! DVERGE's masked C&W loss (`cw-dverge`, `loss::cw_dverge_loss`): hand-computed answers,
//! including the masked-0 case that makes it differ from the correct margin (`cw_loss`), and
//! a central finite-difference check away from its kinks.

mod common;

use common::{assert_close, assert_grad, rng, uniform};
use eio_reference::loss::{cw_dverge_loss, cw_loss};
use ndarray::{array, Array2};

#[test]
fn a_positive_best_wrong_logit_gives_the_correct_margin() {
    // y = 0, v = (0, 1, −1): o = 1, m = 2 − 1 + 0.1 = 1.1 > 0, L = −1.1;
    // dL/dz_y = −1, dL/dz_o = +1.
    let z = array![[2.0, 1.0, -1.0]];
    let out = cw_dverge_loss(&z, &[0], 0.1);
    assert!((out.value + 1.1).abs() < 1e-15, "{}", out.value);
    assert_close("grad", &out.grad, &array![[-1.0, 1.0, 0.0]], 0.0);
    // With a positive wrong logit it agrees with the correct margin.
    let correct = cw_loss(&z, &[0], 0.1);
    assert_eq!(out.value, correct.value);
    assert_eq!(out.grad, correct.grad);
}

#[test]
fn the_masked_zero_wins_over_negative_logits() {
    // Log-probabilities (all ≤ 0), y = 0: v = (0, −3.5, −4.0), the masked 0 is the maximum, so
    // o = y and m = −0.05 − 0 + 0.1 = 0.05: L = −0.05, and the gradient only lowers z_y.
    let z = array![[-0.05, -3.5, -4.0]];
    let out = cw_dverge_loss(&z, &[0], 0.1);
    assert!((out.value + 0.05).abs() < 1e-15, "{}", out.value);
    assert_close("grad", &out.grad, &array![[-1.0, 0.0, 0.0]], 0.0);
    // The correct margin uses max_{k≠y} z_k = −3.5: m = −0.05 + 3.5 + 0.1 = 3.55.
    let correct = cw_loss(&z, &[0], 0.1);
    assert!((correct.value + 3.55).abs() < 1e-15, "{}", correct.value);
    assert_close(
        "correct grad",
        &correct.grad,
        &array![[-1.0, 1.0, 0.0]],
        0.0,
    );
}

#[test]
fn the_masked_form_stalls_once_z_y_is_below_minus_kappa() {
    // v = (0, −2, −3), m = −0.2 + 0.1 = −0.1 ≤ 0: no loss, no gradient (the attack on an
    // ensemble's log-probabilities stops at p_y < e^−0.1), while the correct margin
    // −0.2 + 2 + 0.1 = 1.9 still pushes.
    let z = array![[-0.2, -2.0, -3.0]];
    let out = cw_dverge_loss(&z, &[0], 0.1);
    assert_eq!(out.value, 0.0);
    assert_eq!(out.grad, Array2::<f64>::zeros((1, 3)));
    assert!((cw_loss(&z, &[0], 0.1).value + 1.9).abs() < 1e-15);
}

#[test]
fn batch_mean_and_the_first_maximum() {
    // Sample 0: y = 2, v = (0.3, −1, 0): o = 0, m = 2 − 0.3 + 0.1 = 1.8.
    // Sample 1: y = 2, v = (1, 1, 0): the first maximum o = 0, m = 0.5 − 1 + 0.1 = −0.4 → 0.
    // Sample 2: y = 1, v = (−1, 0, −2): o = y (the mask), m = 0.25 + 0.1 = 0.35.
    // L = −(1.8 + 0.35)/3; gradients divided by N = 3.
    let z = array![[0.3, -1.0, 2.0], [1.0, 1.0, 0.5], [-1.0, 0.25, -2.0]];
    let out = cw_dverge_loss(&z, &[2, 2, 1], 0.1);
    assert!(
        (out.value + 2.15 / 3.0).abs() < 1e-15,
        "{} vs {}",
        out.value,
        -2.15 / 3.0
    );
    let third = 1.0 / 3.0;
    let expected = array![[third, 0.0, -third], [0.0, 0.0, 0.0], [0.0, -third, 0.0]];
    assert_close("grad", &out.grad, &expected, 1e-16);
}

#[test]
fn gradient_matches_finite_differences_away_from_kinks() {
    // Half the samples all-negative (the masked 0 is the best "wrong" logit and z_y ∈ (−0.1, 0)
    // keeps the margin positive), half with positive wrong logits; every margin and every gap
    // between the two largest entries of v far from 0 compared with the step.
    let mut r = rng(77);
    let mut z: Array2<f64> = uniform(&mut r, (6, 5), -4.0, -1.0);
    let labels = [0, 1, 2, 3, 4, 0];
    for (n, &y) in labels.iter().enumerate().take(3) {
        z[[n, y]] = -0.05 + 0.01 * n as f64;
    }
    for (n, &y) in labels.iter().enumerate().skip(3) {
        z[[n, (y + 1) % 5]] = 1.0 + 0.5 * n as f64;
        z[[n, y]] = 2.5 + 0.5 * n as f64;
    }
    let out = cw_dverge_loss(&z, &labels, 0.1);
    // Every margin is positive, so every sample contributes.
    assert_eq!(out.grad.iter().filter(|&&g| g != 0.0).count(), 3 + 2 * 3);
    assert_grad(
        "cw_dverge_loss",
        |z| cw_dverge_loss(z, &labels, 0.1).value,
        &z,
        &out.grad,
    );
}

//! Seeded random tensors and a gradient-check shorthand shared by the tests.
#![allow(dead_code)]

use eio_reference::grad_check::{check_gradient, GradCheckConfig};
use ndarray::{Array, Array1, Array2, Array4, Dimension, ShapeBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The relative-error tolerance of every finite-difference check.
pub const TOL: f64 = 1e-6;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform in `[lo, hi)`, any shape.
pub fn uniform<D: Dimension, Sh: ShapeBuilder<Dim = D>>(
    rng: &mut ChaCha8Rng,
    shape: Sh,
    lo: f64,
    hi: f64,
) -> Array<f64, D> {
    Array::from_shape_fn(shape, |_| rng.random_range(lo..hi))
}

/// Magnitude uniform in `[lo, hi)` with a random sign: keeps values away
/// from 0 (the kinks of ReLU-like functions).
pub fn away_from_zero<D: Dimension, Sh: ShapeBuilder<Dim = D>>(
    rng: &mut ChaCha8Rng,
    shape: Sh,
    lo: f64,
    hi: f64,
) -> Array<f64, D> {
    Array::from_shape_fn(shape, |_| {
        let m = rng.random_range(lo..hi);
        if rng.random_bool(0.5) {
            m
        } else {
            -m
        }
    })
}

pub fn uniform4(rng: &mut ChaCha8Rng, shape: (usize, usize, usize, usize)) -> Array4<f64> {
    uniform(rng, shape, -1.0, 1.0)
}

pub fn uniform2(rng: &mut ChaCha8Rng, shape: (usize, usize)) -> Array2<f64> {
    uniform(rng, shape, -1.0, 1.0)
}

pub fn uniform1(rng: &mut ChaCha8Rng, len: usize) -> Array1<f64> {
    uniform(rng, len, -1.0, 1.0)
}

/// Central finite-difference check of `analytic` = d f / d x, relative error
/// below [`TOL`] (default step 1e-6, floor 1e-8).
pub fn assert_grad<D: Dimension, F: FnMut(&Array<f64, D>) -> f64>(
    what: &str,
    f: F,
    x: &Array<f64, D>,
    analytic: &Array<f64, D>,
) {
    let report = check_gradient(f, x, analytic, GradCheckConfig::default());
    // Visible with `cargo test -- --nocapture`: the margin below TOL.
    eprintln!("{what}: max relative error {:e}", report.max_relative_error);
    report.assert_below(TOL, what);
}

/// Elementwise `|a - b| <= tol`, with a message naming the first offender.
pub fn assert_close<D: Dimension>(
    what: &str,
    actual: &Array<f64, D>,
    expected: &Array<f64, D>,
    tol: f64,
) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shape mismatch");
    for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
        assert!(
            (a - e).abs() <= tol,
            "{what}: element {i} is {a}, expected {e} (tolerance {tol})"
        );
    }
}

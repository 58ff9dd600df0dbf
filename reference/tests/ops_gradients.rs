//! Central finite-difference checks of every op's backward pass.
//!
//! Each tensor-valued op `y = g(x, theta)` is reduced to the scalar
//! `f = sum(w * y)` with fixed random weights `w`; its analytic gradient is
//! the op's backward applied to the upstream gradient `w`.

mod common;

use common::{assert_grad, away_from_zero, rng, uniform, uniform1, uniform2, uniform4};
use eio_reference::grad_check::weighted_sum;
use eio_reference::ops::{
    batch_norm2d, batch_norm2d_backward, conv2d, conv2d_backward, global_avg_pool,
    global_avg_pool_backward, leaky_relu, leaky_relu_backward, linear, linear_backward,
    max_pool2x2, max_pool2x2_backward, normalize, normalize_backward, relu, relu_backward,
    residual_add, residual_add_backward, BnMode, BnRunningStats, BN_EPS, BN_MOMENTUM,
};
use ndarray::{Array1, Array4};

#[test]
fn conv2d_gradients() {
    // (kernel h, kernel w, stride, padding, input h, input w)
    let cases = [
        (3, 3, 1, 0, 5, 5),
        (3, 3, 1, 1, 5, 5),
        (3, 3, 2, 1, 5, 6),
        (3, 3, 2, 0, 6, 5),
        (1, 1, 1, 0, 4, 4),
        (1, 1, 2, 0, 5, 4),
        (2, 3, 2, 1, 4, 5),
    ];
    for (case, &(kh, kw, stride, padding, h, w)) in cases.iter().enumerate() {
        let mut r = rng(100 + case as u64);
        let x = uniform4(&mut r, (2, 3, h, w));
        let weight = uniform4(&mut r, (2, 3, kh, kw));
        let y = conv2d(&x, &weight, stride, padding);
        let g = uniform4(&mut r, y.dim());
        let grads = conv2d_backward(&x, &weight, &g, stride, padding);
        let label = format!("conv2d k{kh}x{kw} s{stride} p{padding}");
        assert_grad(
            &format!("{label} input"),
            |x| weighted_sum(&conv2d(x, &weight, stride, padding), &g),
            &x,
            &grads.input,
        );
        assert_grad(
            &format!("{label} weight"),
            |w| weighted_sum(&conv2d(&x, w, stride, padding), &g),
            &weight,
            &grads.weight,
        );
    }
}

fn bn_case(
    seed: u64,
) -> (
    Array4<f64>,
    Array1<f64>,
    Array1<f64>,
    BnRunningStats,
    Array4<f64>,
) {
    let mut r = rng(seed);
    let x = uniform(&mut r, (3, 2, 3, 2), -2.0, 2.0);
    let gamma = uniform(&mut r, 2, 0.5, 1.5);
    let beta = uniform1(&mut r, 2);
    let running = BnRunningStats {
        running_mean: uniform1(&mut r, 2),
        running_var: uniform(&mut r, 2, 0.5, 2.0),
        num_batches_tracked: 7,
    };
    let g = uniform4(&mut r, x.dim());
    (x, gamma, beta, running, g)
}

#[test]
fn batch_norm2d_gradients_both_modes() {
    for (mode, seed) in [(BnMode::Train, 200), (BnMode::Eval, 201)] {
        let (x, gamma, beta, running, g) = bn_case(seed);
        let forward = |x: &Array4<f64>, gamma: &Array1<f64>, beta: &Array1<f64>| {
            let out = batch_norm2d(x, gamma, beta, &running, mode, BN_EPS, BN_MOMENTUM);
            weighted_sum(&out.output, &g)
        };
        let grads = batch_norm2d_backward(&x, &gamma, &running, mode, BN_EPS, &g);
        assert_grad(
            &format!("batch_norm2d {mode:?} input"),
            |x| forward(x, &gamma, &beta),
            &x,
            &grads.input,
        );
        assert_grad(
            &format!("batch_norm2d {mode:?} gamma"),
            |gm| forward(&x, gm, &beta),
            &gamma,
            &grads.gamma,
        );
        assert_grad(
            &format!("batch_norm2d {mode:?} beta"),
            |b| forward(&x, &gamma, b),
            &beta,
            &grads.beta,
        );
    }
}

#[test]
fn batch_norm2d_train_input_gradient_sums_to_zero_per_channel() {
    // Shifting a whole channel does not change its train-mode output, so the
    // input gradient of each channel sums to zero.
    let (x, gamma, _, running, g) = bn_case(202);
    let grads = batch_norm2d_backward(&x, &gamma, &running, BnMode::Train, BN_EPS, &g);
    for c in 0..2 {
        let s: f64 = grads.input.index_axis(ndarray::Axis(1), c).sum();
        assert!(s.abs() < 1e-12, "channel {c} input gradient sums to {s}");
    }
}

#[test]
fn relu_and_leaky_relu_gradients() {
    let mut r = rng(300);
    let x = away_from_zero(&mut r, (2, 3, 3, 3), 0.05, 1.0);
    let g = uniform4(&mut r, x.dim());
    assert_grad(
        "relu",
        |x| weighted_sum(&relu(x), &g),
        &x,
        &relu_backward(&x, &g),
    );
    for slope in [0.1, 0.01] {
        assert_grad(
            &format!("leaky_relu {slope}"),
            |x| weighted_sum(&leaky_relu(x, slope), &g),
            &x,
            &leaky_relu_backward(&x, slope, &g),
        );
    }
    // Rank 2 as well.
    let x2 = away_from_zero(&mut r, (3, 4), 0.05, 1.0);
    let g2 = uniform2(&mut r, (3, 4));
    assert_grad(
        "relu rank 2",
        |x| weighted_sum(&relu(x), &g2),
        &x2,
        &relu_backward(&x2, &g2),
    );
}

#[test]
fn residual_add_gradients() {
    let mut r = rng(400);
    let a = uniform4(&mut r, (2, 2, 3, 3));
    let b = uniform4(&mut r, (2, 2, 3, 3));
    let g = uniform4(&mut r, a.dim());
    let grads = residual_add_backward(&g);
    assert_grad(
        "residual_add lhs",
        |a| weighted_sum(&residual_add(a, &b), &g),
        &a,
        &grads.lhs,
    );
    assert_grad(
        "residual_add rhs",
        |b| weighted_sum(&residual_add(&a, b), &g),
        &b,
        &grads.rhs,
    );
}

#[test]
fn max_pool2x2_gradients() {
    let mut r = rng(500);
    // Odd width: the last column is dropped and must get zero gradient.
    let x = uniform4(&mut r, (2, 2, 4, 5));
    // No near-ties: the finite-difference step must not change any argmax.
    for window in x.exact_chunks((1, 1, 2, 2)) {
        let mut v: Vec<f64> = window.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        assert!(v[3] - v[2] > 1e-4, "seeded input has a near-tie: {v:?}");
    }
    let y = max_pool2x2(&x);
    let g = uniform4(&mut r, y.dim());
    let grad = max_pool2x2_backward(&x, &g);
    assert_grad(
        "max_pool2x2",
        |x| weighted_sum(&max_pool2x2(x), &g),
        &x,
        &grad,
    );
    for n in 0..2 {
        for c in 0..2 {
            for i in 0..4 {
                assert_eq!(grad[[n, c, i, 4]], 0.0, "dropped column got a gradient");
            }
        }
    }
}

#[test]
fn global_avg_pool_gradients() {
    let mut r = rng(600);
    let x = uniform4(&mut r, (2, 3, 3, 4));
    let g = uniform2(&mut r, (2, 3));
    assert_grad(
        "global_avg_pool",
        |x| weighted_sum(&global_avg_pool(x), &g),
        &x,
        &global_avg_pool_backward(x.dim(), &g),
    );
}

#[test]
fn linear_gradients() {
    let mut r = rng(700);
    let x = uniform2(&mut r, (3, 5));
    let w = uniform2(&mut r, (4, 5));
    let b = uniform1(&mut r, 4);
    let g = uniform2(&mut r, (3, 4));
    let grads = linear_backward(&x, &w, &g);
    assert_grad(
        "linear input",
        |x| weighted_sum(&linear(x, &w, &b), &g),
        &x,
        &grads.input,
    );
    assert_grad(
        "linear weight",
        |w| weighted_sum(&linear(&x, w, &b), &g),
        &w,
        &grads.weight,
    );
    assert_grad(
        "linear bias",
        |b| weighted_sum(&linear(&x, &w, b), &g),
        &b,
        &grads.bias,
    );
}

#[test]
fn normalize_gradients() {
    let mut r = rng(800);
    let x = uniform(&mut r, (2, 3, 3, 3), 0.0, 1.0);
    let mean = Array1::from(vec![0.4914, 0.4822, 0.4465]);
    let std = Array1::from(vec![0.2470, 0.2435, 0.2616]);
    let g = uniform4(&mut r, x.dim());
    assert_grad(
        "normalize",
        |x| weighted_sum(&normalize(x, &mean, &std), &g),
        &x,
        &normalize_backward(&std, &g),
    );
}

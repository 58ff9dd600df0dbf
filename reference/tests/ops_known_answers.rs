//! Hand-computed answers for small integer inputs.

mod common;

use common::assert_close;
use eio_reference::ops::{
    batch_norm2d, batch_norm2d_backward, conv2d, conv2d_backward, conv2d_output_size,
    global_avg_pool, global_avg_pool_backward, leaky_relu, leaky_relu_backward, linear,
    linear_backward, max_pool2x2, max_pool2x2_backward, normalize, normalize_backward, relu,
    relu_backward, residual_add, residual_add_backward, BnMode, BnRunningStats, BN_EPS,
    BN_MOMENTUM,
};
use ndarray::{array, Array2, Array4};

/// The 4x4 image
/// ```text
/// 1 2 0 1
/// 3 1 2 0
/// 0 1 3 2
/// 2 0 1 1
/// ```
fn image() -> Array4<f64> {
    array![[[
        [1.0, 2.0, 0.0, 1.0],
        [3.0, 1.0, 2.0, 0.0],
        [0.0, 1.0, 3.0, 2.0],
        [2.0, 0.0, 1.0, 1.0]
    ]]]
}

/// The 3x3 kernel (not symmetric, so a flipped or transposed kernel gives
/// different answers)
/// ```text
/// 1  0 -1
/// 2  1  0
/// 0 -1  1
/// ```
fn kernel() -> Array4<f64> {
    array![[[[1.0, 0.0, -1.0], [2.0, 1.0, 0.0], [0.0, -1.0, 1.0]]]]
}

#[test]
fn conv2d_3x3_on_4x4_no_padding() {
    // y[0,0] = 1*1 + 0*2 - 1*0 + 2*3 + 1*1 + 0*2 + 0*0 - 1*1 + 1*3 = 10
    // y[0,1] = 1*2 + 0*0 - 1*1 + 2*1 + 1*2 + 0*0 + 0*1 - 1*3 + 1*2 = 4
    // y[1,0] = 1*3 + 0*1 - 1*2 + 2*0 + 1*1 + 0*3 + 0*2 - 1*0 + 1*1 = 3
    // y[1,1] = 1*1 + 0*2 - 1*0 + 2*1 + 1*3 + 0*2 + 0*0 - 1*1 + 1*1 = 6
    let y = conv2d(&image(), &kernel(), 1, 0);
    assert_eq!(y, array![[[[10.0, 4.0], [3.0, 6.0]]]]);
    // Stride 2 without padding: only the top-left window fits.
    assert_eq!(conv2d(&image(), &kernel(), 2, 0), array![[[[10.0]]]]);
}

#[test]
fn conv2d_3x3_on_4x4_padding_1() {
    // Same-size output. E.g. the corner y[0,0] sees the zero-padded window
    //   0 0 0 / 0 1 2 / 0 3 1  ->  2*0 + 1*1 + 0*2 + 0*0 - 1*3 + 1*1 = -1
    // and y[3,3] sees  3 2 0 / 1 1 0 / 0 0 0  ->  1*3 - 1*0 + 2*1 + 1*1 = 6.
    let y = conv2d(&image(), &kernel(), 1, 1);
    let expected = array![[[
        [-1.0, 5.0, 2.0, 1.0],
        [2.0, 10.0, 4.0, 2.0],
        [-3.0, 3.0, 6.0, 9.0],
        [1.0, 1.0, 0.0, 6.0]
    ]]];
    assert_eq!(y, expected);
}

#[test]
fn conv2d_3x3_on_4x4_padding_1_stride_2() {
    // Output 2x2 = rows/columns 0 and 2 of the stride-1 padded output.
    let y = conv2d(&image(), &kernel(), 2, 1);
    assert_eq!(y, array![[[[-1.0, 2.0], [-3.0, 6.0]]]]);
}

#[test]
fn conv2d_output_sizes_follow_pytorch() {
    assert_eq!(conv2d_output_size(32, 3, 1, 1), 32);
    assert_eq!(conv2d_output_size(32, 3, 2, 1), 16);
    assert_eq!(conv2d_output_size(32, 1, 2, 0), 16);
    assert_eq!(conv2d_output_size(5, 3, 2, 0), 2);
    assert_eq!(conv2d_output_size(4, 3, 2, 1), 2);
}

#[test]
fn conv2d_mixes_channels_as_out_in() {
    // 1x1 kernels: y[o] = sum_c W[o, c] * x[c]. W = [[1, 10], [100, 0]]
    // distinguishes W[o, c] from W[c, o].
    let x = array![[[[1.0, 2.0]], [[3.0, 4.0]]]]; // [1, 2, 1, 2]
    let w = array![[[[1.0]], [[10.0]]], [[[100.0]], [[0.0]]]]; // [2, 2, 1, 1]
    let y = conv2d(&x, &w, 1, 0);
    assert_eq!(y, array![[[[31.0, 42.0]], [[100.0, 200.0]]]]);
}

#[test]
fn conv2d_backward_hand_case() {
    // Valid 3x3 conv of the 4x4 image with upstream gradient of ones on the
    // 2x2 output: dL/dW[u, v] = sum of the image's 2x2 block at (u, v),
    // dL/dx[r, q] = sum of the kernel entries that touch (r, q).
    let g = Array4::<f64>::ones((1, 1, 2, 2));
    let grads = conv2d_backward(&image(), &kernel(), &g, 1, 0);
    // Block sums: (0,0) 1+2+3+1 = 7, (0,1) 2+0+1+2 = 5, (0,2) 0+1+2+0 = 3,
    // (1,0) 3+1+0+1 = 5, (1,1) 1+2+1+3 = 7, (1,2) 2+0+3+2 = 7,
    // (2,0) 0+1+2+0 = 3, (2,1) 1+3+0+1 = 5, (2,2) 3+2+1+1 = 7.
    assert_eq!(
        grads.weight,
        array![[[[7.0, 5.0, 3.0], [5.0, 7.0, 7.0], [3.0, 5.0, 7.0]]]]
    );
    // dL/dx[r, q] = sum of W[r - i, q - j] over output positions (i, j) in
    // {0, 1}^2 with valid kernel indices. Corner (0,0): W[0,0] = 1;
    // (0,1): W[0,0] + W[0,1] = 1; (1,1): W[0..2, 0..2] = 1 + 0 + 2 + 1 = 4;
    // (2,2): W[1..3, 1..3] = 1 + 0 - 1 + 1 = 1; (2,3): W[1,2] + W[2,2] = 1;
    // (3,3): W[2,2] = 1.
    let expected_input = array![[[
        [1.0, 1.0, -1.0, -1.0],
        [3.0, 4.0, 0.0, -1.0],
        [2.0, 2.0, 1.0, 1.0],
        [0.0, -1.0, 0.0, 1.0]
    ]]];
    assert_eq!(grads.input, expected_input);
}

/// Two channels over a batch of 2 of 2x2 maps:
/// channel 0 holds 1..=8 (mean 4.5, biased var 5.25, unbiased var 6),
/// channel 1 holds four 0s and four 2s (mean 1, biased var 1, unbiased 8/7).
fn bn_input() -> Array4<f64> {
    array![
        [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]],
        [[[5.0, 6.0], [7.0, 8.0]], [[2.0, 2.0], [2.0, 2.0]]]
    ]
}

#[test]
fn batch_norm2d_train_statistics_and_running_update() {
    let x = bn_input();
    let gamma = array![2.0, 1.0];
    let beta = array![0.5, -1.0];
    let running0 = BnRunningStats::new(2);
    assert_eq!(running0.running_mean, array![0.0, 0.0]);
    assert_eq!(running0.running_var, array![1.0, 1.0]);
    let out = batch_norm2d(
        &x,
        &gamma,
        &beta,
        &running0,
        BnMode::Train,
        BN_EPS,
        BN_MOMENTUM,
    );
    // Normalising statistics: the biased variance.
    assert_close("batch mean", &out.mean, &array![4.5, 1.0], 1e-15);
    assert_close("batch var (biased)", &out.var, &array![5.25, 1.0], 1e-15);
    // running_mean = 0.9 * 0 + 0.1 * mean        = [0.45, 0.1]
    // running_var  = 0.9 * 1 + 0.1 * unbiased var = [0.9 + 0.6, 0.9 + 0.8/7]
    assert_close(
        "running_mean",
        &out.running.running_mean,
        &array![0.45, 0.1],
        1e-15,
    );
    assert_close(
        "running_var (unbiased)",
        &out.running.running_var,
        &array![1.5, 1.0142857142857142],
        1e-15,
    );
    assert_eq!(out.running.num_batches_tracked, 1);
    // The input statistics are not modified (the function is pure).
    assert_eq!(running0, BnRunningStats::new(2));
    // y = gamma * (x - mean) / sqrt(var + eps) + beta.
    let s0 = (5.25f64 + 1e-5).sqrt();
    let s1 = (1.0f64 + 1e-5).sqrt();
    assert!((out.output[[0, 0, 0, 0]] - (2.0 * -3.5 / s0 + 0.5)).abs() < 1e-14);
    assert!((out.output[[1, 0, 1, 1]] - (2.0 * 3.5 / s0 + 0.5)).abs() < 1e-14);
    assert!((out.output[[0, 1, 0, 1]] - (-1.0 / s1 - 1.0)).abs() < 1e-14);
    assert!((out.output[[1, 1, 1, 0]] - (1.0 / s1 - 1.0)).abs() < 1e-14);

    // A second train step on the same batch:
    // running_mean = 0.9 * [0.45, 0.1] + 0.1 * [4.5, 1]   = [0.855, 0.19]
    // running_var  = 0.9 * [1.5, 1.0142857] + 0.1 * [6, 8/7] = [1.95, 1.0271428571428571]
    let out2 = batch_norm2d(
        &x,
        &gamma,
        &beta,
        &out.running,
        BnMode::Train,
        BN_EPS,
        BN_MOMENTUM,
    );
    assert_close(
        "running_mean 2",
        &out2.running.running_mean,
        &array![0.855, 0.19],
        1e-15,
    );
    assert_close(
        "running_var 2",
        &out2.running.running_var,
        &array![1.95, 1.0271428571428571],
        1e-15,
    );
    assert_eq!(out2.running.num_batches_tracked, 2);
}

#[test]
fn batch_norm2d_eval_uses_running_statistics() {
    let x = bn_input();
    let gamma = array![2.0, 1.0];
    let beta = array![0.5, -1.0];
    let running = BnRunningStats {
        running_mean: array![0.855, 0.19],
        running_var: array![1.95, 1.0271428571428571],
        num_batches_tracked: 2,
    };
    let out = batch_norm2d(
        &x,
        &gamma,
        &beta,
        &running,
        BnMode::Eval,
        BN_EPS,
        BN_MOMENTUM,
    );
    assert_eq!(
        out.running, running,
        "eval must not update the running statistics"
    );
    let s0 = (1.95f64 + 1e-5).sqrt();
    let s1 = (1.0271428571428571f64 + 1e-5).sqrt();
    assert!((out.output[[0, 0, 0, 0]] - (2.0 * (1.0 - 0.855) / s0 + 0.5)).abs() < 1e-14);
    assert!((out.output[[1, 1, 0, 0]] - ((2.0 - 0.19) / s1 - 1.0)).abs() < 1e-14);
    // Eval backward: dL/dx = gamma / sqrt(running_var + eps) * g.
    let g = Array4::<f64>::ones(x.dim());
    let grads = batch_norm2d_backward(&x, &gamma, &running, BnMode::Eval, BN_EPS, &g);
    assert!((grads.input[[0, 0, 1, 0]] - 2.0 / s0).abs() < 1e-14);
    assert!((grads.input[[1, 1, 1, 0]] - 1.0 / s1).abs() < 1e-14);
    assert_close("eval dbeta", &grads.beta, &array![8.0, 8.0], 1e-14);
}

#[test]
fn batch_norm2d_train_backward_hand_case() {
    // With g = 1 everywhere: dbeta = M = 8, dgamma = sum x_hat = 0, and
    // dx = gamma/(M sigma) (M g - sum g - x_hat * 0) = 0.
    let x = bn_input();
    let gamma = array![2.0, 1.0];
    let g = Array4::<f64>::ones(x.dim());
    let grads = batch_norm2d_backward(
        &x,
        &gamma,
        &BnRunningStats::new(2),
        BnMode::Train,
        BN_EPS,
        &g,
    );
    assert_close("train dbeta", &grads.beta, &array![8.0, 8.0], 1e-14);
    assert_close("train dgamma", &grads.gamma, &array![0.0, 0.0], 1e-13);
    assert_close("train dx", &grads.input, &Array4::zeros(x.dim()), 1e-14);
    // With g = x_hat: dgamma = sum x_hat^2 = M var / (var + eps).
    let out = batch_norm2d(
        &x,
        &array![1.0, 1.0],
        &array![0.0, 0.0],
        &BnRunningStats::new(2),
        BnMode::Train,
        BN_EPS,
        BN_MOMENTUM,
    );
    let grads = batch_norm2d_backward(
        &x,
        &gamma,
        &BnRunningStats::new(2),
        BnMode::Train,
        BN_EPS,
        &out.output,
    );
    let expected = array![8.0 * 5.25 / (5.25 + 1e-5), 8.0 * 1.0 / (1.0 + 1e-5)];
    assert_close("train dgamma = sum x_hat^2", &grads.gamma, &expected, 1e-12);
}

#[test]
#[should_panic(expected = "more than 1 value per channel")]
fn batch_norm2d_train_rejects_single_value_per_channel() {
    let x = Array4::<f64>::ones((1, 1, 1, 1));
    batch_norm2d(
        &x,
        &array![1.0],
        &array![0.0],
        &BnRunningStats::new(1),
        BnMode::Train,
        BN_EPS,
        BN_MOMENTUM,
    );
}

#[test]
fn relu_and_leaky_relu_values_and_zero_convention() {
    let x = array![[-2.0, 0.0, 3.0]];
    let g = array![[10.0, 20.0, 30.0]];
    assert_eq!(relu(&x), array![[0.0, 0.0, 3.0]]);
    // Gradient at exactly 0 is 0 (PyTorch tests x > 0).
    assert_eq!(relu_backward(&x, &g), array![[0.0, 0.0, 30.0]]);
    assert_eq!(leaky_relu(&x, 0.1), array![[-0.2, 0.0, 3.0]]);
    // Leaky: slope * g at and below 0.
    assert_eq!(leaky_relu_backward(&x, 0.1, &g), array![[1.0, 2.0, 30.0]]);
}

#[test]
fn residual_add_values() {
    let a = array![[1.0, 2.0], [3.0, 4.0]];
    let b = array![[10.0, 20.0], [30.0, 40.0]];
    assert_eq!(residual_add(&a, &b), array![[11.0, 22.0], [33.0, 44.0]]);
    let grads = residual_add_backward(&array![[1.0, -1.0], [0.5, 2.0]]);
    assert_eq!(grads.lhs, array![[1.0, -1.0], [0.5, 2.0]]);
    assert_eq!(grads.rhs, grads.lhs);
}

#[test]
fn max_pool2x2_values_and_tie_rule() {
    // Window (0,0): 1 2 / 4 3 -> max 4 at (1,0).
    // Window (0,1): 5 5 / 5 5 -> all tied, the first (0,2) wins.
    // Window (1,0): 0 7 / 7 0 -> tie of 7s, the first in row-major (2,1) wins.
    // Window (1,1): -1 -2 / -3 -4 -> -1 at (2,2).
    let x = array![[[
        [1.0, 2.0, 5.0, 5.0],
        [4.0, 3.0, 5.0, 5.0],
        [0.0, 7.0, -1.0, -2.0],
        [7.0, 0.0, -3.0, -4.0]
    ]]];
    assert_eq!(max_pool2x2(&x), array![[[[4.0, 5.0], [7.0, -1.0]]]]);
    let g = array![[[[10.0, 20.0], [30.0, 40.0]]]];
    let expected = array![[[
        [0.0, 0.0, 20.0, 0.0],
        [10.0, 0.0, 0.0, 0.0],
        [0.0, 30.0, 40.0, 0.0],
        [0.0, 0.0, 0.0, 0.0]
    ]]];
    assert_eq!(max_pool2x2_backward(&x, &g), expected);
}

#[test]
fn max_pool2x2_odd_size_drops_last_row_and_column() {
    let x = Array4::from_shape_fn((1, 1, 3, 3), |(_, _, i, j)| (3 * i + j) as f64);
    // Only the top-left window: 0 1 / 3 4 -> 4.
    assert_eq!(max_pool2x2(&x), array![[[[4.0]]]]);
}

#[test]
fn global_avg_pool_values() {
    let x = array![[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, -1.0], [-1.0, 3.0]]]];
    assert_eq!(global_avg_pool(&x), array![[3.0, 0.0]]);
    let grad = global_avg_pool_backward(x.dim(), &array![[4.0, -8.0]]);
    assert_eq!(
        grad,
        array![[[[1.0, 1.0], [1.0, 1.0]], [[-2.0, -2.0], [-2.0, -2.0]]]]
    );
}

#[test]
fn linear_values() {
    // y = x W^T + b with x = [1, 2], W = [[1, 0], [2, -1], [0, 3]], b = [1, 2, 3].
    let x = array![[1.0, 2.0]];
    let w = array![[1.0, 0.0], [2.0, -1.0], [0.0, 3.0]];
    let b = array![1.0, 2.0, 3.0];
    assert_eq!(linear(&x, &w, &b), array![[2.0, 2.0, 9.0]]);
    let g = array![[1.0, 1.0, -1.0]];
    let grads = linear_backward(&x, &w, &g);
    // dx = g W = [1 + 2 + 0, 0 - 1 - 3]; dW = g^T x; db = g.
    assert_eq!(grads.input, array![[3.0, -4.0]]);
    assert_eq!(grads.weight, array![[1.0, 2.0], [1.0, 2.0], [-1.0, -2.0]]);
    assert_eq!(grads.bias, array![1.0, 1.0, -1.0]);
}

#[test]
fn normalize_values() {
    let x = array![[[[1.0, 0.0]], [[0.5, 0.25]]]];
    let mean = array![0.5, 0.25];
    let std = array![0.25, 0.5];
    assert_eq!(
        normalize(&x, &mean, &std),
        array![[[[2.0, -2.0]], [[0.5, 0.0]]]]
    );
    let grad = normalize_backward(&std, &array![[[[1.0, 1.0]], [[1.0, -1.0]]]]);
    assert_eq!(grad, array![[[[4.0, 4.0]], [[2.0, -2.0]]]]);
}

#[test]
#[should_panic(expected = "conv2d: input has 2 channels but weight")]
fn conv2d_rejects_channel_mismatch() {
    let x = Array4::<f64>::zeros((1, 2, 3, 3));
    let w = Array4::<f64>::zeros((1, 3, 3, 3));
    conv2d(&x, &w, 1, 0);
}

#[test]
#[should_panic(expected = "linear_backward: grad_output shape")]
fn linear_backward_rejects_bad_grad_shape() {
    let x = Array2::<f64>::zeros((2, 3));
    let w = Array2::<f64>::zeros((4, 3));
    linear_backward(&x, &w, &Array2::zeros((2, 5)));
}

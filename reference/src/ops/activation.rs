//! Elementwise activations: ReLU and LeakyReLU, for tensors of any rank.

use ndarray::{Array, Dimension, Zip};

fn check_same_shape<D: Dimension>(op: &str, input: &Array<f64, D>, grad_output: &Array<f64, D>) {
    assert_eq!(
        input.shape(),
        grad_output.shape(),
        "{op}: grad_output shape {:?} != input shape {:?}",
        grad_output.shape(),
        input.shape()
    );
}

/// ReLU, `y = max(x, 0)` elementwise (PyTorch `F.relu`).
pub fn relu<D: Dimension>(input: &Array<f64, D>) -> Array<f64, D> {
    input.mapv(|x| if x > 0.0 { x } else { 0.0 })
}

/// Backward of [`relu`]: `dL/dx = g` where `x > 0`, else `0`, with
/// `g = dL/dy` (`grad_output`). The gradient at exactly `x = 0` is `0`, as in
/// PyTorch (`threshold_backward` tests `x > 0`).
///
/// # Panics
///
/// If `input` and `grad_output` shapes differ.
pub fn relu_backward<D: Dimension>(
    input: &Array<f64, D>,
    grad_output: &Array<f64, D>,
) -> Array<f64, D> {
    check_same_shape("relu_backward", input, grad_output);
    let mut grad = Array::<f64, D>::zeros(input.raw_dim());
    Zip::from(&mut grad)
        .and(input)
        .and(grad_output)
        .for_each(|d, &x, &g| *d = if x > 0.0 { g } else { 0.0 });
    grad
}

/// LeakyReLU with negative slope `a` (PyTorch `F.leaky_relu(x, a)`, e.g.
/// `a = 0.1`): `y = x` where `x > 0`, else `a * x`.
pub fn leaky_relu<D: Dimension>(input: &Array<f64, D>, slope: f64) -> Array<f64, D> {
    input.mapv(|x| if x > 0.0 { x } else { slope * x })
}

/// Backward of [`leaky_relu`]: `dL/dx = g` where `x > 0`, else `a * g`, with
/// `g = dL/dy` (`grad_output`) and `a` the slope. At exactly `x = 0` the
/// gradient is `a * g`, as in PyTorch (`leaky_relu_backward` tests `x > 0`).
///
/// # Panics
///
/// If `input` and `grad_output` shapes differ.
pub fn leaky_relu_backward<D: Dimension>(
    input: &Array<f64, D>,
    slope: f64,
    grad_output: &Array<f64, D>,
) -> Array<f64, D> {
    check_same_shape("leaky_relu_backward", input, grad_output);
    let mut grad = Array::<f64, D>::zeros(input.raw_dim());
    Zip::from(&mut grad)
        .and(input)
        .and(grad_output)
        .for_each(|d, &x, &g| *d = if x > 0.0 { g } else { slope * g });
    grad
}

//! Fully connected layer (PyTorch `nn.Linear`).

use ndarray::{Array1, Array2};

fn check_shapes(input: &Array2<f64>, weight: &Array2<f64>) {
    let (_, f_in) = input.dim();
    let (_, w_in) = weight.dim();
    assert_eq!(
        f_in,
        w_in,
        "linear: input has {f_in} features but weight {:?} expects {w_in}",
        weight.shape()
    );
}

/// `y = x W^T + b` (PyTorch `F.linear(x, W, b)`):
///
/// ```text
/// y[n, o] = sum_k x[n, k] * W[o, k] + b[o]
/// ```
///
/// with `x` (`input`) `[N, in]`, `W` (`weight`) `[out, in]`, `b` (`bias`)
/// `[out]` and `y` `[N, out]`.
///
/// # Panics
///
/// If `input` and `weight` disagree on `in`, or `bias` does not have `out`
/// entries.
pub fn linear(input: &Array2<f64>, weight: &Array2<f64>, bias: &Array1<f64>) -> Array2<f64> {
    check_shapes(input, weight);
    let (batch, f_in) = input.dim();
    let (f_out, _) = weight.dim();
    assert_eq!(
        bias.len(),
        f_out,
        "linear: bias has {} entries but weight has {f_out} outputs",
        bias.len()
    );
    let mut out = Array2::<f64>::zeros((batch, f_out));
    for n in 0..batch {
        for o in 0..f_out {
            let mut acc = bias[o];
            for k in 0..f_in {
                acc += input[[n, k]] * weight[[o, k]];
            }
            out[[n, o]] = acc;
        }
    }
    out
}

/// The gradients of a loss `L` through [`linear`].
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGrads {
    /// `dL/dx`, shape `[N, in]`.
    pub input: Array2<f64>,
    /// `dL/dW`, shape `[out, in]`.
    pub weight: Array2<f64>,
    /// `dL/db`, shape `[out]`.
    pub bias: Array1<f64>,
}

/// Backward of [`linear`], with `g = dL/dy` (`grad_output`, `[N, out]`):
///
/// ```text
/// dL/dx[n, k] = sum_o g[n, o] * W[o, k]      (g W)
/// dL/dW[o, k] = sum_n g[n, o] * x[n, k]      (g^T x)
/// dL/db[o]    = sum_n g[n, o]
/// ```
///
/// # Panics
///
/// If `input` and `weight` disagree on `in`, or `grad_output` is not
/// `[N, out]`.
pub fn linear_backward(
    input: &Array2<f64>,
    weight: &Array2<f64>,
    grad_output: &Array2<f64>,
) -> LinearGrads {
    check_shapes(input, weight);
    let (batch, f_in) = input.dim();
    let (f_out, _) = weight.dim();
    assert_eq!(
        grad_output.dim(),
        (batch, f_out),
        "linear_backward: grad_output shape {:?} != output shape {:?}",
        grad_output.shape(),
        [batch, f_out]
    );
    let mut grad_input = Array2::<f64>::zeros((batch, f_in));
    let mut grad_weight = Array2::<f64>::zeros((f_out, f_in));
    let mut grad_bias = Array1::<f64>::zeros(f_out);
    for n in 0..batch {
        for o in 0..f_out {
            let g = grad_output[[n, o]];
            grad_bias[o] += g;
            for k in 0..f_in {
                grad_input[[n, k]] += g * weight[[o, k]];
                grad_weight[[o, k]] += g * input[[n, k]];
            }
        }
    }
    LinearGrads {
        input: grad_input,
        weight: grad_weight,
        bias: grad_bias,
    }
}

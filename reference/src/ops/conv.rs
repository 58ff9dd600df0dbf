//! 2-D convolution (cross-correlation, as in PyTorch's `nn.Conv2d`) with
//! stride, symmetric zero padding and no bias.

use ndarray::Array4;

/// The output length along one spatial axis:
/// `floor((size + 2 * padding - kernel) / stride) + 1`, as in PyTorch
/// (dilation 1).
///
/// # Panics
///
/// If `stride == 0`, `kernel == 0`, or `size + 2 * padding < kernel`.
pub fn conv2d_output_size(size: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    assert!(stride > 0, "conv2d: stride must be positive");
    assert!(kernel > 0, "conv2d: kernel size must be positive");
    assert!(
        size + 2 * padding >= kernel,
        "conv2d: padded input size {} (size {size} + 2 * padding {padding}) is smaller than kernel {kernel}",
        size + 2 * padding
    );
    (size + 2 * padding - kernel) / stride + 1
}

/// Checks the input/weight shapes and returns `(h_out, w_out)`.
fn check_shapes(
    input: &Array4<f64>,
    weight: &Array4<f64>,
    stride: usize,
    padding: usize,
) -> (usize, usize) {
    let (_, c_in, h, w) = input.dim();
    let (_, w_in, kh, kw) = weight.dim();
    assert_eq!(
        c_in,
        w_in,
        "conv2d: input has {c_in} channels but weight {:?} expects {w_in}",
        weight.shape()
    );
    (
        conv2d_output_size(h, kh, stride, padding),
        conv2d_output_size(w, kw, stride, padding),
    )
}

/// The padded-input value `x_pad[n, c, r, q]`, where `r` and `q` are
/// coordinates in the padded frame: the input at `(r - padding, q - padding)`,
/// or zero outside the input.
fn padded(input: &Array4<f64>, n: usize, c: usize, r: usize, q: usize, padding: usize) -> f64 {
    let (_, _, h, w) = input.dim();
    if r < padding || q < padding || r - padding >= h || q - padding >= w {
        0.0
    } else {
        input[[n, c, r - padding, q - padding]]
    }
}

/// Forward 2-D convolution, PyTorch `F.conv2d(x, weight, bias=None,
/// stride=s, padding=p)` with dilation 1 and groups 1:
///
/// ```text
/// y[n, o, i, j] = sum_{c, u, v} x_pad[n, c, i*s + u, j*s + v] * W[o, c, u, v]
/// ```
///
/// - `x` (`input`): `[N, C_in, H, W]`;
/// - `W` (`weight`): `[C_out, C_in, kh, kw]`;
/// - `x_pad`: `x` surrounded by `p` rows/columns of zeros on every side,
///   i.e. `x_pad[n, c, r, q] = x[n, c, r - p, q - p]` inside, `0` outside;
/// - `s` (`stride`), `p` (`padding`), `u in 0..kh`, `v in 0..kw`;
/// - `y`: `[N, C_out, H_out, W_out]` with
///   `H_out = floor((H + 2p - kh) / s) + 1` and likewise `W_out`.
///
/// # Panics
///
/// If the channel counts of input and weight differ, `stride == 0`, or the
/// padded input is smaller than the kernel.
pub fn conv2d(
    input: &Array4<f64>,
    weight: &Array4<f64>,
    stride: usize,
    padding: usize,
) -> Array4<f64> {
    let (h_out, w_out) = check_shapes(input, weight, stride, padding);
    let (batch, c_in, _, _) = input.dim();
    let (c_out, _, kh, kw) = weight.dim();
    let mut out = Array4::<f64>::zeros((batch, c_out, h_out, w_out));
    for n in 0..batch {
        for o in 0..c_out {
            for i in 0..h_out {
                for j in 0..w_out {
                    let mut acc = 0.0;
                    for c in 0..c_in {
                        for u in 0..kh {
                            for v in 0..kw {
                                acc += padded(input, n, c, i * stride + u, j * stride + v, padding)
                                    * weight[[o, c, u, v]];
                            }
                        }
                    }
                    out[[n, o, i, j]] = acc;
                }
            }
        }
    }
    out
}

/// The gradients of a loss `L` through [`conv2d`].
#[derive(Debug, Clone, PartialEq)]
pub struct Conv2dGrads {
    /// `dL/dx`, shape `[N, C_in, H, W]`.
    pub input: Array4<f64>,
    /// `dL/dW`, shape `[C_out, C_in, kh, kw]`.
    pub weight: Array4<f64>,
}

/// Backward of [`conv2d`]. With `g = dL/dy` (`grad_output`,
/// `[N, C_out, H_out, W_out]`) and the symbols of [`conv2d`]:
///
/// ```text
/// dL/dx[n, c, i*s + u - p, j*s + v - p] += g[n, o, i, j] * W[o, c, u, v]
/// dL/dW[o, c, u, v] = sum_{n, i, j} g[n, o, i, j] * x_pad[n, c, i*s + u, j*s + v]
/// ```
///
/// where the first sum runs over all `(n, o, i, j, u, v)` and terms whose
/// target falls in the zero padding are dropped.
///
/// # Panics
///
/// As [`conv2d`], and if `grad_output` is not `[N, C_out, H_out, W_out]`.
pub fn conv2d_backward(
    input: &Array4<f64>,
    weight: &Array4<f64>,
    grad_output: &Array4<f64>,
    stride: usize,
    padding: usize,
) -> Conv2dGrads {
    let (h_out, w_out) = check_shapes(input, weight, stride, padding);
    let (batch, c_in, h, w) = input.dim();
    let (c_out, _, kh, kw) = weight.dim();
    assert_eq!(
        grad_output.dim(),
        (batch, c_out, h_out, w_out),
        "conv2d_backward: grad_output shape {:?} != output shape {:?}",
        grad_output.shape(),
        [batch, c_out, h_out, w_out]
    );
    let mut grad_input = Array4::<f64>::zeros((batch, c_in, h, w));
    let mut grad_weight = Array4::<f64>::zeros((c_out, c_in, kh, kw));
    for n in 0..batch {
        for o in 0..c_out {
            for i in 0..h_out {
                for j in 0..w_out {
                    let g = grad_output[[n, o, i, j]];
                    for c in 0..c_in {
                        for u in 0..kh {
                            for v in 0..kw {
                                // Position in the padded frame, then in the input.
                                let r = i * stride + u;
                                let q = j * stride + v;
                                if r < padding
                                    || q < padding
                                    || r - padding >= h
                                    || q - padding >= w
                                {
                                    continue;
                                }
                                let (r, q) = (r - padding, q - padding);
                                grad_input[[n, c, r, q]] += g * weight[[o, c, u, v]];
                                grad_weight[[o, c, u, v]] += g * input[[n, c, r, q]];
                            }
                        }
                    }
                }
            }
        }
    }
    Conv2dGrads {
        input: grad_input,
        weight: grad_weight,
    }
}

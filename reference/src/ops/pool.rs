//! Pooling: 2x2 max pooling with stride 2 (VGG) and global average pooling
//! (ResNet head).

use ndarray::{Array2, Array4};

/// The row-major position `(di, dj)` (each 0 or 1) of the maximum of the 2x2
/// window whose top-left corner is `(2i, 2j)`.
///
/// Tie rule (PyTorch's CPU kernel): the window is scanned in row-major order
/// `(0,0), (0,1), (1,0), (1,1)` and the current choice is replaced only by a
/// strictly greater value or by a `NaN`, so among equal maxima the *first*
/// wins (and a `NaN` in the window is always selected).
fn window_argmax(input: &Array4<f64>, n: usize, c: usize, i: usize, j: usize) -> (usize, usize) {
    let mut best = (0, 0);
    let mut best_val = input[[n, c, 2 * i, 2 * j]];
    for (di, dj) in [(0, 1), (1, 0), (1, 1)] {
        let val = input[[n, c, 2 * i + di, 2 * j + dj]];
        if val > best_val || val.is_nan() {
            best = (di, dj);
            best_val = val;
        }
    }
    best
}

fn pooled_size(input: &Array4<f64>) -> (usize, usize) {
    let (_, _, h, w) = input.dim();
    assert!(
        h >= 2 && w >= 2,
        "max_pool2x2: spatial size {h}x{w} is smaller than the 2x2 window"
    );
    (h / 2, w / 2)
}

/// 2x2 max pooling with stride 2, no padding (PyTorch `nn.MaxPool2d(2, 2)`):
///
/// ```text
/// y[n, c, i, j] = max_{di, dj in {0, 1}} x[n, c, 2i + di, 2j + dj]
/// ```
///
/// for input `[N, C, H, W]` and output `[N, C, floor(H/2), floor(W/2)]`
/// (an odd last row/column is dropped, PyTorch's `ceil_mode=False`).
///
/// # Panics
///
/// If `H < 2` or `W < 2`.
pub fn max_pool2x2(input: &Array4<f64>) -> Array4<f64> {
    let (h_out, w_out) = pooled_size(input);
    let (batch, channels, _, _) = input.dim();
    let mut out = Array4::<f64>::zeros((batch, channels, h_out, w_out));
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..h_out {
                for j in 0..w_out {
                    let (di, dj) = window_argmax(input, n, c, i, j);
                    out[[n, c, i, j]] = input[[n, c, 2 * i + di, 2 * j + dj]];
                }
            }
        }
    }
    out
}

/// Backward of [`max_pool2x2`]: each upstream gradient `g[n, c, i, j]` is
/// routed to the single input element that was selected as the window's
/// maximum; all other elements get zero.
///
/// Tie rule: among equal maxima the *first* in row-major window order
/// `(0,0), (0,1), (1,0), (1,1)` receives the whole gradient (as PyTorch's CPU
/// kernel, whose argmax keeps the first strict maximum); a `NaN` in the
/// window is always selected.
///
/// # Panics
///
/// As [`max_pool2x2`], and if `grad_output` is not `[N, C, H/2, W/2]`.
pub fn max_pool2x2_backward(input: &Array4<f64>, grad_output: &Array4<f64>) -> Array4<f64> {
    let (h_out, w_out) = pooled_size(input);
    let (batch, channels, h, w) = input.dim();
    assert_eq!(
        grad_output.dim(),
        (batch, channels, h_out, w_out),
        "max_pool2x2_backward: grad_output shape {:?} != output shape {:?}",
        grad_output.shape(),
        [batch, channels, h_out, w_out]
    );
    let mut grad = Array4::<f64>::zeros((batch, channels, h, w));
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..h_out {
                for j in 0..w_out {
                    let (di, dj) = window_argmax(input, n, c, i, j);
                    grad[[n, c, 2 * i + di, 2 * j + dj]] += grad_output[[n, c, i, j]];
                }
            }
        }
    }
    grad
}

/// Global average pooling, NCHW `[N, C, H, W]` to `[N, C]` (PyTorch
/// `F.adaptive_avg_pool2d(x, 1).flatten(1)`, or `F.avg_pool2d` over the
/// whole map):
///
/// ```text
/// y[n, c] = (1 / (H * W)) * sum_{i, j} x[n, c, i, j]
/// ```
///
/// # Panics
///
/// If `H * W == 0`.
pub fn global_avg_pool(input: &Array4<f64>) -> Array2<f64> {
    let (batch, channels, h, w) = input.dim();
    assert!(h * w > 0, "global_avg_pool: empty spatial size {h}x{w}");
    let area = (h * w) as f64;
    let mut out = Array2::<f64>::zeros((batch, channels));
    for n in 0..batch {
        for c in 0..channels {
            let mut sum = 0.0;
            for i in 0..h {
                for j in 0..w {
                    sum += input[[n, c, i, j]];
                }
            }
            out[[n, c]] = sum / area;
        }
    }
    out
}

/// Backward of [`global_avg_pool`]: `dL/dx[n, c, i, j] = g[n, c] / (H * W)`
/// with `g = dL/dy` (`grad_output`, `[N, C]`) and `input_dim` the forward
/// input's `(N, C, H, W)` (e.g. `x.dim()`).
///
/// # Panics
///
/// If `H * W == 0` or `grad_output` is not `[N, C]`.
pub fn global_avg_pool_backward(
    input_dim: (usize, usize, usize, usize),
    grad_output: &Array2<f64>,
) -> Array4<f64> {
    let (batch, channels, h, w) = input_dim;
    assert!(
        h * w > 0,
        "global_avg_pool_backward: empty spatial size {h}x{w}"
    );
    assert_eq!(
        grad_output.dim(),
        (batch, channels),
        "global_avg_pool_backward: grad_output shape {:?} != [N, C] = {:?}",
        grad_output.shape(),
        [batch, channels]
    );
    let area = (h * w) as f64;
    let mut grad = Array4::<f64>::zeros(input_dim);
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..h {
                for j in 0..w {
                    grad[[n, c, i, j]] = grad_output[[n, c]] / area;
                }
            }
        }
    }
    grad
}

/// The tangent of [`max_pool2x2`] along an input tangent `ẋ` (`tangent`, the input's shape):
/// `ẏ[n, c, i, j] = ẋ` at the window's argmax of `x` (`input`), the same element, by the same
/// tie rule, that [`max_pool2x2_backward`] routes the gradient to. The argmax is locally
/// constant, so this is the Jacobian-vector product wherever the maximum is unique, and the
/// backward of this tangent map (for reverse-over-forward) is
/// `max_pool2x2_backward(input, ẏ_bar)`.
///
/// # Panics
///
/// As [`max_pool2x2`], and if `tangent` and `input` shapes differ.
pub fn max_pool2x2_tangent(input: &Array4<f64>, tangent: &Array4<f64>) -> Array4<f64> {
    assert_eq!(
        input.shape(),
        tangent.shape(),
        "max_pool2x2_tangent: tangent shape {:?} != input shape {:?}",
        tangent.shape(),
        input.shape()
    );
    let (h_out, w_out) = pooled_size(input);
    let (batch, channels, _, _) = input.dim();
    let mut out = Array4::<f64>::zeros((batch, channels, h_out, w_out));
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..h_out {
                for j in 0..w_out {
                    let (di, dj) = window_argmax(input, n, c, i, j);
                    out[[n, c, i, j]] = tangent[[n, c, 2 * i + di, 2 * j + dj]];
                }
            }
        }
    }
    out
}

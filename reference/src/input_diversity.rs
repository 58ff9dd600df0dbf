//! The input-diversity transform of DI²-FGSM (Xie et al. 2019, "Improving Transferability of
//! Adversarial Examples with Input Diversity"), as torchattacks applies it and the black-box
//! suite's M-DI²-FGSM versions use it, and its exact adjoint for the gradient.
//!
//! For one draw `{size: s, top: t, left: l}` (`eio_spec::attack::InputDiversity::draw`) and an
//! image of side H x W, every channel of every image is resized to s x s with PyTorch's
//! `F.interpolate(size=(s, s))` and zero-padded back to H x W (`F.pad`), t rows above and l
//! columns to the left:
//!
//! ```text
//! T(x)[n, c, t + i, l + j] = Σ_a Σ_b  w_h(i, a) · w_w(j, b) · x[n, c, a, b]     0 ≤ i, j < s
//! T(x)[n, c, p, q]         = 0                                                 elsewhere
//! ```
//!
//! The weights along an axis of input length `in` and output length `out` (each output index
//! reads at most two source indices):
//!
//! * bilinear, `align_corners = False`: scale = in / out (f64),
//!   src = max(scale·(i + 0.5) − 0.5, 0), i0 = min(floor(src), in − 1),
//!   i1 = min(i0 + 1, in − 1), λ = clamp(src − i0, 0, 1); weight 1 − λ on i0 and λ on i1;
//! * nearest (PyTorch's legacy `mode="nearest"`, in f32 as PyTorch computes it):
//!   src = min(floor(i · f32(in / out)), in − 1) with weight 1. In exact arithmetic this is
//!   floor(i·in/out); f32 rounding makes a few pairs differ (e.g. in 26, out 22, i 11 reads 12,
//!   not 13), none with in ∈ {28, 32} and the torchattacks sizes.
//!
//! T is linear, so the gradient of L(T(x)) is Tᵀ applied to ∇L at T(x):
//!
//! ```text
//! (Tᵀ g)[n, c, a, b] = Σ_i Σ_j  w_h(i, a) · w_w(j, b) · g[n, c, t + i, l + j]
//! ```
//!
//! (the padding receives no gradient).

use eio_spec::attack::{DiversityDraw, Interpolation};
use ndarray::Array4;

/// One source index an output index reads, with its interpolation weight.
#[derive(Debug, Clone, Copy)]
struct Tap {
    index: usize,
    weight: f64,
}

/// For every output index 0..`output` along one axis of length `input`, the source indices it
/// reads and their weights (the formulas of the module docs).
fn axis_taps(input: usize, output: usize, interpolation: Interpolation) -> Vec<Vec<Tap>> {
    (0..output)
        .map(|i| match interpolation {
            Interpolation::Bilinear => {
                let scale = input as f64 / output as f64;
                let src = (scale * (i as f64 + 0.5) - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                let lambda = (src - i0 as f64).clamp(0.0, 1.0);
                vec![
                    Tap {
                        index: i0,
                        weight: 1.0 - lambda,
                    },
                    Tap {
                        index: i1,
                        weight: lambda,
                    },
                ]
            }
            Interpolation::Nearest => {
                let scale = input as f32 / output as f32;
                let src = ((i as f32 * scale).floor() as usize).min(input - 1);
                vec![Tap {
                    index: src,
                    weight: 1.0,
                }]
            }
        })
        .collect()
}

/// Checks that `draw` fits an `h` x `w` image and returns the row and column taps.
fn taps_of(
    what: &str,
    h: usize,
    w: usize,
    draw: &DiversityDraw,
    interpolation: Interpolation,
) -> (Vec<Vec<Tap>>, Vec<Vec<Tap>>) {
    assert!(
        draw.size >= 1 && draw.top + draw.size <= h && draw.left + draw.size <= w,
        "{what}: draw {draw:?} does not fit a {h}x{w} image"
    );
    (
        axis_taps(h, draw.size, interpolation),
        axis_taps(w, draw.size, interpolation),
    )
}

/// T(x): every channel of every image of `x` (`[N, C, H, W]`) resized to `draw.size` x
/// `draw.size` and zero-padded back to H x W with `draw.top` rows above and `draw.left` columns
/// to the left (Xie et al. 2019; formulas in the module docs). The output has x's shape.
///
/// # Panics
/// If the draw does not fit (size 0, or top + size > H, or left + size > W).
pub fn input_diversity(
    x: &Array4<f64>,
    draw: &DiversityDraw,
    interpolation: Interpolation,
) -> Array4<f64> {
    let (batch, channels, h, w) = x.dim();
    let (rows, cols) = taps_of("input_diversity", h, w, draw, interpolation);
    let mut out = Array4::<f64>::zeros(x.raw_dim());
    for n in 0..batch {
        for c in 0..channels {
            for (i, row_taps) in rows.iter().enumerate() {
                for (j, col_taps) in cols.iter().enumerate() {
                    // PyTorch's order: interpolate along the width in each source row, then
                    // between the rows.
                    let mut value = 0.0;
                    for r in row_taps {
                        let mut along_row = 0.0;
                        for q in col_taps {
                            along_row += q.weight * x[[n, c, r.index, q.index]];
                        }
                        value += r.weight * along_row;
                    }
                    out[[n, c, draw.top + i, draw.left + j]] = value;
                }
            }
        }
    }
    out
}

/// Tᵀ g: the gradient with respect to x of a loss whose gradient at T(x) is `grad`
/// (`[N, C, H, W]`), the exact adjoint of [`input_diversity`] with the same draw: each
/// resized pixel's gradient goes back to the source pixels it read, times their weights; the
/// padding's gradient is dropped.
///
/// # Panics
/// As [`input_diversity`].
pub fn input_diversity_backward(
    grad: &Array4<f64>,
    draw: &DiversityDraw,
    interpolation: Interpolation,
) -> Array4<f64> {
    let (batch, channels, h, w) = grad.dim();
    let (rows, cols) = taps_of("input_diversity_backward", h, w, draw, interpolation);
    let mut dx = Array4::<f64>::zeros(grad.raw_dim());
    for n in 0..batch {
        for c in 0..channels {
            for (i, row_taps) in rows.iter().enumerate() {
                for (j, col_taps) in cols.iter().enumerate() {
                    let g = grad[[n, c, draw.top + i, draw.left + j]];
                    for r in row_taps {
                        for q in col_taps {
                            dx[[n, c, r.index, q.index]] += r.weight * q.weight * g;
                        }
                    }
                }
            }
        }
    }
    dx
}

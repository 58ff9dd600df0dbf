//! Per-channel input normalisation (torchvision `transforms.Normalize`, done
//! inside the model so that attacks see the `[0, 1]` image).

use ndarray::{Array1, Array4};

fn check_shapes(channels: usize, mean: Option<&Array1<f64>>, std: &Array1<f64>) {
    if let Some(mean) = mean {
        assert_eq!(
            mean.len(),
            channels,
            "normalize: mean has {} entries, input has {channels} channels",
            mean.len()
        );
    }
    assert_eq!(
        std.len(),
        channels,
        "normalize: std has {} entries, input has {channels} channels",
        std.len()
    );
    assert!(
        std.iter().all(|&s| s > 0.0),
        "normalize: every std entry must be positive, got {std}"
    );
}

/// `y[n, c, i, j] = (x[n, c, i, j] - mean[c]) / std[c]`, with `mean` and
/// `std` fixed per-channel buffers of length `C` (not trained).
///
/// # Panics
///
/// If `mean` or `std` does not have `C` entries, or some `std[c] <= 0`.
pub fn normalize(input: &Array4<f64>, mean: &Array1<f64>, std: &Array1<f64>) -> Array4<f64> {
    let (batch, channels, h, w) = input.dim();
    check_shapes(channels, Some(mean), std);
    let mut out = Array4::<f64>::zeros((batch, channels, h, w));
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..h {
                for j in 0..w {
                    out[[n, c, i, j]] = (input[[n, c, i, j]] - mean[c]) / std[c];
                }
            }
        }
    }
    out
}

/// Backward of [`normalize`] to its input only (`mean` and `std` are
/// buffers): `dL/dx[n, c, i, j] = g[n, c, i, j] / std[c]` with
/// `g = dL/dy` (`grad_output`).
///
/// # Panics
///
/// If `std` does not have `C` entries or some `std[c] <= 0`.
pub fn normalize_backward(std: &Array1<f64>, grad_output: &Array4<f64>) -> Array4<f64> {
    let (batch, channels, h, w) = grad_output.dim();
    check_shapes(channels, None, std);
    let mut grad = Array4::<f64>::zeros((batch, channels, h, w));
    for n in 0..batch {
        for c in 0..channels {
            for i in 0..h {
                for j in 0..w {
                    grad[[n, c, i, j]] = grad_output[[n, c, i, j]] / std[c];
                }
            }
        }
    }
    grad
}

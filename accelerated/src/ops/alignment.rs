//! Per-sample cosine similarity of two input gradients and its gradient (GAL's coherence,
//! TRS's alignment term); semantics in `eio_reference::alignment`.

use candle_core::{Result, Tensor};

/// `cosine_similarity`'s ε (`eio_reference::alignment::COSINE_EPS`).
pub const COSINE_EPS: f64 = 1e-8;

/// Flattened rows `[B, D]` and their norms `[B, 1]`.
fn rows(a: &Tensor) -> Result<(Tensor, Tensor)> {
    let flat = a.flatten_from(1)?;
    let norm = flat.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok((flat, norm))
}

/// cos_b(a, c) = ⟨a_b, c_b⟩ / max(‖a_b‖·‖c_b‖, ε) for every sample b, `[B]` (PyTorch 1.4's
/// clamp of the product).
///
/// # Errors
/// On a device error or shapes that differ.
pub fn cosine(a: &Tensor, c: &Tensor) -> Result<Tensor> {
    let (fa, na) = rows(a)?;
    let (fc, nc) = rows(c)?;
    let dot = (fa * fc)?.sum_keepdim(1)?;
    (dot / (na * nc)?.maximum(COSINE_EPS)?)?.squeeze(1)
}

/// d(Σ_b w_b·cos_b(a, c))/da in `a`'s shape: w_b·(c_b/(‖a_b‖‖c_b‖) − cos_b·a_b/‖a_b‖²) where
/// ‖a_b‖‖c_b‖ > ε, w_b·c_b/ε where the product is clamped.
///
/// # Errors
/// On a device error or shapes that differ.
pub fn cosine_backward(a: &Tensor, c: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (fa, na) = rows(a)?;
    let (fc, nc) = rows(c)?;
    let product = (&na * &nc)?;
    let denominator = product.maximum(COSINE_EPS)?;
    let dot = (&fa * &fc)?.sum_keepdim(1)?;
    let cos = (&dot / &denominator)?;
    let self_term = product
        .gt(COSINE_EPS)?
        .where_cond(&(&cos / na.sqr()?)?, &cos.zeros_like()?)?;
    let w = weights.unsqueeze(1)?;
    let first = fc.broadcast_div(&denominator)?;
    let second = fa.broadcast_mul(&self_term)?;
    (first - second)?.broadcast_mul(&w)?.reshape(a.shape())
}

/// cos_b(g_i, g_j) for every pair i < j of members, in order
/// (`eio_reference::alignment::pair_cosines`).
///
/// # Errors
/// On a device error.
pub fn pair_cosines(grads: &[&Tensor]) -> Result<Vec<Tensor>> {
    let n = grads.len();
    (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| cosine(grads[i], grads[j]))
        .collect()
}

/// ∂/∂g_m of Σ_{pairs (i, j)} Σ_b w_ij,b · cos_b(g_i, g_j) for every member m, one weight
/// vector per pair in [`pair_cosines`]'s order (`eio_reference::alignment::pair_directions`).
///
/// # Errors
/// On a device error.
pub fn pair_directions(grads: &[&Tensor], weights: &[Tensor]) -> Result<Vec<Tensor>> {
    let n = grads.len();
    let mut directions = grads
        .iter()
        .map(|g| g.zeros_like())
        .collect::<Result<Vec<_>>>()?;
    let pairs = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j)));
    for ((i, j), w) in pairs.zip(weights) {
        directions[i] = (&directions[i] + cosine_backward(grads[i], grads[j], w)?)?;
        directions[j] = (&directions[j] + cosine_backward(grads[j], grads[i], w)?)?;
    }
    Ok(directions)
}

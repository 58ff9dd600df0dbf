//! The ops of the rival ensemble methods' losses, forward and backward, behind the seam:
//! ADP's loss (`eio_reference::adp`, which documents every formula and its gradient) and the
//! log-determinant it needs.
//!
//! The batched work (softmax, the ensemble entropy, the masking and L2 normalisation of the
//! non-true predictions, the `[B, N, N]` Gram matrices, the gradient through all of them) runs
//! as tensor ops on the tensors' device. Only the per-sample N x N log-determinant and its
//! inverse ([`spd_log_det`]) run on the host: B Cholesky factorisations of a matrix as small
//! as the ensemble (N ≤ 8 in the paper), read back and uploaded once per batch.

use candle_core::{DType, Device, Result, Tensor, D};
use eio_spec::config::AdpConfig;

use super::{cross_entropy, log_softmax, one_hot};

/// ADP's loss terms on a batch and the gradient of L = CE − α·H − β·D with respect to every
/// member's logits (`eio_reference::adp::AdpLoss`).
#[derive(Debug, Clone)]
pub struct AdpTerms {
    /// CE = Σ_m CE(z_m, y), each a batch mean (scalar).
    pub ce: Tensor,
    /// H, the ensemble entropy, batch mean (scalar, unweighted).
    pub entropy: Tensor,
    /// D, the batch mean of log det(G_b + δI) (scalar, unweighted).
    pub log_det: Tensor,
    /// dL/dz_m for each member, `[B, K]`.
    pub grads: Vec<Tensor>,
}

/// dL/dz of softmax s = softmax(z) given g = dL/ds: s ⊙ (g − ⟨g, s⟩) per row.
fn softmax_backward(s: &Tensor, g: &Tensor) -> Result<Tensor> {
    let dot = g.mul(s)?.sum_keepdim(D::Minus1)?;
    s.mul(&g.broadcast_sub(&dot)?)
}

/// ADP's loss (DVERGE's port of Pang et al. 2019) of the members' logits (each `[B, K]`) on
/// `labels` (`[B]`, u32) with `config`'s α, β, δ = `det_offset`, τ = `log_offset`:
///
/// ```text
/// p̄ = mean_m softmax(z_m)               H = mean_b −Σ_k p̄ log(p̄ + τ)
/// v_bm = u_bm / ‖u_bm‖, u_bm = s_bm with the true-label entry zeroed (the same Gram matrix
///        as removing it: the entry adds 0 to every dot product)
/// D = mean_b log det(V_b V_bᵀ + δI)      L = Σ_m CE_m − α·H − β·D
/// ```
///
/// and dL/dz_m through the softmax, the normalisation and ∂ log det A/∂A = A⁻¹
/// (`eio_reference::adp` derives each step).
///
/// # Errors
/// On a device error, or if the members' logits differ in shape or there are none.
pub fn adp_loss(logits: &[Tensor], labels: &Tensor, config: &AdpConfig) -> Result<AdpTerms> {
    let Some(first) = logits.first() else {
        candle_core::bail!("adp_loss: no members");
    };
    let (batch, classes) = first.dims2()?;
    let n = logits.len();
    let (b_f, n_f) = (batch as f64, n as f64);
    let dtype = first.dtype();

    let mut ce = Tensor::zeros((), dtype, first.device())?;
    let mut grads = Vec::with_capacity(n);
    let mut probs = Vec::with_capacity(n);
    for z in logits {
        if z.dims2()? != (batch, classes) {
            candle_core::bail!("adp_loss: members' logits differ in shape");
        }
        let (l, g) = cross_entropy(z, labels)?;
        ce = (ce + l)?;
        grads.push(g);
        probs.push(log_softmax(z)?.exp()?);
    }

    // Ensemble entropy and dL/ds_m of −α·H (the same for every member).
    let mut sum = probs[0].clone();
    for s in &probs[1..] {
        sum = (sum + s)?;
    }
    let p_bar = (sum / n_f)?;
    let shifted = (&p_bar + config.log_offset)?;
    let log = shifted.log()?;
    let entropy = (p_bar.mul(&log)?.sum_all()? * (-1.0 / b_f))?;
    let g_entropy = ((log + p_bar.div(&shifted)?)? * (config.alpha / (b_f * n_f)))?;

    // The normalised non-true predictions V, [B, N, K] (zero at the true label).
    let keep = (1.0 - one_hot(labels, classes, dtype)?)?;
    let mut v = Vec::with_capacity(n);
    let mut norms = Vec::with_capacity(n);
    for s in &probs {
        let u = s.mul(&keep)?;
        let norm = u.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        v.push(u.broadcast_div(&norm)?);
        norms.push(norm);
    }
    let v_all = Tensor::stack(&v, 1)?;
    // G_b + δI, [B, N, N]: (G_b)_mn = Σ_k V_bmk V_bnk.
    let gram = v_all
        .unsqueeze(2)?
        .broadcast_mul(&v_all.unsqueeze(1)?)?
        .sum(D::Minus1)?;
    let eye = (Tensor::eye(n, dtype, first.device())? * config.det_offset)?;
    let a = gram.broadcast_add(&eye)?;
    let (log_dets, inverse) = spd_log_det(&a)?;
    let log_det = (log_dets.sum_all()? / b_f)?;
    // ∂ log det / ∂V = 2·A⁻¹·V, [B, N, K].
    let g_v_all = (inverse
        .unsqueeze(3)?
        .broadcast_mul(&v_all.unsqueeze(1)?)?
        .sum(2)?
        * 2.0)?;

    for (m, ((grad, s), (v_m, norm))) in grads
        .iter_mut()
        .zip(&probs)
        .zip(v.iter().zip(&norms))
        .enumerate()
    {
        let g_v = g_v_all.narrow(1, m, 1)?.squeeze(1)?;
        let dot = g_v.mul(v_m)?.sum_keepdim(D::Minus1)?;
        let g_u = g_v
            .sub(&v_m.broadcast_mul(&dot)?)?
            .broadcast_div(norm)?
            .mul(&keep)?;
        let g_s = (&g_entropy - (g_u * (config.beta / b_f))?)?;
        *grad = (&*grad + softmax_backward(s, &g_s)?)?;
    }
    Ok(AdpTerms {
        ce,
        entropy,
        log_det,
        grads,
    })
}

/// Per matrix of `a` (`[B, N, N]`, symmetric positive definite): log det A and its gradient
/// A⁻¹, as (`[B]`, `[B, N, N]`) on `a`'s device in `a`'s dtype. Computed on the host in f64 by
/// Cholesky (`eio_reference::adp::spd_log_det`, the same algorithm): A = L·Lᵀ,
/// log det A = 2·Σ_i log L_ii, A⁻¹ = L⁻ᵀ·L⁻¹. A matrix that is not positive definite in
/// floating point gives NaN for its value and every entry of its inverse (as `torch.logdet`
/// gives NaN for a negative determinant).
///
/// # Errors
/// On a device error, or if `a` is not a batch of square matrices.
pub fn spd_log_det(a: &Tensor) -> Result<(Tensor, Tensor)> {
    let (batch, n, n2) = a.dims3()?;
    if n != n2 {
        candle_core::bail!("spd_log_det: {n} x {n2} matrices are not square");
    }
    let values = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut log_dets = Vec::with_capacity(batch);
    let mut inverses = Vec::with_capacity(batch * n * n);
    for matrix in values.chunks_exact(n * n) {
        let (ld, inv) = host_spd_log_det(matrix, n);
        log_dets.push(ld);
        inverses.extend(inv);
    }
    let upload = |v: Vec<f64>, dims: &[usize], device: &Device| -> Result<Tensor> {
        Tensor::from_vec(v, dims, device)?.to_dtype(a.dtype())
    };
    Ok((
        upload(log_dets, &[batch], a.device())?,
        upload(inverses, &[batch, n, n], a.device())?,
    ))
}

/// One matrix of [`spd_log_det`] (row-major `n x n`).
fn host_spd_log_det(a: &[f64], n: usize) -> (f64, Vec<f64>) {
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let mut pivot = a[j * n + j];
        for p in 0..j {
            pivot -= l[j * n + p] * l[j * n + p];
        }
        if pivot.is_nan() || pivot <= 0.0 {
            return (f64::NAN, vec![f64::NAN; n * n]);
        }
        let d = pivot.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for p in 0..j {
                v -= l[i * n + p] * l[j * n + p];
            }
            l[i * n + j] = v / d;
        }
    }
    let log_det = 2.0 * (0..n).map(|i| l[i * n + i].ln()).sum::<f64>();
    let mut li = vec![0.0; n * n];
    for c in 0..n {
        for i in c..n {
            let mut v = if i == c { 1.0 } else { 0.0 };
            for p in c..i {
                v -= l[i * n + p] * li[p * n + c];
            }
            li[i * n + c] = v / l[i * n + i];
        }
    }
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            inv[i * n + j] = (i.max(j)..n).map(|p| li[p * n + i] * li[p * n + j]).sum();
        }
    }
    (log_det, inv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// det [[4, 2], [2, 3]] = 8 with inverse [[3, −2], [−2, 4]]/8; a non-positive-definite
    /// matrix gives NaN.
    #[test]
    fn spd_log_det_known_answers() {
        let a = Tensor::new(
            &[[[4.0f64, 2.0], [2.0, 3.0]], [[1.0, 2.0], [2.0, 1.0]]],
            &Device::Cpu,
        )
        .expect("a");
        let (ld, inv) = spd_log_det(&a).expect("log det");
        let ld = ld.to_vec1::<f64>().expect("host");
        let inv = inv
            .flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .expect("host");
        assert!((ld[0] - 8f64.ln()).abs() < 1e-15, "{ld:?}");
        for (a, e) in inv[..4].iter().zip([0.375, -0.25, -0.25, 0.5]) {
            assert!((a - e).abs() < 1e-15, "{inv:?}");
        }
        assert!(ld[1].is_nan() && inv[4..].iter().all(|v| v.is_nan()));
    }
}

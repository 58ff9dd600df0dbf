//! Forward-mode (tangent) rules of the ops and the backward rules of their tangents: what
//! [`crate::second_order`] needs for exact second-order gradients by reverse-over-forward
//! differentiation.
//!
//! A tangent pass carries, next to each primal value y, its directional derivative ẏ along
//! an input direction v. Back-propagating a scalar s through both the primal and the tangent
//! computations gives, per node, the primal cotangent ȳ = ∂s/∂y and the tangent cotangent
//! ẏ̄ = ∂s/∂ẏ. Ops that are linear in their input (convolution, linear, normalise, add,
//! pooling, flatten) and the piecewise-linear activations reuse their first-order kernels on
//! both; this file holds the rules that are new: the tangent of max pooling and of the linear
//! map without its bias, BatchNorm's tangent and second-order backward, and the seeds of the
//! cross-entropy's directional derivative. Everything is built from candle tensor ops and the
//! seam's dispatched kernels (f32 and f64 on any device, no host loops over elements).

use candle_core::{Result, Tensor, D};

use super::{
    batch_norm_backward, batch_norm_backward_input, cross_entropy, linear, log_softmax,
    max_pool2_backward, per_channel, BnSaved,
};

/// Tangent of [`linear`](super::linear): ẏ = ẋ Wᵀ (the bias is constant). The linear kernel
/// with a zero bias, which adds exactly nothing.
pub fn linear_tangent(dx: &Tensor, w: &Tensor) -> Result<Tensor> {
    let bias = Tensor::zeros(w.dim(0)?, dx.dtype(), dx.device())?;
    linear(dx, w, &bias)
}

/// Tangent of [`max_pool2`](super::max_pool2): ẏ takes ẋ at the maximum of each window of
/// `x`, the first maximal element in row-major order on ties (the element
/// [`max_pool2_backward`] routes a gradient to, whose 0/1 mask it reuses).
pub fn max_pool2_tangent(x: &Tensor, dx: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let ones = Tensor::ones((n, c, oh, ow), x.dtype(), x.device())?;
    // 1 at each window's chosen element, 0 elsewhere (and on an odd map's last row/column).
    let chosen = max_pool2_backward(x, &ones)?;
    // One non-zero term per window, so the sums are exact.
    chosen
        .mul(dx)?
        .narrow(2, 0, oh * 2)?
        .narrow(3, 0, ow * 2)?
        .reshape((n, c, oh, 2, ow, 2))?
        .sum(5)?
        .sum(3)
}

/// Tangent of [`batch_norm`](super::batch_norm) with the pass's saved tensors: (ẏ, ẋ̂),
/// ẏ = γ·ẋ̂ with
///
/// ```text
/// train: ẋ̂ = inv_std·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))   (means per channel over N, H, W)
/// eval:  ẋ̂ = inv_std·ẋ
/// ```
///
/// The train-mode map is BatchNorm's own input backward with γ = 1 (the Jacobian of x̂ is
/// symmetric), so it runs as [`batch_norm_backward_input`].
pub fn batch_norm_tangent(
    gamma: &Tensor,
    saved: &BnSaved,
    dx: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor)> {
    one_segment("batch norm tangent", saved)?;
    let dx_hat = if train {
        batch_norm_backward_input(&gamma.ones_like()?, saved, dx, true)?
    } else {
        dx.broadcast_mul(&per_channel(&saved.inv_std)?)?
    };
    let dy = dx_hat.broadcast_mul(&per_channel(gamma)?)?;
    Ok((dy, dx_hat))
}

/// Second-order passes run along one path: a path-batched pass's saved values are refused.
fn one_segment(what: &str, saved: &BnSaved) -> Result<()> {
    if saved.segments.len() != 1 {
        candle_core::bail!(
            "{what}: a pass over {} segments (second-order passes take one batch)",
            saved.segments.len()
        );
    }
    Ok(())
}

/// The gradients a BatchNorm node passes back in a reverse-over-forward pass.
#[derive(Debug, Clone)]
pub struct BnSecondGrads {
    /// ∂s/∂x: the primal input's cotangent.
    pub input: Tensor,
    /// ∂s/∂ẋ: the tangent input's cotangent.
    pub tangent_input: Tensor,
    /// ∂s/∂γ, `[C]`.
    pub gamma: Tensor,
    /// ∂s/∂β, `[C]`.
    pub beta: Tensor,
}

/// The backward of a BatchNorm node through its primal output y = γ·x̂ + β and its tangent
/// ẏ = γ·ẋ̂ ([`batch_norm_tangent`]), given ȳ = `grad` and ẏ̄ = `tangent_grad`, the tangent
/// input u = `dx` and ẋ̂ = `dx_hat`:
///
/// ```text
/// β̄ = Σ ȳ
/// γ̄ = Σ ȳ·x̂ + Σ ẏ̄·ẋ̂
/// ẋ̄ = BN input backward of ẏ̄       (ẋ̂ is linear in u with BN's input Jacobian)
/// x̄ = BN input backward of ȳ + R
/// ```
///
/// In eval mode ẋ̂ does not depend on x, so R = 0. In train mode ẋ̂ depends on x through x̂ and
/// σ = 1/inv_std: with a = γ·ẏ̄, per channel over its N = B·H·W values,
///
/// ```text
/// m_u = mean(x̂·u),   m_a = mean(a·x̂),   S = Σ a·ẋ̂,   h = −(a·m_u + m_a·u)/σ
/// R   = (h − mean(h) − x̂·mean(h·x̂))/σ − (S/σ)·x̂/N
/// ```
///
/// (∂/∂x of Σ a·ẋ̂: the derivative of x̂ through m_u and Σ a·x̂ gives the first term, that of
/// 1/σ the second).
pub fn batch_norm_second_backward(
    gamma: &Tensor,
    saved: &BnSaved,
    dx: &Tensor,
    dx_hat: &Tensor,
    grad: &Tensor,
    tangent_grad: &Tensor,
    train: bool,
) -> Result<BnSecondGrads> {
    one_segment("batch norm second-order backward", saved)?;
    let (gx, gamma_primal, beta) = batch_norm_backward(gamma, saved, grad, train)?;
    let gamma_tangent = tangent_grad.mul(dx_hat)?.sum((0, 2, 3))?;
    let tangent_input = batch_norm_backward_input(gamma, saved, tangent_grad, train)?;
    let input = if train {
        let (n, _, h, w) = dx.dims4()?;
        let count = (n * h * w) as f64;
        let x_hat = &saved.x_hat()?;
        let inv_std = per_channel(&saved.inv_std)?;
        let a = tangent_grad.broadcast_mul(&per_channel(gamma)?)?;
        let m_u = x_hat.mul(dx)?.mean_keepdim((0, 2, 3))?;
        let m_a = a.mul(x_hat)?.mean_keepdim((0, 2, 3))?;
        // S = Σ a·ẋ̂ = γ·Σ ẏ̄·ẋ̂.
        let s = per_channel(&gamma.mul(&gamma_tangent)?)?;
        let h = a
            .broadcast_mul(&m_u)?
            .add(&dx.broadcast_mul(&m_a)?)?
            .broadcast_mul(&inv_std)?
            .neg()?;
        let centred = batch_norm_backward_input(&gamma.ones_like()?, saved, &h, true)?;
        let scale = (s.mul(&inv_std)? / count)?;
        let r = centred.sub(&x_hat.broadcast_mul(&scale)?)?;
        gx.add(&r)?
    } else {
        gx
    };
    Ok(BnSecondGrads {
        input,
        tangent_input,
        gamma: gamma_primal.add(&gamma_tangent)?,
        beta,
    })
}

/// For L the batch-mean cross-entropy of logits `z` (`[B, K]`) against `labels` (`[B]`, u32),
/// its directional derivative s = Σ_b ⟨∂L/∂z_b, ż_b⟩ along the logits' tangent `dz` and the
/// seeds of a reverse-over-forward backward of s: (s, ∂s/∂z, ∂s/∂ż), s a scalar tensor, with
/// p_b = softmax(z_b) and e_b the one-hot label,
///
/// ```text
/// ∂s/∂ż_b = (p_b − e_b)/B                      (the cross-entropy's gradient)
/// ∂s/∂z_b = (p_b ⊙ ż_b − p_b·⟨p_b, ż_b⟩)/B     (its Hessian, diag(p) − p pᵀ, times ż_b)
/// ```
pub fn cross_entropy_tangent_backward(
    z: &Tensor,
    dz: &Tensor,
    labels: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (batch, _) = z.dims2()?;
    let (_, grad) = cross_entropy(z, labels)?;
    let value = grad.mul(dz)?.sum_all()?;
    let p = log_softmax(z)?.exp()?;
    let p_dz = p.mul(dz)?;
    let inner = p_dz.sum_keepdim(D::Minus1)?;
    let hessian = (p_dz.sub(&p.broadcast_mul(&inner)?)? / batch as f64)?;
    Ok((value, hessian, grad))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .expect("host values")
    }

    /// The max-pool tangent picks ẋ at the first maximum of each window (ties included),
    /// and drops an odd map's last row and column.
    #[test]
    fn max_pool2_tangent_by_hand() {
        let x = Tensor::new(
            &[[[
                [1.0f64, 3.0, 2.0, 2.0, 9.0],
                [3.0, 0.0, 2.0, 1.0, 9.0],
                [0.0, 0.0, 5.0, 4.0, 9.0],
            ]]],
            &Device::Cpu,
        )
        .expect("x");
        let dx = Tensor::arange(0.0f64, 15.0, &Device::Cpu)
            .and_then(|t| t.reshape((1, 1, 3, 5)))
            .expect("dx");
        let dy = max_pool2_tangent(&x, &dx).expect("tangent");
        assert_eq!(dy.dims(), &[1, 1, 1, 2]);
        // Window 0: max 3 at (0, 1) first (tie with (1, 0)); window 1: max 2 at (0, 2) first.
        assert_eq!(values(&dy), [1.0, 2.0]);
        let f32_dy = max_pool2_tangent(
            &x.to_dtype(DType::F32).expect("f32"),
            &dx.to_dtype(DType::F32).expect("f32"),
        )
        .expect("f32 tangent");
        assert_eq!(values(&f32_dy), [1.0, 2.0]);
    }

    /// The cross-entropy seeds by hand for one row: z = (0, ln 2, ln 3) gives p = (1, 2, 3)/6,
    /// label 1, ż = (1, 0, −1), ⟨p, ż⟩ = −1/3, s = ⟨p − e, ż⟩ = −1/3.
    #[test]
    fn cross_entropy_seeds_by_hand() {
        let z = Tensor::new(&[[0.0f64, 2f64.ln(), 3f64.ln()]], &Device::Cpu).expect("z");
        let dz = Tensor::new(&[[1.0f64, 0.0, -1.0]], &Device::Cpu).expect("dz");
        let labels = Tensor::new(&[1u32], &Device::Cpu).expect("labels");
        let (value, hz, hdz) = cross_entropy_tangent_backward(&z, &dz, &labels).expect("seeds");
        assert!((values(&value)[0] + 1.0 / 3.0).abs() < 1e-15);
        let p = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0];
        let want_dz = [p[0], p[1] - 1.0, p[2]];
        let want_z = [
            p[0] * (1.0 + 1.0 / 3.0),
            p[1] * (1.0 / 3.0),
            p[2] * (-1.0 + 1.0 / 3.0),
        ];
        for (got, want) in values(&hdz).iter().zip(want_dz) {
            assert!((got - want).abs() < 1e-15, "∂s/∂ż: {got} for {want}");
        }
        for (got, want) in values(&hz).iter().zip(want_z) {
            assert!((got - want).abs() < 1e-15, "∂s/∂z: {got} for {want}");
        }
    }
}

//! The seam's ops written with stock candle ops: what CUDA (and any non-f32/f64 dtype) runs, and
//! the baseline the CPU kernels of [`super::cpu`] are tested against. Same semantics as
//! `eio_reference::ops`.

use candle_core::{Result, Tensor};

use super::{per_channel, BnSaved, BN_EPS};

/// 2-D convolution without bias (`eio_reference::ops::conv2d`).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    x.conv2d(w, padding, stride, 1, 1)
}

/// dL/dx of [`conv2d`] (the first half of [`conv2d_backward`]).
pub fn conv2d_backward_input(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, gh, gw) = grad.dims4()?;
    // The transposed convolution maps the gradient back onto the input; output_padding
    // restores the rows a strided convolution dropped.
    let out_h = (gh - 1) * stride + kh - 2 * padding;
    let out_w = (gw - 1) * stride + kw - 2 * padding;
    assert_eq!(h - out_h, wd - out_w, "square output padding");
    grad.conv_transpose2d(w, padding, h - out_h, stride, 1)
}

/// Gradients of [`conv2d`]: (dL/dx, dL/dw).
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<(Tensor, Tensor)> {
    Ok((
        conv2d_backward_input(x, w, grad, stride, padding)?,
        conv2d_backward_weight(x, w, grad, stride, padding)?,
    ))
}

/// dL/dw of [`conv2d`] (the second half of [`conv2d_backward`]).
pub fn conv2d_backward_weight(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let grad_w = x
        .transpose(0, 1)?
        .conv2d(&grad.transpose(0, 1)?, padding, 1, stride, 1)?
        .transpose(0, 1)?;
    grad_w.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous()
}

/// BatchNorm2d forward. Train mode normalises with the batch mean and biased variance over
/// (N, H, W); eval mode with `running_mean` / `running_var`.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    train: bool,
) -> Result<(Tensor, BnSaved)> {
    let (mean, var) = if train {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
        (mean.flatten_all()?, var.flatten_all()?)
    } else {
        (running_mean.clone(), running_var.clone())
    };
    let inv_std = (var.clone() + BN_EPS)?.sqrt()?.recip()?;
    let x_hat = x
        .broadcast_sub(&per_channel(&mean)?)?
        .broadcast_mul(&per_channel(&inv_std)?)?;
    let y = x_hat
        .broadcast_mul(&per_channel(gamma)?)?
        .broadcast_add(&per_channel(beta)?)?;
    let saved = BnSaved {
        x_hat: Some(x_hat),
        input: x.clone(),
        batch_mean: train.then(|| mean.clone()),
        mean,
        inv_std,
        batch_var: train.then_some(var),
        segments: vec![x.dim(0)?],
    };
    Ok((y, saved))
}

/// Gradients of [`batch_norm`]: (dL/dx, dL/dγ, dL/dβ). Train mode back-propagates through the
/// batch statistics: dx = γ·inv_std·(g − mean(g) − x̂·mean(g·x̂)).
pub fn batch_norm_backward(
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let grad_beta = grad.sum((0, 2, 3))?;
    let grad_gamma = (grad * saved.x_hat()?)?.sum((0, 2, 3))?;
    let grad_x = batch_norm_backward_input(gamma, saved, grad, train)?;
    Ok((grad_x, grad_gamma, grad_beta))
}

/// dL/dx of [`batch_norm`] (the first output of [`batch_norm_backward`]).
pub fn batch_norm_backward_input(
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<Tensor> {
    let scale = per_channel(&(gamma * &saved.inv_std)?)?;
    if train {
        let mean_g = grad.mean_keepdim((0, 2, 3))?;
        let x_hat = saved.x_hat()?;
        let mean_gx = (grad * &x_hat)?.mean_keepdim((0, 2, 3))?;
        grad.broadcast_sub(&mean_g)?
            .sub(&x_hat.broadcast_mul(&mean_gx)?)?
            .broadcast_mul(&scale)
    } else {
        grad.broadcast_mul(&scale)
    }
}

/// dL/dx of [`relu`]: g where x > 0, else 0.
pub fn relu_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    grad.mul(&x.gt(0.0)?.to_dtype(grad.dtype())?)
}

/// y = x Wᵀ + b.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

/// Gradients of [`linear`]: (dL/dx, dL/dW, dL/db).
pub fn linear_backward(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        linear_backward_input(w, grad)?,
        grad.t()?.matmul(x)?,
        grad.sum(0)?,
    ))
}

/// dL/dx of [`linear`]: g W.
pub fn linear_backward_input(w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    grad.matmul(w)
}

/// `L · x[n, c] · Rᵀ` per plane of `x` (`[N, C, H, W]`), as two batched matmuls.
pub fn separable(x: &Tensor, left: &Tensor, right: &Tensor) -> Result<Tensor> {
    left.broadcast_matmul(&x.contiguous()?)?
        .broadcast_matmul(&right.t()?)
}

/// See [`super::BnSaved::x_hat`]: `(x − mean)·inv_std`, as [`batch_norm`] computes it.
pub fn batch_norm_x_hat(saved: &BnSaved) -> Result<Tensor> {
    saved
        .input
        .broadcast_sub(&per_channel(&saved.mean)?)?
        .broadcast_mul(&per_channel(&saved.inv_std)?)
}

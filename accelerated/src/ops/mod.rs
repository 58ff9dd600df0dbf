//! The op seam: every tensor operation the engine runs, forward and backward, one function each.
//!
//! These are the same operations, with the same semantics and gradients, as
//! `eio_reference::ops` and `eio_reference::loss` (which document each formula); the engine's
//! passes ([`crate::model`], [`crate::distill`], [`crate::eio`], [`crate::attack`]) call only
//! these functions. Each op picks its implementation per call from its tensors' device and
//! dtype:
//!
//! * f32 / f64 on the CPU: the kernels of [`cpu_kernels`] (im2col + GEMM convolutions, fused
//!   BatchNorm, ReLU and linear passes, parallel on rayon's pool) for the convolution,
//!   BatchNorm, ReLU-backward and linear ops, which are nearly all of a step's time;
//! * anything else (CUDA): the stock candle ops of [`stock`]. The GPU hot path of a later issue
//!   (cuDNN convolutions, fused BatchNorm and update kernels) replaces that branch.
//!
//! The remaining ops are stock candle ops everywhere. No CPU op of the engine goes through
//! candle's CPU matmul, whose `utils::get_num_threads` re-reads `/proc/cpuinfo` on every call
//! in candle 0.11.1 unless `RAYON_NUM_THREADS` is set: the kernels size their parallelism from
//! rayon's global pool (`RAYON_NUM_THREADS`, else the available parallelism), read once.
//!
//! Shapes: feature maps are NCHW, vectors `[N, F]`, per-channel tensors `[C]`.

mod cpu;
mod cpu_kernels;
mod stock;

use candle_core::{DType, Device, Result, Tensor, D};

/// Runs `cpu::$op::<f32 | f64>` for f32 / f64 tensors on the CPU, `stock::$op` otherwise, as
/// decided by the device and dtype of `$t`.
macro_rules! dispatch {
    ($t:expr, $op:ident($($arg:expr),* $(,)?)) => {
        match ($t.device(), $t.dtype()) {
            (Device::Cpu, DType::F32) => cpu::$op::<f32>($($arg),*),
            (Device::Cpu, DType::F64) => cpu::$op::<f64>($($arg),*),
            _ => stock::$op($($arg),*),
        }
    };
}

/// BatchNorm epsilon (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;

/// `[C]` -> `[1, C, 1, 1]`, to broadcast over a feature map.
fn per_channel(t: &Tensor) -> Result<Tensor> {
    t.reshape((1, t.dim(0)?, 1, 1))
}

/// 2-D convolution without bias (`eio_reference::ops::conv2d`):
/// `y[n, o, i, j] = Σ_{c, u, v} w[o, c, u, v] · x[n, c, i·s + u − p, j·s + v − p]` (zero outside
/// the image). CPU: im2col + one GEMM per chunk of images ([`cpu_kernels::conv2d`]).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    dispatch!(x, conv2d(x, w, stride, padding))
}

/// Gradients of [`conv2d`]: (dL/dx, dL/dw). CPU: `dX_n = col2im(Wᵀ dY_n)` and
/// `dW = Σ_n dY_n cols(X_n)ᵀ`, each one GEMM per chunk of images ([`cpu_kernels`]).
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<(Tensor, Tensor)> {
    dispatch!(x, conv2d_backward(x, w, grad, stride, padding))
}

/// dL/dx of [`conv2d`] alone: the same value as the first output of [`conv2d_backward`]
/// (the same kernel on the CPU, the same transposed convolution otherwise), without dL/dw.
pub fn conv2d_backward_input(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    dispatch!(x, conv2d_backward_input(x, w, grad, stride, padding))
}

/// Per-channel `(x - mean[c]) / std[c]`.
pub fn normalize(x: &Tensor, mean: &Tensor, std: &Tensor) -> Result<Tensor> {
    x.broadcast_sub(&per_channel(mean)?)?
        .broadcast_div(&per_channel(std)?)
}

/// dL/dx of [`normalize`].
pub fn normalize_backward(std: &Tensor, grad: &Tensor) -> Result<Tensor> {
    grad.broadcast_div(&per_channel(std)?)
}

/// What a train-mode BatchNorm forward leaves for its backward and for the running update.
#[derive(Debug, Clone)]
pub struct BnSaved {
    /// The normalised input x̂.
    pub x_hat: Tensor,
    /// 1 / sqrt(var + eps), `[C]`.
    pub inv_std: Tensor,
    /// Batch mean, `[C]` (train mode only).
    pub batch_mean: Option<Tensor>,
    /// Biased batch variance, `[C]` (train mode only).
    pub batch_var: Option<Tensor>,
}

/// BatchNorm2d forward: `y = γ·x̂ + β`, `x̂ = (x − μ_c) / sqrt(σ²_c + eps)`. Train mode takes μ, σ²
/// as the batch mean and biased variance over (N, H, W); eval mode `running_mean` /
/// `running_var`. CPU: one statistics pass per channel and one fused normalise-and-scale pass.
pub fn batch_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    train: bool,
) -> Result<(Tensor, BnSaved)> {
    dispatch!(
        x,
        batch_norm(x, gamma, beta, running_mean, running_var, train)
    )
}

/// PyTorch's running-statistics update after a train-mode pass over `count` = N·H·W values:
/// running = (1 − m)·running + m·batch, with the unbiased variance for `running_var`.
pub fn batch_norm_running_update(
    running_mean: &Tensor,
    running_var: &Tensor,
    saved: &BnSaved,
    count: usize,
) -> Result<(Tensor, Tensor)> {
    let (Some(mean), Some(var)) = (&saved.batch_mean, &saved.batch_var) else {
        return Ok((running_mean.clone(), running_var.clone()));
    };
    let unbiased = (var * (count as f64 / (count as f64 - 1.0)))?;
    let m = BN_MOMENTUM;
    let new_mean = ((running_mean * (1.0 - m))? + (mean * m)?)?;
    let new_var = ((running_var * (1.0 - m))? + (unbiased * m)?)?;
    Ok((new_mean, new_var))
}

/// Gradients of [`batch_norm`]: (dL/dx, dL/dγ, dL/dβ), with dL/dγ = Σ g·x̂ and dL/dβ = Σ g over
/// (N, H, W). Train mode back-propagates through the batch statistics:
/// dx = γ·inv_std·(g − mean(g) − x̂·mean(g·x̂)); eval mode dx = γ·inv_std·g. CPU: one pass for
/// both sums (which also give the two means), one for dx.
pub fn batch_norm_backward(
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    dispatch!(grad, batch_norm_backward(gamma, saved, grad, train))
}

/// dL/dx of [`batch_norm`] alone: the same value as the first output of
/// [`batch_norm_backward`], without dL/dγ and dL/dβ (on the CPU, eval mode then skips the
/// pass over the gradient that only those need).
pub fn batch_norm_backward_input(
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<Tensor> {
    dispatch!(grad, batch_norm_backward_input(gamma, saved, grad, train))
}

/// max(x, 0).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.relu()
}

/// dL/dx of [`relu`]: g where x > 0, else 0 (CPU: one fused pass).
pub fn relu_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    dispatch!(x, relu_backward(x, grad))
}

/// x for x > 0, slope·x otherwise.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    let positive = x.gt(0.0)?;
    positive.where_cond(x, &(x * slope)?)
}

/// dL/dx of [`leaky_relu`]: g where x > 0, slope·g otherwise (also at 0).
pub fn leaky_relu_backward(x: &Tensor, slope: f64, grad: &Tensor) -> Result<Tensor> {
    x.gt(0.0)?.where_cond(grad, &(grad * slope)?)
}

/// 2x2 max pooling, stride 2.
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    x.max_pool2d(2)
}

/// dL/dx of [`max_pool2`]: each window's gradient goes to its first maximal element in
/// row-major order (as `eio_reference::ops::max_pool2x2_backward`).
pub fn max_pool2_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    // [N, C, oh, 2, ow, 2] -> [N, C, oh, ow, 4]: each window's four values in row-major order.
    let windows = x
        .narrow(2, 0, oh * 2)?
        .narrow(3, 0, ow * 2)?
        .reshape((n, c, oh, 2, ow, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, oh, ow, 4))?;
    let max = windows.max_keepdim(D::Minus1)?;
    let is_max = windows.broadcast_eq(&max)?.to_dtype(x.dtype())?;
    // Keep only the first maximum: an element is chosen if it is maximal and no earlier one is.
    let earlier = is_max.cumsum(D::Minus1)?;
    let first = is_max.mul(&earlier.eq(1.0)?.to_dtype(x.dtype())?)?;
    let routed = first.broadcast_mul(&grad.unsqueeze(4)?)?;
    let routed = routed
        .reshape((n, c, oh, ow, 2, 2))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, oh * 2, ow * 2))?;
    if oh * 2 == h && ow * 2 == w {
        Ok(routed)
    } else {
        routed
            .pad_with_zeros(2, 0, h - oh * 2)?
            .pad_with_zeros(3, 0, w - ow * 2)
    }
}

/// Mean over height and width: `[N, C, H, W]` -> `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// dL/dx of [`global_avg_pool`].
pub fn global_avg_pool_backward(
    dims: (usize, usize, usize, usize),
    grad: &Tensor,
) -> Result<Tensor> {
    let (n, c, h, w) = dims;
    (grad.reshape((n, c, 1, 1))? / (h * w) as f64)?
        .broadcast_as((n, c, h, w))?
        .contiguous()
}

/// y = x Wᵀ + b.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    dispatch!(x, linear(x, w, b))
}

/// Gradients of [`linear`]: (dL/dx = g W, dL/dW = gᵀ x, dL/db = Σ_n g).
pub fn linear_backward(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    dispatch!(x, linear_backward(x, w, grad))
}

/// dL/dx of [`linear`] alone (`g W`): the first output of [`linear_backward`].
pub fn linear_backward_input(w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    dispatch!(grad, linear_backward_input(w, grad))
}

/// Row-wise log-softmax.
pub fn log_softmax(z: &Tensor) -> Result<Tensor> {
    z.broadcast_sub(&z.log_sum_exp(D::Minus1)?.unsqueeze(1)?)
}

/// One-hot rows of `labels` (`[N]`, u32) over `classes`, in `dtype`.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let n = labels.dim(0)?;
    let range = Tensor::arange(0u32, classes as u32, labels.device())?.reshape((1, classes))?;
    labels
        .reshape((n, 1))?
        .broadcast_eq(&range.broadcast_as((n, classes))?)?
        .to_dtype(dtype)
}

/// Batch-mean cross-entropy and its gradient: (L, softmax(z) − onehot(y)) / N.
pub fn cross_entropy(z: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, classes) = z.dims2()?;
    let log_p = log_softmax(z)?;
    let y = one_hot(labels, classes, z.dtype())?;
    let loss = (log_p.mul(&y)?.sum_all()? * (-1.0 / n as f64))?;
    let grad = ((log_p.exp()? - y)? / n as f64)?;
    Ok((loss, grad))
}

/// Batch-mean C&W margin loss −relu(z_y − max_{k≠y} z_k + κ) and its gradient (first index
/// wins ties of the max; zero gradient at the kink, as the reference).
pub fn cw_loss(z: &Tensor, labels: &Tensor, kappa: f64) -> Result<(Tensor, Tensor)> {
    let (n, classes) = z.dims2()?;
    let y = one_hot(labels, classes, z.dtype())?;
    let z_y = z.mul(&y)?.sum_keepdim(1)?;
    // Replace the true class by the lowest finite f32 value, then take the first maximum.
    let lowest = (z.ones_like()? * f64::from(f32::MIN))?;
    let others = y.gt(0.5)?.where_cond(&lowest, z)?;
    let other_max = others.max_keepdim(1)?;
    let is_max = others.broadcast_eq(&other_max)?.to_dtype(z.dtype())?;
    let first = is_max.mul(&is_max.cumsum(1)?.eq(1.0)?.to_dtype(z.dtype())?)?;
    let margin = ((z_y - other_max)? + kappa)?;
    let active = margin.gt(0.0)?.to_dtype(z.dtype())?;
    let loss = (margin.relu()?.sum_all()? * (-1.0 / n as f64))?;
    let grad = ((first - y)?.broadcast_mul(&active)? / n as f64)?;
    Ok((loss, grad))
}

/// Mean squared error over all elements and its gradient 2(a − b)/numel.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let diff = (a - b)?;
    let numel = diff.elem_count() as f64;
    let loss = (diff.sqr()?.sum_all()? / numel)?;
    let grad = (diff * (2.0 / numel))?;
    Ok((loss, grad))
}

/// The ensemble output log(max(mean_m softmax(z_m), floor)) and, given dL/d(output), the
/// gradient to each member's logits (`eio_reference::loss::log_mean_softmax_backward`).
pub fn log_mean_softmax(members: &[Tensor], floor: f64) -> Result<Tensor> {
    let stacked = Tensor::stack(
        &members
            .iter()
            .map(log_softmax)
            .collect::<Result<Vec<_>>>()?,
        0,
    )?;
    let log_m = (members.len() as f64).ln();
    let log_p = (stacked.log_sum_exp(0)? - log_m)?;
    log_p.maximum(floor.ln())
}

/// Backward of [`log_mean_softmax`].
pub fn log_mean_softmax_backward(
    members: &[Tensor],
    floor: f64,
    grad: &Tensor,
) -> Result<Vec<Tensor>> {
    let log_probs = members
        .iter()
        .map(log_softmax)
        .collect::<Result<Vec<_>>>()?;
    let stacked = Tensor::stack(&log_probs, 0)?;
    let m = members.len() as f64;
    let log_p = (stacked.log_sum_exp(0)? - m.ln())?;
    let kept = log_p.ge(floor.ln())?.to_dtype(grad.dtype())?;
    let g = grad.mul(&kept)?;
    log_probs
        .iter()
        .map(|lp| {
            let s = lp.exp()?;
            // r_m = s_m / (M p)
            let r = (lp - &log_p)?.exp()? / m;
            let gr = g.mul(&r?)?;
            gr.sub(&s.broadcast_mul(&gr.sum_keepdim(1)?)?)
        })
        .collect()
}

/// sign(x) with sign(0) = 0.
pub fn sign(x: &Tensor) -> Result<Tensor> {
    x.sign()
}

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
//!   BatchNorm, ReLU, residual-add and linear ops, which are nearly all of a step's time. The
//!   interpreter ([`crate::model`]) runs a BatchNorm or residual add and the ReLU after it as one
//!   op ([`batch_norm_relu`], [`add_relu`]) and their backward as one
//!   ([`relu_batch_norm_backward`]): the same values as the ops one after the other, in fewer
//!   passes over memory;
//! * anything else (CUDA): the stock candle ops of [`stock`]. The GPU hot path of a later issue
//!   (cuDNN convolutions, fused BatchNorm and update kernels) replaces that branch.
//!
//! The remaining ops are stock candle ops everywhere. No CPU op of the engine goes through
//! candle's CPU matmul, whose `utils::get_num_threads` re-reads `/proc/cpuinfo` on every call
//! in candle 0.11.1 unless `RAYON_NUM_THREADS` is set: the kernels size their parallelism from
//! rayon's global pool (`RAYON_NUM_THREADS`, else the available parallelism), read once.
//!
//! Shapes: feature maps are NCHW, vectors `[N, F]`, per-channel tensors `[C]`.

mod alignment;
mod cpu;
mod cpu_kernels;
mod direct_conv;
pub mod rivals;
mod stock;
mod tangent;

pub use alignment::{cosine, cosine_backward, pair_cosines, pair_directions, COSINE_EPS};
pub use tangent::*;

use candle_core::{DType, Device, Result, Tensor, D};
use eio_spec::attack::{DiversityDraw, Interpolation};

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

/// dL/dw of [`conv2d`] alone: the same value as the second output of [`conv2d_backward`]
/// (the same kernel on the CPU), without dL/dx. Path batching takes each group's dL/dw from
/// its images ([`Tensor::narrow`] views), so that the groups' sums are those of their own
/// passes.
pub fn conv2d_backward_weight(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    dispatch!(x, conv2d_backward_weight(x, w, grad, stride, padding))
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

/// What a BatchNorm forward pass leaves for its backward and for the running update.
///
/// A pass over a batch of several segments (path batching: consecutive runs of images that
/// BatchNorm treats as batches of their own, see [`crate::model::forward_groups`]) normalises
/// each segment with its own parameters and statistics: every per-channel tensor then holds
/// `S·C` values, segment s's channels at `s·C..(s+1)·C`, and each backward pass treats each
/// segment as the pass over that segment alone would, bit for bit.
#[derive(Debug, Clone)]
pub struct BnSaved {
    /// The normalised input x̂, when the pass wrote it: the stock ops write it in train mode,
    /// whose dL/dx reads it; the CPU never does, its backward pass computes x̂ again from the
    /// input element by element, and [`BnSaved::x_hat`] computes the tensor when asked.
    pub x_hat: Option<Tensor>,
    /// The BatchNorm's input x (the same storage as the pass's output of the node before).
    pub input: Tensor,
    /// The mean x was normalised with, `[S·C]`: the batch mean (train), the running mean (eval).
    pub mean: Tensor,
    /// 1 / sqrt(var + eps), `[S·C]`.
    pub inv_std: Tensor,
    /// Batch mean, `[S·C]` (train mode only).
    pub batch_mean: Option<Tensor>,
    /// Biased batch variance, `[S·C]` (train mode only).
    pub batch_var: Option<Tensor>,
    /// Images per segment (one entry, the batch size, for a pass over one batch).
    pub segments: Vec<usize>,
}

impl BnSaved {
    /// x̂ = (x − mean_c)·inv_std_c: the saved tensor, or (on the CPU) the same values computed
    /// again from the input.
    ///
    /// # Errors
    /// On a device error.
    pub fn x_hat(&self) -> Result<Tensor> {
        match &self.x_hat {
            Some(x_hat) => Ok(x_hat.clone()),
            None if self.segments.len() > 1 => {
                let parts = (0..self.segments.len())
                    .map(|s| self.segment(s)?.x_hat())
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            }
            None => dispatch!(self.input, batch_norm_x_hat(self)),
        }
    }

    /// What the pass over segment `s` alone would have saved (views, no copies).
    ///
    /// # Errors
    /// If `s` is not a segment of the pass.
    pub fn segment(&self, s: usize) -> Result<BnSaved> {
        let Some(&len) = self.segments.get(s) else {
            candle_core::bail!("batch norm: segment {s} of {}", self.segments.len())
        };
        let start: usize = self.segments[..s].iter().sum();
        let c = self.input.dim(1)?;
        let stat = |t: &Tensor| t.narrow(0, s * c, c);
        Ok(BnSaved {
            x_hat: self
                .x_hat
                .as_ref()
                .map(|t| t.narrow(0, start, len))
                .transpose()?,
            input: self.input.narrow(0, start, len)?,
            mean: stat(&self.mean)?,
            inv_std: stat(&self.inv_std)?,
            batch_mean: self.batch_mean.as_ref().map(stat).transpose()?,
            batch_var: self.batch_var.as_ref().map(stat).transpose()?,
            segments: vec![len],
        })
    }
}

/// Checks that `segments` (images per segment) cover the `n` images of a batch, and that the
/// per-channel tensors hold one set of `c` values per segment.
fn check_segments(
    what: &str,
    n: usize,
    c: usize,
    segments: &[usize],
    per_channel: &[&Tensor],
) -> Result<()> {
    if segments.is_empty() || segments.contains(&0) || segments.iter().sum::<usize>() != n {
        candle_core::bail!("{what}: segments {segments:?} do not split a batch of {n}");
    }
    for t in per_channel {
        if t.dims() != [segments.len() * c] {
            candle_core::bail!(
                "{what}: per-channel tensor {:?} for {} segments of {c} channels",
                t.dims(),
                segments.len()
            );
        }
    }
    Ok(())
}

/// Each segment's index, first image and image count.
fn segment_ranges(segments: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    segments.iter().enumerate().scan(0, |start, (s, &len)| {
        let first = *start;
        *start += len;
        Some((s, first, len))
    })
}

/// Segment `s`'s `c` values of a per-channel tensor `[S·C]`.
fn channels_of(t: &Tensor, s: usize, c: usize) -> Result<Tensor> {
    t.narrow(0, s * c, c)
}

/// The segments' saved values joined into one [`BnSaved`] for the whole batch `x`.
fn join_saved(x: &Tensor, parts: Vec<BnSaved>, segments: &[usize]) -> Result<BnSaved> {
    let cat = |f: &dyn Fn(&BnSaved) -> Option<Tensor>, dim: usize| -> Result<Option<Tensor>> {
        let all: Option<Vec<Tensor>> = parts.iter().map(f).collect();
        all.map(|ts| Tensor::cat(&ts, dim)).transpose()
    };
    Ok(BnSaved {
        x_hat: cat(&|p| p.x_hat.clone(), 0)?,
        input: x.clone(),
        mean: cat(&|p| Some(p.mean.clone()), 0)?.expect("every part has a mean"),
        inv_std: cat(&|p| Some(p.inv_std.clone()), 0)?.expect("every part has inv_std"),
        batch_mean: cat(&|p| p.batch_mean.clone(), 0)?,
        batch_var: cat(&|p| p.batch_var.clone(), 0)?,
        segments: segments.to_vec(),
    })
}

/// Joins optional per-segment maps along the batch dimension.
fn join_maps(parts: Vec<Option<Tensor>>) -> Result<Option<Tensor>> {
    let all: Option<Vec<Tensor>> = parts.into_iter().collect();
    all.map(|ts| Tensor::cat(&ts, 0)).transpose()
}

/// dL/dx of a convolution whose output an eval-mode BatchNorm read, from `grad` at the
/// BatchNorm's output (or, with `mask`, at the output of the ReLU after it): the value of
/// [`conv2d_backward_input`] of [`relu_batch_norm_backward_input`] (eval mode; without a mask,
/// [`batch_norm_backward_input`]), bit for bit. The CPU's direct kernel computes BatchNorm's
/// dL/dx while copying each image in, so it is never written out (input gradients of Eq. 2 and
/// of attacks).
pub fn conv2d_backward_input_through_bn(
    x: &Tensor,
    w: &Tensor,
    (grad, mask): (&Tensor, Option<&Tensor>),
    (gamma, saved): (&Tensor, &BnSaved),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let segments = &saved.segments;
    check_segments(
        "conv2d backward through batch norm",
        grad.dim(0)?,
        grad.dim(1)?,
        segments,
        &[gamma, &saved.inv_std],
    )?;
    match (grad.device(), grad.dtype()) {
        (Device::Cpu, DType::F32) => cpu::conv2d_backward_input_scaled::<f32>(
            x,
            w,
            (grad, mask),
            (gamma, &saved.inv_std, segments),
            stride,
            padding,
        ),
        (Device::Cpu, DType::F64) => cpu::conv2d_backward_input_scaled::<f64>(
            x,
            w,
            (grad, mask),
            (gamma, &saved.inv_std, segments),
            stride,
            padding,
        ),
        _ => {
            let dy = bn_backward_input(mask, gamma, saved, grad, false)?;
            conv2d_backward_input(x, w, &dy, stride, padding)
        }
    }
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
    let (y, _, saved) = batch_norm_outputs(
        x,
        (gamma, beta),
        (running_mean, running_var),
        train,
        None,
        (true, false),
        &[x.dim(0)?],
    )?;
    Ok((y.expect("asked for y"), saved))
}

/// BatchNorm followed by a ReLU, fused: `(y, max(y, 0), saved)` with y = [`batch_norm`]'s
/// output, `None` unless `keep_y` (a pass that drops activations needs only the ReLU's), and
/// the ReLU `None` unless `relu`. The values are those of [`batch_norm`] then [`relu`]; the CPU
/// writes both in one pass over x.
///
/// `segments` (images per segment) splits the batch into segments normalised as batches of
/// their own, with per-channel tensors of `S·C` values (see [`BnSaved`]); `&[N]` for one batch.
pub fn batch_norm_relu(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (running_mean, running_var): (&Tensor, &Tensor),
    train: bool,
    (keep_y, relu): (bool, bool),
    segments: &[usize],
) -> Result<(Option<Tensor>, Option<Tensor>, BnSaved)> {
    batch_norm_outputs(
        x,
        (gamma, beta),
        (running_mean, running_var),
        train,
        None,
        (keep_y, relu),
        segments,
    )
}

/// The end of a residual block fused: BatchNorm of `x`, the add of `residual` (the shortcut)
/// and, when `relu`, the ReLU after it: `(y + residual, max(y + residual, 0), saved)` with
/// y = [`batch_norm`]'s output, the sum `None` unless `keep_sum` and the ReLU `None` unless
/// `relu`. The values are those of [`batch_norm`], [`add`] and [`relu`] in turn (the add is
/// commutative in floating point, so the order of the plan's add inputs does not matter); the
/// CPU writes them in one pass over x and the residual, and never writes y. `segments` as in
/// [`batch_norm_relu`].
pub fn batch_norm_add_relu(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (running_mean, running_var): (&Tensor, &Tensor),
    train: bool,
    residual: &Tensor,
    (keep_sum, relu): (bool, bool),
    segments: &[usize],
) -> Result<(Option<Tensor>, Option<Tensor>, BnSaved)> {
    batch_norm_outputs(
        x,
        (gamma, beta),
        (running_mean, running_var),
        train,
        Some(residual),
        (keep_sum, relu),
        segments,
    )
}

/// The forward pass behind [`batch_norm`], [`batch_norm_relu`] and [`batch_norm_add_relu`].
fn batch_norm_outputs(
    x: &Tensor,
    affine: (&Tensor, &Tensor),
    running: (&Tensor, &Tensor),
    train: bool,
    residual: Option<&Tensor>,
    (keep_y, relu): (bool, bool),
    segments: &[usize],
) -> Result<(Option<Tensor>, Option<Tensor>, BnSaved)> {
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    check_segments(
        "batch norm",
        n,
        c,
        segments,
        &[affine.0, affine.1, running.0, running.1],
    )?;
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) => cpu::batch_norm::<f32>(
            x,
            affine,
            running,
            train,
            residual,
            (keep_y, relu),
            segments,
        ),
        (Device::Cpu, DType::F64) => cpu::batch_norm::<f64>(
            x,
            affine,
            running,
            train,
            residual,
            (keep_y, relu),
            segments,
        ),
        _ if segments.len() > 1 => batch_norm_per_segment(
            x,
            affine,
            running,
            train,
            residual,
            (keep_y, relu),
            segments,
        ),
        _ => {
            let (y, saved) = stock::batch_norm(x, affine.0, affine.1, running.0, running.1, train)?;
            let y = match residual {
                Some(r) => (y + r)?,
                None => y,
            };
            let z = relu.then(|| y.relu()).transpose()?;
            Ok((keep_y.then_some(y), z, saved))
        }
    }
}

/// [`batch_norm_outputs`] of each segment on its own, joined (how the stock ops batch paths).
fn batch_norm_per_segment(
    x: &Tensor,
    affine: (&Tensor, &Tensor),
    running: (&Tensor, &Tensor),
    train: bool,
    residual: Option<&Tensor>,
    keep: (bool, bool),
    segments: &[usize],
) -> Result<(Option<Tensor>, Option<Tensor>, BnSaved)> {
    let c = x.dim(1)?;
    let (mut ys, mut zs, mut saved) = (Vec::new(), Vec::new(), Vec::new());
    for (s, start, len) in segment_ranges(segments) {
        let ch = |t: &Tensor| channels_of(t, s, c);
        let residual = residual.map(|r| r.narrow(0, start, len)).transpose()?;
        let (y, z, part) = batch_norm_outputs(
            &x.narrow(0, start, len)?,
            (&ch(affine.0)?, &ch(affine.1)?),
            (&ch(running.0)?, &ch(running.1)?),
            train,
            residual.as_ref(),
            keep,
            &[len],
        )?;
        ys.push(y);
        zs.push(z);
        saved.push(part);
    }
    Ok((
        join_maps(ys)?,
        join_maps(zs)?,
        join_saved(x, saved, segments)?,
    ))
}

/// PyTorch's running-statistics update after a train-mode pass, from segment `segment`'s
/// batch statistics (over its N·H·W values): running = (1 − m)·running + m·batch, with the
/// unbiased variance for `running_var`. A pass over one batch has the one segment 0; the
/// segments of a batched pass update in turn, each from the statistics the one before left.
pub fn batch_norm_running_update(
    running_mean: &Tensor,
    running_var: &Tensor,
    saved: &BnSaved,
    segment: usize,
) -> Result<(Tensor, Tensor)> {
    let saved = saved.segment(segment)?;
    let (Some(mean), Some(var)) = (&saved.batch_mean, &saved.batch_var) else {
        return Ok((running_mean.clone(), running_var.clone()));
    };
    let (n, _, h, w) = saved.input.dims4()?;
    let count = (n * h * w) as f64;
    let unbiased = (var * (count / (count - 1.0)))?;
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
    bn_backward(None, gamma, saved, grad, train)
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
    bn_backward_input(None, gamma, saved, grad, train)
}

/// Gradients of [`batch_norm_relu`] from dL/d(ReLU output) `grad`: [`batch_norm_backward`] of
/// [`relu_backward`]`(mask, grad)`, where `mask` is the ReLU's input or output (the same sign).
/// The CPU applies the ReLU's mask inside BatchNorm's passes instead of a pass of its own.
pub fn relu_batch_norm_backward(
    mask: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    bn_backward(Some(mask), gamma, saved, grad, train)
}

/// dL/dx of [`relu_batch_norm_backward`] alone.
pub fn relu_batch_norm_backward_input(
    mask: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<Tensor> {
    bn_backward_input(Some(mask), gamma, saved, grad, train)
}

fn bn_backward(
    mask: Option<&Tensor>,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (gx, params) = bn_backward_any(mask, gamma, saved, grad, (train, true))?;
    let (gg, gb) = params.expect("asked for the parameter gradients");
    Ok((gx, gg, gb))
}

fn bn_backward_input(
    mask: Option<&Tensor>,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    train: bool,
) -> Result<Tensor> {
    Ok(bn_backward_any(mask, gamma, saved, grad, (train, false))?.0)
}

/// dL/dx of BatchNorm (of the ReLU's masked gradient when `mask` is set) and, with
/// `params`, (dL/dγ, dL/dβ).
fn bn_backward_any(
    mask: Option<&Tensor>,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    (train, params): (bool, bool),
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    check_segments(
        "batch norm backward",
        grad.dim(0)?,
        grad.dim(1)?,
        &saved.segments,
        &[gamma, &saved.mean, &saved.inv_std],
    )?;
    match (grad.device(), grad.dtype()) {
        (Device::Cpu, DType::F32) => {
            cpu::batch_norm_backward::<f32>(mask, gamma, saved, grad, (train, params))
        }
        (Device::Cpu, DType::F64) => {
            cpu::batch_norm_backward::<f64>(mask, gamma, saved, grad, (train, params))
        }
        _ if saved.segments.len() > 1 => {
            bn_backward_per_segment(mask, gamma, saved, grad, (train, params))
        }
        _ => {
            let grad = match mask {
                Some(m) => stock::relu_backward(m, grad)?,
                None => grad.clone(),
            };
            if params {
                let (gx, gg, gb) = stock::batch_norm_backward(gamma, saved, &grad, train)?;
                Ok((gx, Some((gg, gb))))
            } else {
                Ok((
                    stock::batch_norm_backward_input(gamma, saved, &grad, train)?,
                    None,
                ))
            }
        }
    }
}

/// [`bn_backward_any`] of each segment on its own, joined (how the stock ops batch paths).
fn bn_backward_per_segment(
    mask: Option<&Tensor>,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    (train, params): (bool, bool),
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let c = grad.dim(1)?;
    let (mut gx, mut gg, mut gb) = (Vec::new(), Vec::new(), Vec::new());
    for (s, start, len) in segment_ranges(&saved.segments) {
        let mask = mask.map(|m| m.narrow(0, start, len)).transpose()?;
        let (x, p) = bn_backward_any(
            mask.as_ref(),
            &channels_of(gamma, s, c)?,
            &saved.segment(s)?,
            &grad.narrow(0, start, len)?,
            (train, params),
        )?;
        gx.push(x);
        if let Some((g, b)) = p {
            gg.push(g);
            gb.push(b);
        }
    }
    let params = params
        .then(|| Ok::<_, candle_core::Error>((Tensor::cat(&gg, 0)?, Tensor::cat(&gb, 0)?)))
        .transpose()?;
    Ok((Tensor::cat(&gx, 0)?, params))
}

/// max(x, 0) (CPU: one parallel pass).
pub fn relu(x: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) => cpu::relu::<f32>(x),
        (Device::Cpu, DType::F64) => cpu::relu::<f64>(x),
        _ => x.relu(),
    }
}

/// dL/dx of [`relu`]: g where x > 0, else 0 (CPU: one fused pass).
pub fn relu_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) => cpu::relu_backward::<f32>(x, grad, None),
        (Device::Cpu, DType::F64) => cpu::relu_backward::<f64>(x, grad, None),
        _ => stock::relu_backward(x, grad),
    }
}

/// [`relu_backward`] of the sum of two gradients, `(a + b)` where x > 0, else 0: the same bits
/// as [`add`] then [`relu_backward`] (a backward pass where a ReLU's output has two readers,
/// a residual block's output). The CPU does both in one pass, never writing the sum.
pub fn relu_backward_of_sum(x: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match (x.device(), x.dtype()) {
        (Device::Cpu, DType::F32) => cpu::relu_backward::<f32>(x, a, Some(b)),
        (Device::Cpu, DType::F64) => cpu::relu_backward::<f64>(x, a, Some(b)),
        _ => stock::relu_backward(x, &add(a, b)?),
    }
}

/// a + b (CPU: one parallel pass).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(add_relu(a, b, (true, false))?.0.expect("asked for the sum"))
}

/// A residual add and the ReLU after it: `(a + b, max(a + b, 0))`, the sum when `keep_sum`
/// and the ReLU when `relu` is set. CPU: one parallel pass writes both.
pub fn add_relu(
    a: &Tensor,
    b: &Tensor,
    (keep_sum, relu): (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    match (a.device(), a.dtype()) {
        (Device::Cpu, DType::F32) => cpu::add_relu::<f32>(a, b, (keep_sum, relu)),
        (Device::Cpu, DType::F64) => cpu::add_relu::<f64>(a, b, (keep_sum, relu)),
        _ => {
            let sum = (a + b)?;
            let z = relu.then(|| sum.relu()).transpose()?;
            Ok((keep_sum.then_some(sum), z))
        }
    }
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

/// DVERGE's C&W variant (`eio_reference::loss::cw_dverge_loss`): the true class masked to 0,
/// so the best wrong logit is max(0, max_{k≠y} z_k) (first maximum; no gradient when it is
/// the masked entry).
pub fn cw_dverge_loss(z: &Tensor, labels: &Tensor, kappa: f64) -> Result<(Tensor, Tensor)> {
    let (n, _) = z.dims2()?;
    let y = one_hot(labels, z.dim(1)?, z.dtype())?;
    let z_y = z.mul(&y)?.sum_keepdim(1)?;
    let masked = y.gt(0.5)?.where_cond(&z.zeros_like()?, z)?;
    let other_max = masked.max_keepdim(1)?;
    let is_max = masked.broadcast_eq(&other_max)?.to_dtype(z.dtype())?;
    let first = is_max.mul(&is_max.cumsum(1)?.eq(1.0)?.to_dtype(z.dtype())?)?;
    // The first maximum at the masked entry is a constant: no gradient to it.
    let first = (first.clone() - first.mul(&y)?)?;
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

/// [`mse`] of each of `groups` equal parts of the batch (path batching: one part per path):
/// each part's loss, and the gradient of every part's loss in one tensor. Each value is the
/// one [`mse`] gives for that part alone.
pub fn mse_groups(a: &Tensor, b: &Tensor, groups: usize) -> Result<(Vec<Tensor>, Tensor)> {
    let n = a.dim(0)?;
    if groups == 0 || !n.is_multiple_of(groups) {
        candle_core::bail!("mse: a batch of {n} does not split into {groups} groups");
    }
    let per = n / groups;
    let diff = (a - b)?;
    let numel = (diff.elem_count() / groups) as f64;
    let losses = (0..groups)
        .map(|g| diff.narrow(0, g * per, per)?.sqr()?.sum_all()? / numel)
        .collect::<Result<Vec<_>>>()?;
    let grad = (diff * (2.0 / numel))?;
    Ok((losses, grad))
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

/// The momentum of MI-FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum",
/// Eq. 6), also Eq. 2's distillation momentum (DVERGE): per sample n of `grad` (`[N, C, H, W]`),
///
/// ```text
/// m_n = μ·m'_n + g_n / max(‖g_n‖₁, MOMENTUM_L1_FLOOR)
/// ```
///
/// with m' = `previous` (the first step has none: m_n = g_n / max(‖g_n‖₁, floor)) and
/// μ = `decay` (`eio_reference::momentum::l1_momentum`).
pub fn l1_momentum(previous: Option<&Tensor>, grad: &Tensor, decay: f64) -> Result<Tensor> {
    let l1 = grad
        .abs()?
        .flatten_from(1)?
        .sum_keepdim(1)?
        .maximum(eio_spec::attack::MOMENTUM_L1_FLOOR)?;
    let normalised = grad.broadcast_div(&l1.reshape((l1.dim(0)?, 1, 1, 1))?)?;
    match previous {
        Some(m) => (m * decay)? + normalised,
        None => Ok(normalised),
    }
}

/// The number of entries of `direction` with |d| < `threshold` (a sign step's ties), as a
/// scalar f64 tensor on `direction`'s device (exact up to 2^53, so step counts can be summed
/// on the device and read once).
pub fn count_below(direction: &Tensor, threshold: f64) -> Result<Tensor> {
    direction
        .abs()?
        .lt(threshold)?
        .to_dtype(DType::F64)?
        .sum_all()
}

/// The backward pass through one residual add y = r + s under SGM, the skip-gradient method
/// (Wu et al. 2020, "Skip Connections Matter: On the Transferability of Adversarial Examples
/// Generated with ResNets", Sec. 3): given dL/dy = g,
///
/// ```text
/// ĝ     = g / std(g)   with `normalise`, std unbiased over every element (torch.std); g itself
///                      when std(g) is 0 or not finite (a constant gradient, or one element)
/// dL/dr = γ·ĝ          (the residual branch, γ = `branch_factor`)
/// dL/ds = ĝ            (the skip path)
/// ```
///
/// returned as (dL/dr, dL/ds) (`eio_spec::attack::SkipGradient`,
/// `eio_reference::model::backward_with`). The standard deviation stays on the device.
pub fn skip_gradient_add_backward(
    grad: &Tensor,
    branch_factor: f64,
    normalise: bool,
) -> Result<(Tensor, Tensor)> {
    let g = if normalise {
        let count = grad.elem_count() as f64;
        let mean = (grad.sum_all()? / count)?;
        let squares = grad.broadcast_sub(&mean)?.sqr()?.sum_all()?;
        let std = (squares / (count - 1.0))?.sqrt()?;
        // 0·std is 0 exactly when std is finite (NaN for inf and NaN).
        let usable = std.gt(0.0)?.mul(&(&std * 0.0)?.eq(0.0)?)?;
        let divisor = usable.where_cond(&std, &std.ones_like()?)?;
        grad.broadcast_div(&divisor)?
    } else {
        grad.clone()
    };
    Ok(((&g * branch_factor)?, g))
}

/// The matrix of a 1-D resize from `from` samples to `to` (`[to, from]` row-major, f64), with
/// PyTorch's `F.interpolate` semantics (`eio_spec::attack::Interpolation`):
///
/// * bilinear (`align_corners = False`): output i reads the source coordinate
///   c = max((i + ½)·from/to − ½, 0), i₀ = ⌊c⌋, i₁ = min(i₀ + 1, from − 1), λ = c − i₀:
///   row i holds 1 − λ at i₀ and λ at i₁ (summed when they coincide);
/// * nearest (PyTorch's legacy `mode="nearest"`, which computes in f32): row i holds 1 at
///   min(⌊i·f32(from/to)⌋, from − 1), the product and floor in f32 as well.
fn resize_matrix(from: usize, to: usize, interpolation: Interpolation) -> Vec<f64> {
    let mut m = vec![0.0; to * from];
    for i in 0..to {
        let row = &mut m[i * from..(i + 1) * from];
        match interpolation {
            Interpolation::Bilinear => {
                let c = ((i as f64 + 0.5) * (from as f64 / to as f64) - 0.5).max(0.0);
                let i0 = (c.floor() as usize).min(from - 1);
                let i1 = (i0 + 1).min(from - 1);
                let lambda = c - i0 as f64;
                row[i0] += 1.0 - lambda;
                row[i1] += lambda;
            }
            Interpolation::Nearest => {
                let scale = from as f32 / to as f32;
                row[((i as f32 * scale).floor() as usize).min(from - 1)] = 1.0;
            }
        }
    }
    m
}

/// The `[side, side]` matrix of one axis of an input-diversity draw: the `[size, side]` resize
/// of [`resize_matrix`] placed at rows `offset..offset + size`, zero elsewhere (the padding).
fn diversity_matrix(
    side: usize,
    size: usize,
    offset: usize,
    interpolation: Interpolation,
) -> Vec<f64> {
    let mut m = vec![0.0; side * side];
    m[offset * side..(offset + size) * side].copy_from_slice(&resize_matrix(
        side,
        size,
        interpolation,
    ));
    m
}

/// The row and column matrices (A, B) of `draw` for `[.., H, W]` images (see
/// [`input_diversity`]), as tensors on `device` in `dtype`, transposed when `transpose`.
fn diversity_matrices(
    (h, w): (usize, usize),
    draw: &DiversityDraw,
    interpolation: Interpolation,
    like: &Tensor,
    transpose: bool,
) -> Result<(Tensor, Tensor)> {
    if draw.size == 0 || draw.top + draw.size > h || draw.left + draw.size > w {
        candle_core::bail!("input diversity: draw {draw:?} does not fit {h}x{w} images");
    }
    let matrix = |side: usize, offset: usize| -> Result<Tensor> {
        let m = Tensor::from_vec(
            diversity_matrix(side, draw.size, offset, interpolation),
            (side, side),
            like.device(),
        )?
        .to_dtype(like.dtype())?;
        if transpose {
            m.t()?.contiguous()
        } else {
            Ok(m)
        }
    };
    Ok((matrix(h, draw.top)?, matrix(w, draw.left)?))
}

/// The input-diversity transform of DI²-FGSM (Xie et al. 2019, "Improving Transferability of
/// Adversarial Examples with Input Diversity", Sec. 3.1) for one draw, as torchattacks applies
/// it: every image of `x` (`[N, C, H, W]`) resized to `size` x `size` with PyTorch's
/// `F.interpolate` (`interpolation`), then zero-padded back to H x W with `top` rows above and
/// `left` columns to the left (`eio_reference::input_diversity::input_diversity`).
///
/// The transform is linear and separable: per image and channel
///
/// ```text
/// T(x) = A · x · Bᵀ,   A = P_top · R_H,   B = P_left · R_W
/// ```
///
/// where R_S (`[size, S]`) is the 1-D resize (bilinear weights or a nearest pick per output
/// row) and P_o (`[S, size]`) places its rows at `o..o + size`. A and B are built on the host
/// from the draw; the products run as [`separable`].
///
/// # Errors
/// If the draw does not fit the images, or on a device error.
pub fn input_diversity(
    x: &Tensor,
    draw: &DiversityDraw,
    interpolation: Interpolation,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (a, b) = diversity_matrices((h, w), draw, interpolation, x, false)?;
    separable(x, &a, &b)
}

/// The adjoint of [`input_diversity`] (its backward): dL/dx = Aᵀ · g · B per image and channel
/// of `grad` (`eio_reference::input_diversity::input_diversity_backward`).
///
/// # Errors
/// If the draw does not fit the images, or on a device error.
pub fn input_diversity_backward(
    grad: &Tensor,
    draw: &DiversityDraw,
    interpolation: Interpolation,
) -> Result<Tensor> {
    let (_, _, h, w) = grad.dims4()?;
    let (a_t, b_t) = diversity_matrices((h, w), draw, interpolation, grad, true)?;
    separable(grad, &a_t, &b_t)
}

/// `y[n, c] = L · x[n, c] · Rᵀ` for every image n and channel c of `x` (`[N, C, H, W]`),
/// with `L` `[H, H]` and `R` `[W, W]`. CPU: two GEMMs per plane
/// ([`cpu_kernels::separable`]); elsewhere two batched matmuls.
fn separable(x: &Tensor, left: &Tensor, right: &Tensor) -> Result<Tensor> {
    dispatch!(x, separable(x, left, right))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f64>())
            .expect("host values")
    }

    /// SGM's add backward by hand: g = (1, 2, 3, 4) has mean 5/2 and unbiased variance
    /// (9/4 + 1/4 + 1/4 + 9/4) / 3 = 5/3, so the normalised gradient is g·sqrt(3/5) and the
    /// residual branch gets γ = 0.2 times it; without normalisation g and 0.2·g. A constant
    /// gradient (std 0) and a single element (std 0/0) are left as they are.
    #[test]
    fn skip_gradient_add_backward_by_hand() {
        let g = Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0]], &Device::Cpu).expect("g");
        let (r, s) = skip_gradient_add_backward(&g, 0.2, true).expect("normalised");
        let k = (3.0f64 / 5.0).sqrt();
        for (got, want) in values(&s).iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!(
                (got - want * k).abs() < 1e-15,
                "skip: {got} for {}",
                want * k
            );
        }
        for (got, want) in values(&r).iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((got - 0.2 * want * k).abs() < 1e-15, "branch: {got}");
        }
        let (r, s) = skip_gradient_add_backward(&g, 0.2, false).expect("plain");
        assert_eq!(values(&s), [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(values(&r), [0.2, 0.4, 0.2 * 3.0, 0.8]);
        for constant in [
            Tensor::zeros((2, 3), DType::F64, &Device::Cpu).expect("zeros"),
            Tensor::new(&[7.0f64; 5], &Device::Cpu).expect("constant"),
            Tensor::new(&[-3.0f64], &Device::Cpu).expect("one element"),
        ] {
            let (r, s) = skip_gradient_add_backward(&constant, 0.5, true).expect("constant");
            let want = values(&constant);
            assert_eq!(values(&s), want, "a constant gradient is not normalised");
            let half: Vec<f64> = want.iter().map(|v| v * 0.5).collect();
            assert_eq!(values(&r), half);
        }
    }
}

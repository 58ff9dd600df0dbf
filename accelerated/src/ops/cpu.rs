//! The CPU side of the op seam: borrows the host data of candle tensors, runs the kernels of
//! [`super::cpu_kernels`] and wraps their output vectors as tensors (no copies). Each function
//! has the semantics of its namesake in [`super::stock`]; [`super`] picks one per call.

use candle_core::{bail, Device, Result, Storage, StorageRef, Tensor};

use super::cpu_kernels::{self as k, ConvGeom, Real, Uninit};
use super::BnSaved;

/// Read access to the host data of a contiguous CPU tensor.
struct Host<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl Host<'_> {
    fn slice<T: Real>(&self) -> Result<&[T]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<T>()?[self.start..self.end]),
            _ => bail!("eio cpu kernels: tensor is not on the CPU"),
        }
    }
}

/// Borrows `t`'s host data; `t` must be contiguous (callers make it so).
fn host(t: &Tensor) -> Result<Host<'_>> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("eio cpu kernels: tensor is not contiguous")
    };
    Ok(Host {
        storage,
        start,
        end,
    })
}

/// Runs `f` on the host data of `t` (made contiguous first if it is a strided view).
fn with<T: Real, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let h = host(&t)?;
    f(h.slice::<T>()?)
}

/// Runs `f` on the host data of two tensors.
fn with2<T: Real, R>(a: &Tensor, b: &Tensor, f: impl FnOnce(&[T], &[T]) -> Result<R>) -> Result<R> {
    with(a, |a| with(b, |b| f(a, b)))
}

fn tensor<T: Real>(data: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, dims, &Device::Cpu)
}

fn to_real<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

fn geometry(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<ConvGeom> {
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_out, c_in_w, kh, kw) = w.dims4()?;
    if c_in != c_in_w || h + 2 * padding < kh || wd + 2 * padding < kw || stride == 0 {
        bail!(
            "conv2d: input {:?} does not fit kernel {:?} (stride {stride}, padding {padding})",
            x.dims(),
            w.dims()
        );
    }
    Ok(ConvGeom {
        n,
        c_in,
        h,
        w: wd,
        c_out,
        kh,
        kw,
        stride,
        padding,
    })
}

/// See [`super::stock::conv2d`].
pub fn conv2d<T: Real>(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let g = geometry(x, w, stride, padding)?;
    let mut y = Uninit::<T>::new(g.n * g.c_out * g.out_h() * g.out_w());
    with2(x, w, |x, w| {
        k::conv2d(&g, x, w, y.slots());
        Ok(())
    })?;
    // SAFETY: `conv2d` writes every element of its output.
    tensor(
        unsafe { y.written() },
        &[g.n, g.c_out, g.out_h(), g.out_w()],
    )
}

/// See [`super::stock::conv2d_backward`].
pub fn conv2d_backward<T: Real>(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<(Tensor, Tensor)> {
    let g = geometry(x, w, stride, padding)?;
    check_grad(&g, grad)?;
    let mut dx = Uninit::<T>::new(g.n * g.c_in * g.h * g.w);
    let dw = with2(w, grad, |w, dy| {
        k::conv2d_backward_input(&g, w, dy, dx.slots());
        with(x, |x| Ok(k::conv2d_backward_weight(&g, x, dy)))
    })?;
    // SAFETY: `conv2d_backward_input` writes every element of its output.
    let dx = unsafe { dx.written() };
    Ok((tensor(dx, x.dims())?, tensor(dw, w.dims())?))
}

/// See [`super::stock::conv2d_backward_weight`]: the dL/dw half of [`conv2d_backward`].
pub fn conv2d_backward_weight<T: Real>(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = geometry(x, w, stride, padding)?;
    check_grad(&g, grad)?;
    let dw = with2(x, grad, |x: &[T], dy| {
        Ok(k::conv2d_backward_weight(&g, x, dy))
    })?;
    tensor(dw, w.dims())
}

/// See [`super::stock::conv2d_backward_input`]: the dL/dx half of [`conv2d_backward`].
pub fn conv2d_backward_input<T: Real>(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = geometry(x, w, stride, padding)?;
    check_grad(&g, grad)?;
    let mut dx = Uninit::<T>::new(g.n * g.c_in * g.h * g.w);
    with2(w, grad, |w, dy| {
        k::conv2d_backward_input(&g, w, dy, dx.slots());
        Ok(())
    })?;
    // SAFETY: `conv2d_backward_input` writes every element of its output.
    tensor(unsafe { dx.written() }, x.dims())
}

/// See [`super::conv2d_backward_input_through_bn`]: [`conv2d_backward_input`] of
/// `scale_c · masked(grad, mask)` with `scale = γ·inv_std` ([`k::ScaledGrad`]), read on the fly;
/// each segment's images with the segment's scale (`gamma`, `inv_std`: `[S·C]`, checked by
/// the caller).
pub fn conv2d_backward_input_scaled<T: Real>(
    x: &Tensor,
    w: &Tensor,
    (grad, mask): (&Tensor, Option<&Tensor>),
    (gamma, inv_std, segments): (&Tensor, &Tensor, &[usize]),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let g = geometry(x, w, stride, padding)?;
    check_grad(&g, grad)?;
    check_mask("conv2d backward through relu", mask, grad)?;
    let scale = bn_scale::<T>(gamma, inv_std)?;
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let mask_host = mask.as_ref().map(host).transpose()?;
    let mask = mask_host.as_ref().map(|m| m.slice::<T>()).transpose()?;
    let mut dx = Uninit::<T>::new(g.n * g.c_in * g.h * g.w);
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_h() * g.out_w());
    with2(w, grad, |w, dy| {
        let mut first = 0;
        for (s, &len) in segments.iter().enumerate() {
            let part = ConvGeom { n: len, ..g };
            let out = first * out_image..(first + len) * out_image;
            let dy = k::ScaledGrad {
                grad: &dy[out.clone()],
                mask: mask.map(|m| &m[out]),
                scale: &scale[s * g.c_out..(s + 1) * g.c_out],
            };
            let dx = &mut dx.slots()[first * in_image..(first + len) * in_image];
            k::conv2d_backward_input_scaled(&part, w, dy, dx);
            first += len;
        }
        Ok(())
    })?;
    // SAFETY: `conv2d_backward_input_scaled` writes every element of its output, one segment
    // after the other, and the segments cover the batch.
    tensor(unsafe { dx.written() }, x.dims())
}

/// BatchNorm's dL/dx scale per channel, `γ_c·inv_std_c`: one expression for every backward
/// pass that applies it, so they give the same bits.
fn bn_scale<T: Real>(gamma: &Tensor, inv_std: &Tensor) -> Result<Vec<T>> {
    with2(gamma, inv_std, |gamma: &[T], inv_std| {
        Ok(gamma.iter().zip(inv_std).map(|(&g, &s)| g * s).collect())
    })
}

/// A ReLU mask must have the gradient's shape.
fn check_mask(what: &str, mask: Option<&Tensor>, grad: &Tensor) -> Result<()> {
    if let Some(m) = mask {
        if m.dims() != grad.dims() {
            bail!("{what}: mask {:?}, gradient {:?}", m.dims(), grad.dims());
        }
    }
    Ok(())
}

fn check_grad(g: &ConvGeom, grad: &Tensor) -> Result<()> {
    let want = [g.n, g.c_out, g.out_h(), g.out_w()];
    if grad.dims() != want {
        bail!(
            "conv2d backward: gradient {:?}, output is {want:?}",
            grad.dims()
        );
    }
    Ok(())
}

/// [`super::batch_norm`], [`super::batch_norm_relu`] and [`super::batch_norm_add_relu`]: one
/// statistics pass (train mode), then one pass writing y (BatchNorm's output, plus `residual`
/// when given; when `keep_y`) and max(y, 0) (when `relu`). x̂ is not written: the backward
/// pass computes it again from the input ([`k::Normalised`]). Each segment (images per
/// segment, checked by the caller) runs the same kernels on its own images and `C` values, in
/// place in the batch's outputs.
pub fn batch_norm<T: Real>(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    (running_mean, running_var): (&Tensor, &Tensor),
    train: bool,
    residual: Option<&Tensor>,
    (keep_y, relu): (bool, bool),
    segments: &[usize],
) -> Result<(Option<Tensor>, Option<Tensor>, BnSaved)> {
    let (_, c, h, w) = x.dims4()?;
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            bail!("batch norm + add: {:?} + {:?}", x.dims(), r.dims());
        }
    }
    let x = x.contiguous()?;
    let hx = host(&x)?;
    let xs = hx.slice::<T>()?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let residual_host = residual.as_ref().map(host).transpose()?;
    let residual = residual_host.as_ref().map(|r| r.slice::<T>()).transpose()?;
    let image = c * h * w;
    let images = |first: usize, len: usize| first * image..(first + len) * image;
    let (mean, var) = if train {
        let mut stats = (Vec::new(), Vec::new());
        let mut first = 0;
        for &len in segments {
            let (m, v) = k::batch_stats(&xs[images(first, len)], c, h * w);
            stats.0.extend(m);
            stats.1.extend(v);
            first += len;
        }
        stats
    } else {
        (
            with(running_mean, |m: &[T]| {
                Ok(m.iter().map(|v| v.to_f64()).collect())
            })?,
            with(running_var, |v: &[T]| {
                Ok(v.iter().map(|v| v.to_f64()).collect())
            })?,
        )
    };
    let inv_std: Vec<f64> = var
        .iter()
        .map(|v| 1.0 / (v + super::BN_EPS).sqrt())
        .collect();
    let (mean_t, inv_std_t) = (to_real::<T>(&mean), to_real::<T>(&inv_std));
    let len = xs.len();
    let mut y = keep_y.then(|| Uninit::<T>::new(len));
    let mut z = relu.then(|| Uninit::<T>::new(len));
    with2(gamma, beta, |gamma, beta| {
        let mut first = 0;
        for (s, &n) in segments.iter().enumerate() {
            let (at, ch) = (images(first, n), s * c..(s + 1) * c);
            k::batch_norm_apply(
                &xs[at.clone()],
                (&mean_t[ch.clone()], &inv_std_t[ch.clone()]),
                (&gamma[ch.clone()], &beta[ch]),
                residual.map(|r| &r[at.clone()]),
                h * w,
                k::BnOutputs {
                    y: y.as_mut().map(|y| &mut y.slots()[at.clone()]),
                    relu: z.as_mut().map(|z| &mut z.slots()[at.clone()]),
                },
            );
            first += n;
        }
        Ok(())
    })?;
    let dims = x.dims();
    // SAFETY: `batch_norm_apply` writes every element of each output it is given, one segment
    // after the other, and the segments cover the batch.
    let wrap = |v: Option<Uninit<T>>| v.map(|v| tensor(unsafe { v.written() }, dims)).transpose();
    let per_channel = [segments.len() * c];
    let mean_t = tensor(mean_t, &per_channel)?;
    let saved = BnSaved {
        x_hat: None,
        input: x.clone(),
        batch_mean: train.then(|| mean_t.clone()),
        mean: mean_t,
        inv_std: tensor(inv_std_t, &per_channel)?,
        batch_var: train
            .then(|| tensor(to_real::<T>(&var), &per_channel))
            .transpose()?,
        segments: segments.to_vec(),
    };
    Ok((wrap(y)?, wrap(z)?, saved))
}

/// See [`BnSaved::x_hat`]: `(x − mean_c)·inv_std_c`, the values [`batch_norm`] writes.
pub fn batch_norm_x_hat<T: Real>(saved: &BnSaved) -> Result<Tensor> {
    let (_, _, h, w) = saved.input.dims4()?;
    let mut x_hat = Uninit::<T>::new(saved.input.elem_count());
    with2(&saved.input, &saved.mean, |x, mean| {
        with(&saved.inv_std, |inv_std| {
            k::batch_norm_x_hat(x, mean, inv_std, h * w, x_hat.slots());
            Ok(())
        })
    })?;
    // SAFETY: `batch_norm_x_hat` writes every element of its output.
    tensor(unsafe { x_hat.written() }, saved.input.dims())
}

/// [`super::batch_norm_backward`] (`params`) and [`super::batch_norm_backward_input`], of the
/// ReLU's masked gradient when `mask` is set ([`super::relu_batch_norm_backward`]); each of
/// the pass's segments as the pass over that segment alone (checked by the caller).
pub fn batch_norm_backward<T: Real>(
    mask: Option<&Tensor>,
    gamma: &Tensor,
    saved: &BnSaved,
    grad: &Tensor,
    (train, params): (bool, bool),
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let (_, c, h, w) = grad.dims4()?;
    check_mask("relu + batch norm backward", mask, grad)?;
    let mask = mask.map(Tensor::contiguous).transpose()?;
    let mask_host = mask.as_ref().map(host).transpose()?;
    let mask = mask_host.as_ref().map(|m| m.slice::<T>()).transpose()?;
    let scale = bn_scale::<T>(gamma, &saved.inv_std)?;
    // x̂, computed again from the input, is read by the sums (train mode or parameter
    // gradients) and by a train-mode dx.
    let input = saved.input.contiguous()?;
    let input_host = host(&input)?;
    let input = input_host.slice::<T>()?;
    let (mean, inv_std) = with2(&saved.mean, &saved.inv_std, |mean: &[T], inv_std| {
        Ok((mean.to_vec(), inv_std.to_vec()))
    })?;
    let image = c * h * w;
    let (dx, sums) = with(grad, |g| {
        let mut dx = Uninit::<T>::new(g.len());
        let mut sums = (Vec::new(), Vec::new());
        let mut first = 0;
        for (s, &n) in saved.segments.iter().enumerate() {
            let (at, ch) = (first * image..(first + n) * image, s * c..(s + 1) * c);
            let x_hat = (train || params).then(|| k::Normalised {
                x: &input[at.clone()],
                mean: &mean[ch.clone()],
                inv_std: &inv_std[ch.clone()],
            });
            let grad = k::BnGrad {
                grad: &g[at.clone()],
                mask: mask.map(|m| &m[at.clone()]),
            };
            let part = x_hat.map(|xh| k::batch_norm_grad_sums(grad, xh, c, h * w));
            let count = (n * h * w) as f64;
            let (a, b) = match (&part, train) {
                (Some((sum_g, sum_gx)), true) => (
                    sum_g.iter().map(|s| T::from_f64(s / count)).collect(),
                    sum_gx.iter().map(|s| T::from_f64(s / count)).collect(),
                ),
                _ => (vec![T::zero(); c], vec![T::zero(); c]),
            };
            let dx_x_hat = if train { x_hat } else { None };
            k::batch_norm_backward_input(
                grad,
                dx_x_hat,
                &scale[ch],
                (&a, &b),
                h * w,
                &mut dx.slots()[at],
            );
            if let Some((sum_g, sum_gx)) = part {
                sums.0.extend(sum_g);
                sums.1.extend(sum_gx);
            }
            first += n;
        }
        // SAFETY: `batch_norm_backward_input` writes every element of its output, one segment
        // after the other, and the segments cover the batch.
        Ok((unsafe { dx.written() }, sums))
    })?;
    let per_channel = [saved.segments.len() * c];
    let params = params
        .then(|| {
            Ok::<_, candle_core::Error>((
                tensor(to_real::<T>(&sums.1), &per_channel)?,
                tensor(to_real::<T>(&sums.0), &per_channel)?,
            ))
        })
        .transpose()?;
    Ok((tensor(dx, grad.dims())?, params))
}

/// See [`super::stock::relu_backward`]; with `also`, of the sum `grad + also`
/// ([`super::relu_backward_of_sum`]).
pub fn relu_backward<T: Real>(x: &Tensor, grad: &Tensor, also: Option<&Tensor>) -> Result<Tensor> {
    if x.dims() != grad.dims() || also.is_some_and(|a| a.dims() != grad.dims()) {
        bail!(
            "relu backward: input {:?}, gradient {:?}{}",
            x.dims(),
            grad.dims(),
            also.map_or(String::new(), |a| format!(" + {:?}", a.dims()))
        );
    }
    let mut dx = Uninit::<T>::new(x.elem_count());
    let also = also.map(Tensor::contiguous).transpose()?;
    let also_host = also.as_ref().map(host).transpose()?;
    let also = also_host.as_ref().map(|a| a.slice::<T>()).transpose()?;
    with2(x, grad, |x, g| {
        k::relu_backward(x, g, also, dx.slots());
        Ok(())
    })?;
    // SAFETY: `relu_backward` writes every element of its output.
    tensor(unsafe { dx.written() }, x.dims())
}

/// See [`super::relu`].
pub fn relu<T: Real>(x: &Tensor) -> Result<Tensor> {
    let mut out = Uninit::<T>::new(x.elem_count());
    with(x, |x| {
        k::relu(x, out.slots());
        Ok(())
    })?;
    // SAFETY: `relu` writes every element of its output.
    tensor(unsafe { out.written() }, x.dims())
}

/// See [`super::add_relu`]: `a + b` when `keep_sum`, `max(a + b, 0)` when `relu`.
pub fn add_relu<T: Real>(
    a: &Tensor,
    b: &Tensor,
    (keep_sum, relu): (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if a.dims() != b.dims() {
        bail!("add: {:?} + {:?}", a.dims(), b.dims());
    }
    let len = a.elem_count();
    let mut sum = keep_sum.then(|| Uninit::<T>::new(len));
    let mut z = relu.then(|| Uninit::<T>::new(len));
    with2(a, b, |a, b| {
        k::add_relu(
            a,
            b,
            sum.as_mut().map(Uninit::slots),
            z.as_mut().map(Uninit::slots),
        );
        Ok(())
    })?;
    // SAFETY: `add_relu` writes every element of each output it is given.
    let wrap = |v: Option<Uninit<T>>| {
        v.map(|v| tensor(unsafe { v.written() }, a.dims()))
            .transpose()
    };
    Ok((wrap(sum)?, wrap(z)?))
}

/// See [`super::stock::linear`].
pub fn linear<T: Real>(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, f_in) = x.dims2()?;
    let (f_out, f_in_w) = w.dims2()?;
    if f_in != f_in_w || b.dims() != [f_out] {
        bail!(
            "linear: input {:?}, weight {:?}, bias {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    let mut y = vec![T::zero(); n * f_out];
    with2(x, w, |x, w| {
        with(b, |b| {
            k::linear(x, w, b, f_in, &mut y);
            Ok(())
        })
    })?;
    tensor(y, &[n, f_out])
}

/// See [`super::stock::linear_backward`].
pub fn linear_backward<T: Real>(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, f_in) = x.dims2()?;
    let (f_out, _) = w.dims2()?;
    if w.dims() != [f_out, f_in] || grad.dims() != [n, f_out] {
        bail!(
            "linear backward: input {:?}, weight {:?}, gradient {:?}",
            x.dims(),
            w.dims(),
            grad.dims()
        );
    }
    let (dx, dw, db) = with2(x, w, |x: &[T], w| {
        with(grad, |g| Ok(k::linear_backward(x, w, g, (n, f_in, f_out))))
    })?;
    Ok((
        tensor(dx, &[n, f_in])?,
        tensor(dw, &[f_out, f_in])?,
        tensor(db, &[f_out])?,
    ))
}

/// See [`super::stock::linear_backward_input`].
pub fn linear_backward_input<T: Real>(w: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let (n, f_out) = grad.dims2()?;
    let (f_out_w, f_in) = w.dims2()?;
    if f_out != f_out_w {
        bail!(
            "linear backward: weight {:?}, gradient {:?}",
            w.dims(),
            grad.dims()
        );
    }
    let dx = with2(w, grad, |w: &[T], g| {
        Ok(k::linear_backward_input(w, g, (n, f_in, f_out)))
    })?;
    tensor(dx, &[n, f_in])
}

/// See [`super::stock::separable`].
pub fn separable<T: Real>(x: &Tensor, left: &Tensor, right: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if left.dims() != [h, h] || right.dims() != [w, w] {
        bail!(
            "separable: images {:?}, left {:?}, right {:?}",
            x.dims(),
            left.dims(),
            right.dims()
        );
    }
    let mut y = Uninit::<T>::new(x.elem_count());
    with2(x, left, |x, l| {
        with(right, |r| {
            k::separable(x, l, r, (h, w), y.slots());
            Ok(())
        })
    })?;
    // SAFETY: `separable` writes every element of its output.
    tensor(unsafe { y.written() }, &[n, c, h, w])
}

#[cfg(test)]
mod tests {
    //! Every CPU kernel against its stock-candle namesake on seeded random inputs: f64 to
    //! 1e-12, f32 to 1e-4 (relative to max(1, |expected|)).
    use candle_core::DType;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::stock;
    use super::*;

    fn random(dims: &[usize], dtype: DType, rng: &mut ChaCha8Rng) -> Tensor {
        let len = dims.iter().product();
        let values: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(values, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("host tensor")
    }

    fn tolerance(dtype: DType) -> f64 {
        if dtype == DType::F64 {
            1e-12
        } else {
            1e-4
        }
    }

    #[track_caller]
    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let tol = tolerance(want.dtype());
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("host values")
        };
        for (i, (g, w)) in flat(got).iter().zip(flat(want)).enumerate() {
            let err = (g - w).abs() / w.abs().max(1.0);
            assert!(
                err <= tol,
                "{what}: element {i}: got {g}, want {w} (error {err:e} > {tol:e})"
            );
        }
    }

    /// The outputs of a fused add (+ ReLU): those asked for, bit-identical to `sum` and
    /// `max(sum, 0)`.
    #[track_caller]
    fn assert_sum_relu(
        what: &str,
        (got_sum, got_relu): (Option<Tensor>, Option<Tensor>),
        (keep_sum, relu): (bool, bool),
        sum: &Tensor,
    ) {
        assert_eq!(got_sum.is_some(), keep_sum, "{what}: sum written");
        assert_eq!(got_relu.is_some(), relu, "{what}: relu written");
        if let Some(s) = got_sum {
            assert_same(&format!("{what} sum"), &s, sum);
        }
        if let Some(z) = got_relu {
            assert_same(&format!("{what} relu"), &z, &sum.relu().expect("relu"));
        }
    }

    /// Bit-identical values (the input-only backward ops against the full ones).
    #[track_caller]
    fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let bits = |t: &Tensor| -> Vec<u64> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f64>())
                .expect("host values")
                .into_iter()
                .map(f64::to_bits)
                .collect()
        };
        assert!(bits(got) == bits(want), "{what}: not bit-identical");
    }

    fn run<T: Real>(dtype: DType) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // (n, c_in, size, c_out, k, stride, padding): 3x3 and 1x1, stride 1 and 2 (even and odd
        // sizes, so the strided gradient has rows the forward skipped), batch 1, 5x5 kernels.
        let cases = [
            (1, 3, 8, 4, 3, 1, 1),
            (2, 4, 7, 6, 3, 2, 1),
            (3, 4, 8, 5, 3, 2, 1),
            (3, 5, 8, 4, 1, 2, 0),
            (2, 5, 7, 4, 1, 2, 0),
            (2, 6, 5, 3, 1, 1, 0),
            (4, 2, 9, 3, 3, 2, 0),
            (1, 1, 1, 2, 1, 1, 0),
            (2, 3, 6, 2, 5, 1, 2),
            (5, 8, 4, 16, 3, 1, 1),
            // Batches of several GEMM chunks, the last one short (chunks of 3 images).
            (9, 4, 6, 5, 3, 1, 1),
            (10, 3, 4, 4, 3, 2, 1),
            (11, 6, 3, 4, 1, 1, 0),
            // Stride 1 without padding, and a 5x5 kernel with padding 2, over several chunks.
            (2, 3, 7, 4, 3, 1, 0),
            (3, 2, 9, 3, 5, 1, 2),
            // f32 chunks of 2 images (a 27 x 1024 im2col matrix each), so a thread's range of
            // 3 images ends with a narrower chunk.
            (6, 3, 32, 4, 3, 1, 1),
            // ResNet-20's first stage: one image per chunk (a 144 x 1024 im2col matrix), dL/dx
            // as a convolution of dY with the flipped kernel.
            (9, 16, 32, 4, 3, 1, 1),
            // Rows of 16 and 8 pixels with a partial block of output channels (in f32 on an
            // AVX-512 CPU, the direct kernel, as the two 32-pixel cases above).
            (3, 8, 16, 12, 3, 1, 1),
            (4, 7, 8, 9, 3, 1, 1),
        ];
        for (n, c_in, size, c_out, k, s, p) in cases {
            let what = format!(
                "conv n={n} c_in={c_in} {size}x{size} c_out={c_out} k={k} s={s} p={p} {dtype:?}"
            );
            let x = random(&[n, c_in, size, size], dtype, &mut rng);
            let w = random(&[c_out, c_in, k, k], dtype, &mut rng);
            let y = conv2d::<T>(&x, &w, s, p).expect("cpu conv2d");
            assert_close(
                &what,
                &y,
                &stock::conv2d(&x, &w, s, p).expect("stock conv2d"),
            );
            let g = random(y.dims(), dtype, &mut rng);
            let (dx, dw) = conv2d_backward::<T>(&x, &w, &g, s, p).expect("cpu backward");
            let (sdx, sdw) = stock::conv2d_backward(&x, &w, &g, s, p).expect("stock backward");
            assert_close(&format!("{what} dL/dx"), &dx, &sdx);
            assert_close(&format!("{what} dL/dw"), &dw, &sdw);
            assert_same(
                &format!("{what} dL/dx alone"),
                &conv2d_backward_input::<T>(&x, &w, &g, s, p).expect("cpu dx"),
                &dx,
            );
            assert_same(
                &format!("{what} stock dL/dx alone"),
                &stock::conv2d_backward_input(&x, &w, &g, s, p).expect("stock dx"),
                &sdx,
            );
            // Through an eval-mode BatchNorm (and ReLU): the same bits as BatchNorm's dL/dx
            // written out, then dL/dx of the convolution.
            let c_out = w.dims()[0];
            let gamma = random(&[c_out], dtype, &mut rng);
            let rm = random(&[c_out], dtype, &mut rng);
            let rv = (random(&[c_out], dtype, &mut rng).abs().expect("abs") + 0.1).expect("rv");
            let (bn_y, saved) = super::super::batch_norm(&y, &gamma, &rm, &rm, &rv, false)
                .expect("eval batch norm");
            let mask = bn_y.relu().expect("relu");
            for mask in [None, Some(&mask)] {
                let dy = match mask {
                    Some(m) => {
                        super::super::relu_batch_norm_backward_input(m, &gamma, &saved, &g, false)
                    }
                    None => super::super::batch_norm_backward_input(&gamma, &saved, &g, false),
                }
                .expect("batch norm dL/dx");
                assert_same(
                    &format!("{what} dL/dx through batch norm, mask {}", mask.is_some()),
                    &super::super::conv2d_backward_input_through_bn(
                        &x,
                        &w,
                        (&g, mask),
                        (&gamma, &saved),
                        s,
                        p,
                    )
                    .expect("through batch norm"),
                    &conv2d_backward_input::<T>(&x, &w, &dy, s, p).expect("cpu dx"),
                );
            }
        }
        // A strided view as input: made contiguous first.
        let x = random(&[3, 2, 6, 6], dtype, &mut rng)
            .transpose(0, 1)
            .expect("view");
        let w = random(&[4, 3, 3, 3], dtype, &mut rng);
        assert_close(
            "conv of a transposed view",
            &conv2d::<T>(&x, &w, 1, 1).expect("cpu conv2d"),
            &stock::conv2d(&x, &w, 1, 1).expect("stock conv2d"),
        );

        for (n, c, size) in [(1, 3, 4), (4, 5, 3), (2, 2, 1), (16, 8, 16)] {
            let what = format!("batchnorm n={n} c={c} {size}x{size} {dtype:?}");
            // An offset and scale per channel, so the statistics are far from 0 and 1.
            let x = (random(&[n, c, size, size], dtype, &mut rng) * 3.0)
                .and_then(|t| t + 0.5)
                .expect("x");
            let gamma = random(&[c], dtype, &mut rng);
            let beta = random(&[c], dtype, &mut rng);
            let rm = random(&[c], dtype, &mut rng);
            let rv = (random(&[c], dtype, &mut rng).abs().expect("abs") + 0.1).expect("rv");
            for train in [true, false] {
                let what = format!("{what} train={train}");
                let (y, saved) =
                    super::super::batch_norm(&x, &gamma, &beta, &rm, &rv, train).expect("cpu");
                let (sy, ssaved) =
                    stock::batch_norm(&x, &gamma, &beta, &rm, &rv, train).expect("stock");
                assert_close(&format!("{what} y"), &y, &sy);
                // The CPU keeps no x̂ (its backward computes it again); the computed one is the
                // same.
                assert!(saved.x_hat.is_none(), "{what}: x_hat kept");
                let x_hat = saved.x_hat().expect("x_hat");
                assert_close(
                    &format!("{what} x_hat"),
                    &x_hat,
                    &ssaved.x_hat().expect("x_hat"),
                );
                assert_close(&format!("{what} inv_std"), &saved.inv_std, &ssaved.inv_std);
                assert_eq!(saved.batch_mean.is_some(), train, "{what}: batch mean");
                if let (Some(m), Some(sm)) = (&saved.batch_mean, &ssaved.batch_mean) {
                    assert_close(&format!("{what} mean"), m, sm);
                }
                if let (Some(v), Some(sv)) = (&saved.batch_var, &ssaved.batch_var) {
                    assert_close(&format!("{what} var"), v, sv);
                }
                // The fused BatchNorm + ReLU writes the same y, and max(y, 0).
                for (keep_y, relu) in [(true, true), (false, true), (true, false)] {
                    let (fy, z, fsaved) = super::super::batch_norm_relu(
                        &x,
                        (&gamma, &beta),
                        (&rm, &rv),
                        train,
                        (keep_y, relu),
                        &[n],
                    )
                    .expect("fused");
                    assert_sum_relu(&format!("{what} fused"), (fy, z), (keep_y, relu), &y);
                    assert_same(
                        &format!("{what} fused x_hat"),
                        &fsaved.x_hat().expect("x_hat"),
                        &x_hat,
                    );
                }
                // The end of a residual block fused (BatchNorm, add, ReLU): the same bits as
                // the three ops in turn, whichever outputs are written, and the same statistics.
                let residual = random(y.dims(), dtype, &mut rng);
                let sum = super::super::add(&y, &residual).expect("add");
                for (keep_sum, relu) in [(true, true), (false, true), (true, false)] {
                    let (fsum, z, fsaved) = super::super::batch_norm_add_relu(
                        &x,
                        (&gamma, &beta),
                        (&rm, &rv),
                        train,
                        &residual,
                        (keep_sum, relu),
                        &[n],
                    )
                    .expect("fused add");
                    let what = format!("{what} fused add");
                    assert_sum_relu(&what, (fsum, z), (keep_sum, relu), &sum);
                    assert_same(&format!("{what} fused add mean"), &fsaved.mean, &saved.mean);
                    assert_same(
                        &format!("{what} fused add inv_std"),
                        &fsaved.inv_std,
                        &saved.inv_std,
                    );
                }
                let g = random(y.dims(), dtype, &mut rng);
                let (dx, dg, db) =
                    super::super::batch_norm_backward(&gamma, &saved, &g, train).expect("cpu");
                let (sdx, sdg, sdb) =
                    stock::batch_norm_backward(&gamma, &ssaved, &g, train).expect("stock");
                assert_close(&format!("{what} dL/dx"), &dx, &sdx);
                assert_close(&format!("{what} dL/dgamma"), &dg, &sdg);
                assert_close(&format!("{what} dL/dbeta"), &db, &sdb);
                assert_same(
                    &format!("{what} dL/dx alone"),
                    &super::super::batch_norm_backward_input(&gamma, &saved, &g, train)
                        .expect("cpu"),
                    &dx,
                );
                assert_same(
                    &format!("{what} stock dL/dx alone"),
                    &stock::batch_norm_backward_input(&gamma, &ssaved, &g, train).expect("stock"),
                    &sdx,
                );
                // The fused ReLU + BatchNorm backward: the same bits as the ReLU's backward
                // followed by BatchNorm's, with the mask from y or from max(y, 0).
                let g_relu = relu_backward::<T>(&y, &g, None).expect("relu backward");
                let (rdx, rdg, rdb) =
                    super::super::batch_norm_backward(&gamma, &saved, &g_relu, train)
                        .expect("unfused");
                for mask in [y.clone(), y.relu().expect("relu")] {
                    let (fdx, fdg, fdb) =
                        super::super::relu_batch_norm_backward(&mask, &gamma, &saved, &g, train)
                            .expect("fused");
                    assert_same(&format!("{what} fused dL/dx"), &fdx, &rdx);
                    assert_same(&format!("{what} fused dL/dgamma"), &fdg, &rdg);
                    assert_same(&format!("{what} fused dL/dbeta"), &fdb, &rdb);
                    assert_same(
                        &format!("{what} fused dL/dx alone"),
                        &super::super::relu_batch_norm_backward_input(
                            &mask, &gamma, &saved, &g, train,
                        )
                        .expect("fused"),
                        &rdx,
                    );
                }
            }
        }

        // ReLU forward and the residual add (+ ReLU), around the task split.
        for len in [1, 7, 40_000] {
            let a = random(&[len], dtype, &mut rng);
            let b = random(&[len], dtype, &mut rng);
            assert_same(
                &format!("relu len={len}"),
                &relu::<T>(&a).expect("relu"),
                &a.relu().expect("relu"),
            );
            let sum = (&a + &b).expect("sum");
            for (keep_sum, relu) in [(true, true), (false, true), (true, false)] {
                let outputs = add_relu::<T>(&a, &b, (keep_sum, relu)).expect("add relu");
                assert_sum_relu(&format!("add len={len}"), outputs, (keep_sum, relu), &sum);
            }
        }

        // ReLU backward, with exact zeros in x (gradient 0 there) and sizes around the task split.
        for len in [1, 7, 40_000] {
            let x = random(&[len], dtype, &mut rng)
                .relu()
                .expect("x with exact zeros");
            let zeros = x.le(0.0).and_then(|z| z.to_dtype(DType::F64)).expect("le");
            let g = random(&[len], dtype, &mut rng);
            let dx = relu_backward::<T>(&x, &g, None).expect("cpu relu backward");
            assert_close(
                &format!("relu backward len={len}"),
                &dx,
                &stock::relu_backward(&x, &g).expect("stock"),
            );
            // Of a sum of two gradients: the add, then the ReLU's backward, bit for bit.
            let also = random(&[len], dtype, &mut rng);
            assert_same(
                &format!("relu backward of a sum len={len}"),
                &super::super::relu_backward_of_sum(&x, &g, &also).expect("fused"),
                &relu_backward::<T>(&x, &super::super::add(&g, &also).expect("add"), None)
                    .expect("unfused"),
            );
            let at_zero = (dx.to_dtype(DType::F64).expect("f64") * zeros)
                .and_then(|t| t.abs())
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f64>())
                .expect("sum");
            assert_eq!(
                at_zero, 0.0,
                "relu backward len={len}: gradient where x <= 0"
            );
        }

        // The separable map of input diversity: square and non-square planes, one plane, and
        // enough planes to split across threads.
        for (n, c, h, w) in [(1, 1, 1, 1), (2, 3, 4, 4), (3, 1, 5, 7), (64, 3, 32, 32)] {
            let what = format!("separable n={n} c={c} {h}x{w} {dtype:?}");
            let x = random(&[n, c, h, w], dtype, &mut rng);
            let left = random(&[h, h], dtype, &mut rng);
            let right = random(&[w, w], dtype, &mut rng);
            assert_close(
                &what,
                &separable::<T>(&x, &left, &right).expect("cpu separable"),
                &stock::separable(&x, &left, &right).expect("stock separable"),
            );
        }
        let x = random(&[1, 1, 3, 4], dtype, &mut rng);
        let square = random(&[3, 3], dtype, &mut rng);
        assert!(
            separable::<T>(&x, &square, &square).is_err(),
            "right matrix of the wrong size"
        );

        for (n, f_in, f_out) in [(1, 1, 1), (3, 5, 2), (16, 64, 10)] {
            let what = format!("linear n={n} {f_in}->{f_out} {dtype:?}");
            let x = random(&[n, f_in], dtype, &mut rng);
            let w = random(&[f_out, f_in], dtype, &mut rng);
            let b = random(&[f_out], dtype, &mut rng);
            let y = linear::<T>(&x, &w, &b).expect("cpu linear");
            assert_close(&what, &y, &stock::linear(&x, &w, &b).expect("stock"));
            let g = random(&[n, f_out], dtype, &mut rng);
            let got = linear_backward::<T>(&x, &w, &g).expect("cpu");
            let want = stock::linear_backward(&x, &w, &g).expect("stock");
            assert_close(&format!("{what} dL/dx"), &got.0, &want.0);
            assert_close(&format!("{what} dL/dW"), &got.1, &want.1);
            assert_close(&format!("{what} dL/db"), &got.2, &want.2);
            assert_same(
                &format!("{what} dL/dx alone"),
                &linear_backward_input::<T>(&w, &g).expect("cpu dx"),
                &got.0,
            );
            assert_same(
                &format!("{what} stock dL/dx alone"),
                &stock::linear_backward_input(&w, &g).expect("stock dx"),
                &want.0,
            );
        }
    }

    #[test]
    fn cpu_kernels_match_stock_candle_f64() {
        run::<f64>(DType::F64);
    }

    #[test]
    fn cpu_kernels_match_stock_candle_f32() {
        run::<f32>(DType::F32);
    }

    /// The convolution kernels chunk the batch by shape alone and add dL/dw's partial sums in
    /// chunk order, so 1, 2 and 3 threads give the same bits.
    #[test]
    fn conv_results_do_not_depend_on_the_thread_count() {
        // Stride 1: the direct kernel where the CPU has AVX-512 (7x7: paired rows narrower than
        // 8 and a partial last step), else im2col + GEMM; stride 2: im2col + GEMM everywhere.
        for (size, stride) in [(7, 1), (16, 1), (8, 1), (9, 2)] {
            conv_results_on_threads(size, stride);
        }
    }

    fn conv_results_on_threads(size: usize, stride: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x = random(&[13, 5, size, size], DType::F32, &mut rng);
        let w = random(&[6, 5, 3, 3], DType::F32, &mut rng);
        let out = (size - 1) / stride + 1;
        let g = random(&[13, 6, out, out], DType::F32, &mut rng);
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool")
                .install(|| {
                    let y = conv2d::<f32>(&x, &w, stride, 1).expect("conv");
                    let (dx, dw) = conv2d_backward::<f32>(&x, &w, &g, stride, 1).expect("backward");
                    (y, dx, dw)
                })
        };
        let one = on(1);
        for threads in [2, 3] {
            let other = on(threads);
            assert_same(
                &format!("{size}x{size}: y on {threads} threads"),
                &other.0,
                &one.0,
            );
            assert_same(
                &format!("{size}x{size}: dL/dx on {threads} threads"),
                &other.1,
                &one.1,
            );
            assert_same(
                &format!("{size}x{size}: dL/dw on {threads} threads"),
                &other.2,
                &one.2,
            );
        }
    }

    /// Path batching: BatchNorm over a batch of segments, each with its own parameters (and,
    /// in train mode, statistics), gives every segment its own pass bit for bit: the CPU's
    /// segmented kernels against the per-segment calls joined (the stock ops' way), forward,
    /// backward, and through the convolution before it.
    fn segments_are_their_own_passes(dtype: DType) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (c, size, segments) = (4, 5, [3usize, 2, 3]);
        let n: usize = segments.iter().sum();
        let per_channel = [segments.len() * c];
        let x = (random(&[n, c, size, size], dtype, &mut rng) * 3.0)
            .and_then(|t| t + 0.5)
            .expect("x");
        let residual = random(x.dims(), dtype, &mut rng);
        let gamma = random(&per_channel, dtype, &mut rng);
        let beta = random(&per_channel, dtype, &mut rng);
        let rm = random(&per_channel, dtype, &mut rng);
        let rv = (random(&per_channel, dtype, &mut rng).abs().expect("abs") + 0.1).expect("rv");
        let g = random(x.dims(), dtype, &mut rng);
        let x_in = random(&[n, 3, size, size], dtype, &mut rng);
        let w = random(&[c, 3, 3, 3], dtype, &mut rng);
        for train in [true, false] {
            for residual in [None, Some(&residual)] {
                let what = format!("{dtype:?} train={train} residual={}", residual.is_some());
                let args = |f: fn(_, _, _, _, _, _, _) -> _| {
                    f(
                        &x,
                        (&gamma, &beta),
                        (&rm, &rv),
                        train,
                        residual,
                        (true, true),
                        &segments[..],
                    )
                };
                let (y, z, saved) = args(super::super::batch_norm_outputs).expect("segmented");
                let (wy, wz, wsaved) = args(super::super::batch_norm_per_segment).expect("joined");
                let y = y.expect("y");
                assert_same(&format!("{what} y"), &y, &wy.expect("y"));
                assert_same(&format!("{what} relu"), &z.expect("z"), &wz.expect("z"));
                assert_eq!(saved.segments, segments, "{what}: segments");
                assert_same(&format!("{what} mean"), &saved.mean, &wsaved.mean);
                assert_same(&format!("{what} inv_std"), &saved.inv_std, &wsaved.inv_std);
                if train {
                    for (got, want) in [
                        (&saved.batch_mean, &wsaved.batch_mean),
                        (&saved.batch_var, &wsaved.batch_var),
                    ] {
                        assert_same(
                            &format!("{what} batch stats"),
                            got.as_ref().expect("train"),
                            want.as_ref().expect("train"),
                        );
                    }
                }
                for (mask, params) in [(None, true), (Some(&y), true), (Some(&y), false)] {
                    let what = format!("{what} mask={} params={params}", mask.is_some());
                    let (dx, p) =
                        super::super::bn_backward_any(mask, &gamma, &saved, &g, (train, params))
                            .expect("segmented backward");
                    let (wdx, wp) = super::super::bn_backward_per_segment(
                        mask,
                        &gamma,
                        &saved,
                        &g,
                        (train, params),
                    )
                    .expect("joined backward");
                    assert_same(&format!("{what} dL/dx"), &dx, &wdx);
                    assert_eq!(p.is_some(), params, "{what}: parameter gradients");
                    if let (Some((dg, db)), Some((wdg, wdb))) = (p, wp) {
                        assert_same(&format!("{what} dL/dgamma"), &dg, &wdg);
                        assert_same(&format!("{what} dL/dbeta"), &db, &wdb);
                    }
                    if !train {
                        // The eval-mode dL/dx, read by the convolution before the BatchNorm.
                        assert_same(
                            &format!("{what} through the convolution"),
                            &super::super::conv2d_backward_input_through_bn(
                                &x_in,
                                &w,
                                (&g, mask),
                                (&gamma, &saved),
                                1,
                                1,
                            )
                            .expect("through bn"),
                            &super::super::conv2d_backward_input(&x_in, &w, &wdx, 1, 1)
                                .expect("conv backward"),
                        );
                    }
                }
            }
        }
        let bad = super::super::batch_norm_relu(
            &x,
            (&gamma, &beta),
            (&rm, &rv),
            true,
            (true, true),
            &[3, 3],
        );
        assert!(
            bad.is_err(),
            "segments that do not cover the batch are refused"
        );
    }

    #[test]
    fn segmented_batch_norm_is_each_segments_own_pass() {
        segments_are_their_own_passes(DType::F64);
        segments_are_their_own_passes(DType::F32);
    }

    #[test]
    fn kernels_reject_mismatched_shapes() {
        let x = Tensor::zeros((2, 3, 5, 5), DType::F32, &Device::Cpu).expect("x");
        let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).expect("w");
        assert!(conv2d::<f32>(&x, &w, 1, 1).is_err(), "channel mismatch");
        let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).expect("w");
        let g = Tensor::zeros((2, 4, 4, 4), DType::F32, &Device::Cpu).expect("g");
        assert!(
            conv2d_backward::<f32>(&x, &w, &g, 1, 1).is_err(),
            "gradient of the wrong size"
        );
    }
}

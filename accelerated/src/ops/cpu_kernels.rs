//! CPU kernels over contiguous host slices, generic over [`Real`] (f32, f64), parallel over
//! the batch (or channels) on rayon's global pool. No candle types beyond the element trait:
//! [`super::cpu`] moves tensors in and out.
//!
//! Convolutions are im2col + GEMM (the `gemm` crate candle itself uses), except the f32 3x3
//! stride-1 ones of rows up to 32 pixels on AVX-512 CPUs, which [`super::direct_conv`]
//! computes without an im2col matrix (forward, dL/dx as a forward convolution, and dL/dw). Im2col
//! writes the convolution of image n as `Y_n = W · cols(X_n)`, where `W` is the weight viewed
//! as `[C_out, K]`, `K = C_in·kh·kw`, and `cols(X_n)` is the `[K, Ho·Wo]` matrix of input patches (zero where a
//! tap falls in the padding). Its gradients are then two more GEMMs: `dW = Σ_n dY_n · cols(X_n)ᵀ`,
//! and `dX_n`, for a stride-1 "same" convolution the forward convolution of `dY_n` with the
//! flipped, transposed kernel, for any other `col2im(Wᵀ · dY_n)`. The batch is cut into chunks of a few images whose
//! matrices sit side by side (`[cols(X_1) … cols(X_c)]`), one GEMM per chunk, so that a GEMM
//! with only `C_out` = 8-64 rows still has thousands of columns; the chunks run in parallel.
//! The chunking depends on the shapes only, so results do not depend on the thread count.
//!
//! BatchNorm works on the `[N, C, H·W]` view of a map: per-channel sums in one (statistics:
//! two) pass over the channel's N blocks, then one elementwise pass over all N·C blocks.

use super::direct_conv;
use candle_core::WithDType;
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The element types the CPU kernels run on: f32 and f64 (what `gemm` and the engine support).
pub trait Real: WithDType {
    /// Computes [`conv2d`] with a kernel of this type's own when it has one for this geometry
    /// and CPU (f32: [`direct_conv`]); `false` leaves `y` untouched for im2col + GEMM.
    fn direct_conv2d(
        _g: &ConvGeom,
        _x: &[Self],
        _w: &[Self],
        _y: &mut [MaybeUninit<Self>],
    ) -> bool {
        false
    }

    /// [`conv2d`] of `x`'s values computed on the fly (see [`ScaledGrad`]) with a kernel of
    /// this type's own; `false` leaves `y` untouched.
    fn direct_conv2d_scaled(
        _g: &ConvGeom,
        _x: ScaledGrad<'_, Self>,
        _w: &[Self],
        _y: &mut [MaybeUninit<Self>],
    ) -> bool {
        false
    }

    /// [`conv2d_backward_weight`] with a kernel of this type's own (f32: [`direct_conv`]),
    /// summing the batch in `parts` ranges; `None` for im2col + GEMM.
    fn direct_conv2d_backward_weight(
        _g: &ConvGeom,
        _x: &[Self],
        _dy: &[Self],
        _parts: usize,
    ) -> Option<Vec<Self>> {
        None
    }
}

impl Real for f32 {
    fn direct_conv2d(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) -> bool {
        let applies = direct_conv::applies(g);
        if applies {
            direct_conv::conv2d(g, direct_conv::Source::Plain(x), w, y);
        }
        applies
    }

    fn direct_conv2d_scaled(
        g: &ConvGeom,
        x: ScaledGrad<'_, f32>,
        w: &[f32],
        y: &mut [MaybeUninit<f32>],
    ) -> bool {
        let applies = direct_conv::applies(g);
        if applies {
            direct_conv::conv2d(g, direct_conv::Source::Scaled(x), w, y);
        }
        applies
    }

    fn direct_conv2d_backward_weight(
        g: &ConvGeom,
        x: &[f32],
        dy: &[f32],
        parts: usize,
    ) -> Option<Vec<f32>> {
        direct_conv::applies(g).then(|| direct_conv::conv2d_backward_weight(g, x, dy, parts))
    }
}

impl Real for f64 {}

/// Elements below which an elementwise pass is not split across threads.
const MIN_PARALLEL_ELEMS: usize = 1 << 14;

/// A kernel's output buffer, allocated but not written: the kernels write their outputs in
/// parallel, elementwise kernels storing each value once ([`write`]) and accumulating kernels
/// first zeroing their own task's chunk ([`init`]), where `vec![0; len]` of a batch's feature
/// map was one thread's memset of memory the kernel then wrote again (about a tenth of an EIO
/// iteration, with the other core idle).
pub struct Uninit<T> {
    data: Vec<T>,
    len: usize,
}

impl<T: Real> Uninit<T> {
    /// Room for `len` elements.
    pub fn new(len: usize) -> Self {
        Uninit {
            data: Vec::with_capacity(len),
            len,
        }
    }

    /// The `len` elements, for a kernel to write.
    pub fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        &mut self.data.spare_capacity_mut()[..self.len]
    }

    /// The written elements.
    ///
    /// # Safety
    /// A kernel must have written every element of [`Self::slots`].
    pub unsafe fn written(mut self) -> Vec<T> {
        // SAFETY: the capacity is at least `len`, and the caller's kernel initialised all `len`
        // elements.
        unsafe { self.data.set_len(self.len) };
        self.data
    }
}

/// A task's chunk of a kernel's output, zeroed and as initialised values, for kernels that
/// accumulate into it (GEMM, col2im): the chunk is small (a map or a few thousand elements), so
/// the zeroes go to cache just before the kernel's values.
fn init<T: Real>(out: &mut [MaybeUninit<T>]) -> &mut [T] {
    out.fill(MaybeUninit::new(T::zero()));
    // SAFETY: every element was just initialised, and `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(out as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Writes `values` into a task's chunk of an elementwise kernel's output, one store per
/// element with no zeroing first (a zeroing pass cost an elementwise op a third of its time),
/// and returns the chunk as initialised values.
///
/// # Panics
/// If `values` holds fewer elements than `out`.
fn write<T: Real>(
    out: &mut [MaybeUninit<T>],
    values: impl ExactSizeIterator<Item = T>,
) -> &mut [T] {
    assert!(
        values.len() >= out.len(),
        "an elementwise kernel has {} values for {} outputs",
        values.len(),
        out.len()
    );
    for (o, v) in out.iter_mut().zip(values) {
        o.write(v);
    }
    // SAFETY: the loop wrote every element (`values` is at least as long as `out`), and
    // `MaybeUninit<T>` has `T`'s layout.
    unsafe { &mut *(out as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// Smallest number of `block`-long chunks one rayon task takes, so tasks have at least
/// [`MIN_PARALLEL_ELEMS`] elements.
fn min_blocks(block: usize) -> usize {
    MIN_PARALLEL_ELEMS.div_ceil(block.max(1))
}

/// `dst ← lhs · rhs` (or `dst ← dst + lhs · rhs` with `accumulate`), single-threaded, where
/// `dst` is row-major `[m, n]` and `lhs` (`[m, k]`) and `rhs` (`[k, n]`) are read with the given
/// row and column strides (so either can be a transposed view).
///
/// # Panics
/// If a stride reaches outside its slice.
fn gemm_into<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
) {
    gemm_strided(
        (m, n, k),
        (dst, (n, 1)),
        accumulate,
        (lhs, lhs_strides),
        (rhs, rhs_strides),
    );
}

/// [`gemm_into`] with `dst` also read through (row, column) strides: `dst[i·rs + j·cs]`.
///
/// # Panics
/// If a stride reaches outside its slice.
fn gemm_strided<T: Real>(
    (m, n, k): (usize, usize, usize),
    (dst, (dst_rs, dst_cs)): (&mut [T], (usize, usize)),
    accumulate: bool,
    (lhs, (lhs_rs, lhs_cs)): (&[T], (usize, usize)),
    (rhs, (rhs_rs, rhs_cs)): (&[T], (usize, usize)),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_rs + (n - 1) * dst_cs < dst.len(),
        "gemm dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_rs + j * dst_cs] = T::zero();
                }
            }
        }
        return;
    }
    assert!(
        (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len(),
        "gemm lhs out of bounds"
    );
    assert!(
        (k - 1) * rhs_rs + (n - 1) * rhs_cs < rhs.len(),
        "gemm rhs out of bounds"
    );
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices; T is
    // f32 or f64 ([`Real`]), which gemm supports; `dst` does not alias `lhs` or `rhs` (&mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Shape of one convolution `[N, C_in, H, W] * [C_out, C_in, kh, kw]`, stride and zero padding
/// on both axes, output `[N, C_out, Ho, Wo]` with `Ho = (H + 2p − kh) / s + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeom {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }

    /// Rows of `cols`: `C_in·kh·kw`.
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn in_image(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn out_pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }

    fn out_image(&self) -> usize {
        self.c_out * self.out_pixels()
    }

    /// Output positions `o` of one axis whose input `o·s + tap − p` lies in `0..len`.
    fn valid(&self, tap: usize, len: usize, out_len: usize) -> std::ops::Range<usize> {
        let (s, p) = (self.stride, self.padding);
        // o·s + tap ≥ p  ⇔  o ≥ ceil((p − tap) / s)
        let lo = p.saturating_sub(tap).div_ceil(s);
        // o·s + tap − p ≤ len − 1  ⇔  o ≤ (len − 1 + p − tap) / s
        let hi = if len + p > tap {
            ((len - 1 + p - tap) / s + 1).min(out_len)
        } else {
            0
        };
        lo..hi.max(lo)
    }

    /// Calls `f(ci, row, oy, iy, ox_range, ix0)` for every (tap, output row) pair whose input row
    /// and columns are inside the image: `cols[row][oy·Wo + ox]` for `ox` in `ox_range` pairs
    /// with `x[ci][iy][ix0 + (ox − ox_range.start)·s]`.
    fn for_each_patch_row(
        &self,
        mut f: impl FnMut(usize, usize, usize, usize, std::ops::Range<usize>, usize),
    ) {
        let (ho, wo) = (self.out_h(), self.out_w());
        for ci in 0..self.c_in {
            for ky in 0..self.kh {
                let rows = self.valid(ky, self.h, ho);
                for kx in 0..self.kw {
                    let row = (ci * self.kh + ky) * self.kw + kx;
                    let cols = self.valid(kx, self.w, wo);
                    if cols.is_empty() {
                        continue;
                    }
                    let ix0 = cols.start * self.stride + kx - self.padding;
                    for oy in rows.clone() {
                        let iy = oy * self.stride + ky - self.padding;
                        f(ci, row, oy, iy, cols.clone(), ix0);
                    }
                }
            }
        }
    }
}

/// One chunk's column block: the `[K, width]` matrices of the batched GEMMs hold image `i` of
/// the chunk in columns `i·Ho·Wo .. (i+1)·Ho·Wo`.
#[derive(Debug, Clone, Copy)]
struct Block {
    /// Row length (elements) of the chunk matrix.
    width: usize,
    /// First column of this image.
    offset: usize,
}

/// `cols[(ci·kh + ky)·kw + kx][offset + oy·Wo + ox] = x[ci][oy·s + ky − p][ox·s + kx − p]` (0
/// outside the image), for one image `x` (`[C_in, H, W]`) into its column block of `cols`
/// (`[K, width]`). Writes only the in-image entries, which are the same for every image of one
/// geometry: `cols` must come zeroed, or from an earlier call with the same geometry and block.
fn im2col<T: Real>(g: &ConvGeom, x: &[T], cols: &mut [T], at: Block) {
    let (wo, hw) = (g.out_w(), g.h * g.w);
    g.for_each_patch_row(|ci, row, oy, iy, ox, ix0| {
        let src = &x[ci * hw + iy * g.w..][..g.w];
        let dst = &mut cols[row * at.width + at.offset + oy * wo..][ox.clone()];
        if g.stride == 1 {
            dst.copy_from_slice(&src[ix0..ix0 + dst.len()]);
        } else {
            // Every stride-th pixel from ix0 (an iterator, so no bounds check per element).
            let len = dst.len();
            let picked = src[ix0..].iter().step_by(g.stride);
            assert!(
                picked.len() >= len,
                "a patch row reads inside its image row"
            );
            dst.iter_mut().zip(picked).for_each(|(d, &s)| *d = s);
        }
    });
}

/// The adjoint of [`im2col`]: `dx[ci][iy][ix] = Σ dcols[row][offset + pixel]` over the (tap,
/// output pixel) pairs that read `x[ci][iy][ix]`. Overwrites `dx` (`[C_in, H, W]`).
fn col2im<T: Real>(g: &ConvGeom, dcols: &[T], at: Block, dx: &mut [T]) {
    let (wo, hw) = (g.out_w(), g.h * g.w);
    dx.fill(T::zero());
    g.for_each_patch_row(|ci, row, oy, iy, ox, ix0| {
        let dst = &mut dx[ci * hw + iy * g.w..][..g.w];
        let src = &dcols[row * at.width + at.offset + oy * wo..][ox];
        if g.stride == 1 {
            for (d, &s) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                *d += s;
            }
        } else {
            let picked = dst[ix0..].iter_mut().step_by(g.stride);
            assert!(
                picked.len() >= src.len(),
                "a patch row adds inside its image row"
            );
            picked.zip(src).for_each(|(d, &s)| *d += s);
        }
    });
}

/// Bytes of im2col matrix one chunk may fill: a chunk's matrix is written and then read back
/// by its GEMM, so it should stay in a core's L2 cache (512 KiB on the smallest machines we
/// measured) next to `gemm`'s packed panels.
const CHUNK_BYTES: usize = 256 << 10;

/// Images per chunk of the batched convolution GEMMs: as many as fit [`CHUNK_BYTES`], at least
/// one.
fn images_per_chunk<T>(g: &ConvGeom) -> usize {
    let image_bytes = g.k() * g.out_pixels() * std::mem::size_of::<T>();
    (CHUNK_BYTES / image_bytes.max(1)).max(1)
}

/// Parts dL/dw's batch is split into: each part's sum runs on one thread, then the parts are
/// added in order. A constant, not the thread count, so dL/dw has the same bits on every
/// machine.
const WEIGHT_GRAD_PARTS: usize = 2;

/// How a convolution's batch is cut: `parts` contiguous ranges of `per_task` images, one rayon
/// task each, and each range into chunks of `per` images, one GEMM each.
struct Split {
    per_task: usize,
    per: usize,
}

impl Split {
    fn new<T>(g: &ConvGeom, parts: usize) -> Self {
        let per_task = g.n.div_ceil(parts.max(1)).max(1);
        Split {
            per_task,
            per: images_per_chunk::<T>(g).min(per_task),
        }
    }

    /// GEMM columns of a full chunk.
    fn width(&self, g: &ConvGeom) -> usize {
        self.per * g.out_pixels()
    }

    /// Scratch for a chunk's `[C_out, width]` output matrix; none when a chunk is one image,
    /// whose maps are that matrix already.
    fn out_scratch<T: Real>(&self, g: &ConvGeom) -> Vec<T> {
        vec![
            T::zero();
            if self.per > 1 {
                g.c_out * self.width(g)
            } else {
                0
            }
        ]
    }
}

/// A chunk's gradient maps (`[images, C_out, Ho, Wo]`) as the `[C_out, images·Ho·Wo]` GEMM
/// operand: the maps themselves for one image, else gathered into `scratch`.
fn as_matrix<'a, T: Real>(g: &ConvGeom, maps: &'a [T], scratch: &'a mut [T]) -> &'a [T] {
    if maps.len() == g.out_image() {
        maps
    } else {
        gather(g, maps, scratch);
        scratch
    }
}

/// The `[C_out, images·Ho·Wo]` matrix of a chunk's output maps (`maps`, `[images, C_out, Ho,
/// Wo]`): row `co` holds channel `co` of each image in turn.
fn gather<T: Real>(g: &ConvGeom, maps: &[T], mat: &mut [T]) {
    let pixels = g.out_pixels();
    let width = maps.len() / g.c_out;
    for (i, map) in maps.chunks(g.out_image()).enumerate() {
        for (co, row) in map.chunks(pixels).enumerate() {
            mat[co * width + i * pixels..][..pixels].copy_from_slice(row);
        }
    }
}

/// The inverse of [`gather`]: the maps of a chunk from its `[C_out, images·Ho·Wo]` matrix.
fn scatter<T: Real>(g: &ConvGeom, mat: &[T], maps: &mut [T]) {
    let pixels = g.out_pixels();
    let width = maps.len() / g.c_out;
    for (i, map) in maps.chunks_mut(g.out_image()).enumerate() {
        for (co, row) in map.chunks_mut(pixels).enumerate() {
            row.copy_from_slice(&mat[co * width + i * pixels..][..pixels]);
        }
    }
}

/// Scratch for a chunk's im2col matrix, reused across the chunks one rayon task takes.
struct Cols<T> {
    data: Vec<T>,
    /// Row length of the layout `data` holds, whose padding entries are zero.
    width: usize,
}

impl<T: Real> Cols<T> {
    fn new(g: &ConvGeom, width: usize) -> Self {
        Self {
            data: vec![T::zero(); g.k() * width],
            width,
        }
    }

    /// im2col of every image of a chunk (`xs`, `[images, C_in, H, W]`) into the
    /// `[K, images·Ho·Wo]` matrix. [`im2col`] leaves padding entries as they are, so a chunk
    /// of another width (the batch's last) first zeroes the buffer.
    fn fill(&mut self, g: &ConvGeom, xs: &[T]) -> &[T] {
        let pixels = g.out_pixels();
        let width = xs.len() / g.in_image() * pixels;
        if width != self.width {
            self.data.fill(T::zero());
            self.width = width;
        }
        for (i, x) in xs.chunks(g.in_image()).enumerate() {
            let at = Block {
                width,
                offset: i * pixels,
            };
            im2col(g, x, &mut self.data, at);
        }
        &self.data
    }
}

/// Convolution forward into `y` (`[N, C_out, Ho, Wo]`): the type's direct kernel where it has
/// one ([`Real::direct_conv2d`]: f32 3x3 stride-1 convolutions of rows up to 32 pixels on
/// AVX-512 CPUs), else [`conv2d_im2col`].
pub fn conv2d<T: Real>(g: &ConvGeom, x: &[T], w: &[T], y: &mut [MaybeUninit<T>]) {
    if T::direct_conv2d(g, x, w, y) {
        return;
    }
    conv2d_im2col(g, x, w, y)
}

/// [`conv2d`] by im2col + GEMM: `Y = W · [cols(X_1) … cols(X_c)]` for each chunk of images
/// (see [`images_per_chunk`]); one range of images per thread.
fn conv2d_im2col<T: Real>(g: &ConvGeom, x: &[T], w: &[T], y: &mut [MaybeUninit<T>]) {
    let k = g.k();
    let split = Split::new::<T>(g, rayon::current_num_threads());
    y.par_chunks_mut(split.per_task * g.out_image())
        .zip(x.par_chunks(split.per_task * g.in_image()))
        .for_each(|(ys, xs)| {
            let mut cols = Cols::new(g, split.width(g));
            let mut out = split.out_scratch(g);
            for (ys, xs) in ys
                .chunks_mut(split.per * g.out_image())
                .zip(xs.chunks(split.per * g.in_image()))
            {
                let width = xs.len() / g.in_image() * g.out_pixels();
                let cols = cols.fill(g, xs);
                let ys = init(ys);
                // One image: its `[C_out, Ho·Wo]` output is the GEMM's destination as it is.
                let single = ys.len() == g.out_image();
                let dst = if single { &mut *ys } else { &mut out[..] };
                gemm_into((g.c_out, width, k), dst, false, w, (k, 1), cols, (width, 1));
                if !single {
                    scatter(g, &out, ys);
                }
            }
        });
}

/// The geometry of dL/dx as a convolution of dY, when it is one of the same shape: for a
/// stride-1 convolution with "same" padding (`2p = kh − 1 = kw − 1`, the 3x3 convolutions of
/// every network here), `dx[c, a, b] = Σ_{o, u, v} w[o, c, u, v] · dy[o, a − u + p, b − v + p]`
/// is the convolution of dY (`C_out` channels) with the kernel [`flip_transpose`]`(W)`
/// (`C_in` outputs) and padding `kh − 1 − p` (= p).
fn backward_input_as_conv(g: &ConvGeom) -> Option<ConvGeom> {
    let same = g.stride == 1 && g.kh == g.kw && 2 * g.padding + 1 == g.kh;
    same.then_some(ConvGeom {
        n: g.n,
        c_in: g.c_out,
        h: g.out_h(),
        w: g.out_w(),
        c_out: g.c_in,
        kh: g.kh,
        kw: g.kw,
        stride: 1,
        padding: g.kh - 1 - g.padding,
    })
}

/// `w'[c, o, u, v] = w[o, c, kh − 1 − u, kw − 1 − v]`: the kernel of the transposed
/// convolution ([`backward_input_as_conv`]), `[C_in, C_out, kh, kw]`.
fn flip_transpose<T: Real>(g: &ConvGeom, w: &[T]) -> Vec<T> {
    let taps = g.kh * g.kw;
    let mut out = Vec::with_capacity(w.len());
    for c in 0..g.c_in {
        for o in 0..g.c_out {
            let kernel = &w[(o * g.c_in + c) * taps..][..taps];
            out.extend(kernel.iter().rev());
        }
    }
    out
}

/// Convolution dL/dx into `dx` (`[N, C_in, H, W]`). A stride-1 "same" convolution's dL/dx is
/// the forward [`conv2d`] of dY with the flipped, transposed kernel
/// ([`backward_input_as_conv`]): one `[C_in, C_out·kh·kw]` GEMM per chunk, like the forward
/// pass. Any other convolution (strided, 1x1 shortcuts) takes `[dCols_1 … dCols_c] = Wᵀ ·
/// [dY_1 … dY_c]` for each chunk of images, then `dX_i = col2im(dCols_i)`; one range of images
/// per thread.
pub fn conv2d_backward_input<T: Real>(g: &ConvGeom, w: &[T], dy: &[T], dx: &mut [MaybeUninit<T>]) {
    if let Some(transposed) = backward_input_as_conv(g) {
        return conv2d(&transposed, dy, &flip_transpose(g, w), dx);
    }
    let k = g.k();
    let split = Split::new::<T>(g, rayon::current_num_threads());
    dx.par_chunks_mut(split.per_task * g.in_image())
        .zip(dy.par_chunks(split.per_task * g.out_image()))
        .for_each(|(dxs, dys)| {
            let mut mat = split.out_scratch(g);
            let mut dcols = vec![T::zero(); k * split.width(g)];
            for (dxs, dy) in dxs
                .chunks_mut(split.per * g.in_image())
                .zip(dys.chunks(split.per * g.out_image()))
            {
                let width = dy.len() / g.out_image() * g.out_pixels();
                let dy = as_matrix(g, dy, &mut mat);
                // Wᵀ: element (row r, out channel o) is w[o·K + r].
                gemm_into(
                    (k, width, g.c_out),
                    &mut dcols,
                    false,
                    w,
                    (1, k),
                    dy,
                    (width, 1),
                );
                for (i, dx_i) in init(dxs).chunks_mut(g.in_image()).enumerate() {
                    let at = Block {
                        width,
                        offset: i * g.out_pixels(),
                    };
                    col2im(g, &dcols, at, dx_i);
                }
            }
        });
}

/// dL/dy of a convolution whose output an eval-mode BatchNorm (and the ReLU after it) read,
/// from the gradient at their output: `scale_c · masked(grad, mask)` with `scale = γ·inv_std`
/// (without a mask, `scale_c · grad`), the values [`batch_norm_backward_input`] writes in eval
/// mode. [`conv2d_backward_input_scaled`] reads it without writing it out.
#[derive(Clone, Copy)]
pub struct ScaledGrad<'a, T> {
    /// dL/d(BatchNorm output), or dL/d(ReLU output) with the ReLU's `mask`, `[N, C, H, W]`.
    pub grad: &'a [T],
    pub mask: Option<&'a [T]>,
    /// `γ_c·inv_std_c`, `[C]`.
    pub scale: &'a [T],
}

impl<T: Real> ScaledGrad<'_, T> {
    /// The values at `range` (inside one map of channel `c`) into `dst`: the same formula as
    /// [`batch_norm_backward_input`] in eval mode, so the same bits.
    pub(super) fn row(&self, c: usize, range: std::ops::Range<usize>, dst: &mut [T]) {
        let s = self.scale[c];
        let g = &self.grad[range.clone()];
        match self.mask {
            Some(m) => {
                for ((d, &g), &m) in dst.iter_mut().zip(g).zip(&m[range]) {
                    *d = s * masked(g, m);
                }
            }
            None => {
                for (d, &g) in dst.iter_mut().zip(g) {
                    *d = s * g;
                }
            }
        }
    }

    /// All values, written out (for a convolution without a direct kernel).
    fn values(&self, hw: usize) -> Vec<T> {
        let mut out = Uninit::new(self.grad.len());
        let grad = BnGrad {
            grad: self.grad,
            mask: self.mask,
        };
        // Eval mode (no x̂) reads neither mean.
        batch_norm_backward_input(grad, None, self.scale, (&[], &[]), hw, out.slots());
        // SAFETY: `batch_norm_backward_input` writes every element of its output.
        unsafe { out.written() }
    }
}

/// [`conv2d_backward_input`] of `dy` given as a [`ScaledGrad`]: the direct kernel computes its
/// values while copying each image in; otherwise they are written out first. The same bits
/// as [`conv2d_backward_input`] of [`batch_norm_backward_input`]'s output.
pub fn conv2d_backward_input_scaled<T: Real>(
    g: &ConvGeom,
    w: &[T],
    dy: ScaledGrad<'_, T>,
    dx: &mut [MaybeUninit<T>],
) {
    if let Some(transposed) = backward_input_as_conv(g) {
        if T::direct_conv2d_scaled(&transposed, dy, &flip_transpose(g, w), dx) {
            return;
        }
    }
    conv2d_backward_input(g, w, &dy.values(g.out_pixels()), dx)
}

/// Convolution dL/dw: the type's direct kernel where it has one
/// ([`Real::direct_conv2d_backward_weight`], the geometries of [`Real::direct_conv2d`]), else
/// `dW = Σ_chunks dY_chunk · cols(X_chunk)ᵀ` (`[C_out, K]`, i.e.
/// `[C_out, C_in, kh, kw]`). The batch is split into [`WEIGHT_GRAD_PARTS`] ranges summed in
/// parallel (one accumulating GEMM per chunk), then the ranges' sums are added in order.
///
/// Each GEMM writes `dWᵀ` (`[K, C_out]`, transposed once at the end): in that orientation
/// `gemm` reads the im2col matrix as it lies (contiguous along the pixels it sums over) and
/// repacks only `dY` (`C_out` rows, a ninth of the im2col matrix of a 3x3 convolution); the
/// row-major `dW` orientation made it repack the whole im2col matrix for every chunk.
pub fn conv2d_backward_weight<T: Real>(g: &ConvGeom, x: &[T], dy: &[T]) -> Vec<T> {
    if let Some(dw) = T::direct_conv2d_backward_weight(g, x, dy, WEIGHT_GRAD_PARTS) {
        return dw;
    }
    let k = g.k();
    let split = Split::new::<T>(g, WEIGHT_GRAD_PARTS);
    let len = g.c_out * k;
    let partials: Vec<Vec<T>> = x
        .par_chunks(split.per_task * g.in_image())
        .zip(dy.par_chunks(split.per_task * g.out_image()))
        .map(|(xs, dys)| {
            let mut cols = Cols::new(g, split.width(g));
            let mut mat = split.out_scratch(g);
            // dWᵀ: element (co, r) of dW at r·C_out + co.
            let mut dw_t = vec![T::zero(); len];
            for (i, (xs, dy)) in xs
                .chunks(split.per * g.in_image())
                .zip(dys.chunks(split.per * g.out_image()))
                .enumerate()
            {
                let width = xs.len() / g.in_image() * g.out_pixels();
                let cols = cols.fill(g, xs);
                let dy = as_matrix(g, dy, &mut mat);
                // colsᵀ: element (column j, row r) is cols[r·width + j].
                gemm_strided(
                    (g.c_out, k, width),
                    (&mut dw_t, (1, g.c_out)),
                    i > 0,
                    (dy, (width, 1)),
                    (cols, (1, width)),
                );
            }
            dw_t
        })
        .collect();
    let dw_t = sum_in_order(partials, len);
    let mut dw = Vec::with_capacity(len);
    for co in 0..g.c_out {
        dw.extend((0..k).map(|r| dw_t[r * g.c_out + co]));
    }
    dw
}

/// The element-wise sum of the `len`-long `parts`, added in their order (zeros for none): how
/// the batch parts of a dL/dw are joined, the same bits whichever thread finished first.
pub fn sum_in_order<T: Real>(parts: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().unwrap_or_else(|| vec![T::zero(); len]);
    for part in parts {
        sum.iter_mut().zip(&part).for_each(|(a, &b)| *a += b);
    }
    sum
}

/// Independent partial sums in the per-channel reductions: one chain of dependent f64 adds
/// runs at one add per 4 cycles, eight of them pipeline and vectorise. The lanes are added in
/// a fixed order at the end, so the result is the same on every run and machine.
const LANES: usize = 8;

/// `Σ f(v)` over the values of `blocks`, in f64, with [`LANES`] partial sums.
fn lane_sum<'a, T: Real>(blocks: impl Iterator<Item = &'a [T]>, f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    for block in blocks {
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (a, v) in acc.iter_mut().zip(chunk) {
                *a += f(v.to_f64());
            }
        }
        for (a, v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += f(v.to_f64());
        }
    }
    acc.iter().sum()
}

/// Per-channel batch mean and biased variance of `x` viewed as `[N, C, hw]`, over (N, hw):
/// `mean_c = Σ x / M`, `var_c = Σ (x − mean_c)² / M`, `M = N·hw` (two passes, accumulated in
/// f64 with [`LANES`] partial sums).
pub fn batch_stats<T: Real>(x: &[T], c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / (c * hw).max(1);
    let count = (n * hw) as f64;
    let blocks = |ch: usize| (0..n).map(move |i| &x[(i * c + ch) * hw..][..hw]);
    (0..c)
        .into_par_iter()
        .with_min_len(min_blocks(n * hw))
        .map(|ch| {
            let mean = lane_sum(blocks(ch), |v| v) / count;
            let sq = lane_sum(blocks(ch), |v| (v - mean) * (v - mean));
            (mean, sq / count)
        })
        .unzip()
}

/// One `hw`-long block of each optional output of a per-block pass, `None` for every block
/// when the output is not wanted.
fn blocks_mut<T>(
    out: Option<&mut [MaybeUninit<T>]>,
    hw: usize,
    count: usize,
) -> Vec<Option<&mut [MaybeUninit<T>]>> {
    match out {
        Some(out) => out.chunks_mut(hw.max(1)).map(Some).collect(),
        None => (0..count).map(|_| None).collect(),
    }
}

/// The outputs of one BatchNorm forward pass over `[N, C, hw]` maps ([`batch_norm_apply`]).
/// x̂ is not among them: a backward pass computes it again from the input ([`Normalised`]),
/// which costs less than writing it and reading it back.
pub struct BnOutputs<'a, T> {
    /// `y = γ_c·x̂ + β_c` (plus the residual, see [`batch_norm_apply`]), when it is kept (a
    /// pass that reads it later), else only `relu` is written.
    pub y: Option<&'a mut [MaybeUninit<T>]>,
    /// `max(y, 0)`, when a ReLU follows (the fused BatchNorm + ReLU of a traced or eval pass).
    pub relu: Option<&'a mut [MaybeUninit<T>]>,
}

/// BatchNorm's affine normalisation of `x` (`[N, C, hw]`), fused with what follows it in a
/// residual block: `y = γ_c·x̂ + β_c` with `x̂ = (x − mean_c)·inv_std_c`, then `y + residual`
/// when a `residual` is given (the block's add), then `max(·, 0)` (the ReLU), each written
/// when asked for, in one pass over `x`. The values are those of the separate ops: `γ_c·x̂ + β_c`
/// is rounded before the residual is added, and the ReLU reads the rounded sum.
pub fn batch_norm_apply<T: Real>(
    x: &[T],
    (mean, inv_std): (&[T], &[T]),
    (gamma, beta): (&[T], &[T]),
    residual: Option<&[T]>,
    hw: usize,
    out: BnOutputs<'_, T>,
) {
    let c = mean.len();
    let blocks = x.len() / hw.max(1);
    let y = blocks_mut(out.y, hw, blocks);
    let relu = blocks_mut(out.relu, hw, blocks);
    x.par_chunks(hw.max(1))
        .zip(y)
        .zip(relu)
        .with_min_len(min_blocks(hw))
        .enumerate()
        .for_each(|(block, ((x, y), relu))| {
            let ch = block % c;
            let (m, s, g, b) = (mean[ch], inv_std[ch], gamma[ch], beta[ch]);
            let bn = |x: T| ((x - m) * s) * g + b;
            let residual = residual.map(|r| &r[block * x.len()..][..x.len()]);
            // One loop per output, so each vectorises.
            match (y, residual) {
                (Some(y), None) => {
                    let y = write(y, x.iter().map(|&x| bn(x)));
                    if let Some(r) = relu {
                        relu_into(y, r);
                    }
                }
                (Some(y), Some(res)) => {
                    let y = write(y, x.iter().zip(res).map(|(&x, &r)| bn(x) + r));
                    if let Some(r) = relu {
                        relu_into(y, r);
                    }
                }
                (None, None) => {
                    if let Some(r) = relu {
                        write(r, x.iter().map(|&x| relu_of(bn(x))));
                    }
                }
                (None, Some(res)) => {
                    if let Some(r) = relu {
                        write(r, x.iter().zip(res).map(|(&x, &v)| relu_of(bn(x) + v)));
                    }
                }
            }
        });
}

/// `x̂ = (x − mean_c)·inv_std_c` over `[N, C, hw]` maps: the same values [`batch_norm_apply`]
/// writes, for a backward pass of an eval-mode BatchNorm that did not keep them.
pub fn batch_norm_x_hat<T: Real>(
    x: &[T],
    mean: &[T],
    inv_std: &[T],
    hw: usize,
    x_hat: &mut [MaybeUninit<T>],
) {
    let c = mean.len();
    x_hat
        .par_chunks_mut(hw.max(1))
        .zip(x.par_chunks(hw.max(1)))
        .with_min_len(min_blocks(hw))
        .enumerate()
        .for_each(|(block, (xh, x))| {
            let ch = block % c;
            let (m, s) = (mean[ch], inv_std[ch]);
            write(xh, x.iter().map(|&x| (x - m) * s));
        });
}

/// The gradient a BatchNorm backward pass reads: `g`, or with a `mask` (the input or output of
/// the ReLU that followed the BatchNorm) the ReLU's dL/dx, `g` where `mask > 0`, else 0: the
/// fused ReLU + BatchNorm backward.
#[derive(Clone, Copy)]
pub struct BnGrad<'a, T> {
    pub grad: &'a [T],
    pub mask: Option<&'a [T]>,
}

impl<'a, T: Real> BnGrad<'a, T> {
    /// The block at `at..at + len`: its gradient, and its mask if any.
    fn block(&self, at: usize, len: usize) -> (&'a [T], Option<&'a [T]>) {
        (
            &self.grad[at..at + len],
            self.mask.map(|m| &m[at..at + len]),
        )
    }
}

/// `g` where `m > 0`, else 0 (ReLU's backward of one value).
fn masked<T: Real>(g: T, m: T) -> T {
    if m > T::zero() {
        g
    } else {
        T::zero()
    }
}

/// x̂ of a BatchNorm's backward pass, computed again from its input element by element:
/// `x̂ = (x − mean_c)·inv_std_c`, the values [`batch_norm_apply`] normalised with (the forward
/// pass does not store them).
#[derive(Clone, Copy)]
pub struct Normalised<'a, T> {
    /// The BatchNorm's input, `[N, C, hw]`.
    pub x: &'a [T],
    pub mean: &'a [T],
    pub inv_std: &'a [T],
}

impl<'a, T: Real> Normalised<'a, T> {
    /// The block at `at..at + len` of channel `ch`: its input and the channel's mean and
    /// 1/std.
    fn block(&self, at: usize, len: usize, ch: usize) -> (&'a [T], T, T) {
        (&self.x[at..at + len], self.mean[ch], self.inv_std[ch])
    }
}

/// Per-channel `Σ g` and `Σ g·x̂` over (N, hw) of `[N, C, hw]` maps, accumulated in f64 with
/// [`LANES`] partial sums each: the gradients dL/dβ and dL/dγ of BatchNorm (of the masked
/// gradient, see [`BnGrad`]).
pub fn batch_norm_grad_sums<T: Real>(
    grad: BnGrad<'_, T>,
    x_hat: Normalised<'_, T>,
    c: usize,
    hw: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = grad.grad.len() / (c * hw).max(1);
    (0..c)
        .into_par_iter()
        .with_min_len(min_blocks(n * hw))
        .map(|ch| {
            let (mut sg, mut sgx) = ([0.0f64; LANES], [0.0f64; LANES]);
            let mut add = |lane: usize, g: T, xh: T| {
                let g = g.to_f64();
                sg[lane] += g;
                sgx[lane] += g * xh.to_f64();
            };
            for i in 0..n {
                let at = (i * c + ch) * hw;
                let (g, mask) = grad.block(at, hw);
                let (x, m, s) = x_hat.block(at, hw, ch);
                let norm = |x: T| (x - m) * s;
                let split = hw - hw % LANES;
                match mask {
                    None => {
                        for (gc, xc) in g[..split]
                            .chunks_exact(LANES)
                            .zip(x[..split].chunks_exact(LANES))
                        {
                            for lane in 0..LANES {
                                add(lane, gc[lane], norm(xc[lane]));
                            }
                        }
                        for (lane, (&g, &x)) in g[split..].iter().zip(&x[split..]).enumerate() {
                            add(lane, g, norm(x));
                        }
                    }
                    Some(mk) => {
                        for ((gc, xc), mc) in g[..split]
                            .chunks_exact(LANES)
                            .zip(x[..split].chunks_exact(LANES))
                            .zip(mk[..split].chunks_exact(LANES))
                        {
                            for lane in 0..LANES {
                                add(lane, masked(gc[lane], mc[lane]), norm(xc[lane]));
                            }
                        }
                        for (lane, ((&g, &x), &mk)) in g[split..]
                            .iter()
                            .zip(&x[split..])
                            .zip(&mk[split..])
                            .enumerate()
                        {
                            add(lane, masked(g, mk), norm(x));
                        }
                    }
                }
            }
            (sg.iter().sum::<f64>(), sgx.iter().sum::<f64>())
        })
        .unzip()
}

/// BatchNorm dL/dx over `[N, C, hw]` (of the masked gradient, see [`BnGrad`]):
/// `dx = scale_c·(g − a_c − x̂·b_c)` in train mode (`scale = γ·inv_std`, `a = mean(g)`,
/// `b = mean(g·x̂)`, `x_hat` given); `dx = scale_c·g` in eval mode (`x_hat` = `None`), which
/// is the train formula's value at a = b = 0.
pub fn batch_norm_backward_input<T: Real>(
    grad: BnGrad<'_, T>,
    x_hat: Option<Normalised<'_, T>>,
    scale: &[T],
    (a, b): (&[T], &[T]),
    hw: usize,
    dx: &mut [MaybeUninit<T>],
) {
    let c = scale.len();
    dx.par_chunks_mut(hw.max(1))
        .with_min_len(min_blocks(hw))
        .enumerate()
        .for_each(|(block, dx)| {
            let ch = block % c;
            let at = block * hw;
            let (g, mask) = grad.block(at, hw);
            let s = scale[ch];
            match (x_hat.map(|xh| xh.block(at, hw, ch)), mask) {
                (Some((x, m, is)), None) => {
                    let (a, b) = (a[ch], b[ch]);
                    let values = g.iter().zip(x);
                    write(dx, values.map(|(&g, &x)| s * (g - a - ((x - m) * is) * b)));
                }
                (Some((x, m, is)), Some(mk)) => {
                    let (a, b) = (a[ch], b[ch]);
                    let values = g.iter().zip(x).zip(mk);
                    write(
                        dx,
                        values.map(|((&g, &x), &mk)| s * (masked(g, mk) - a - ((x - m) * is) * b)),
                    );
                }
                (None, None) => {
                    write(dx, g.iter().map(|&g| s * g));
                }
                (None, Some(mk)) => {
                    write(dx, g.iter().zip(mk).map(|(&g, &mk)| s * masked(g, mk)));
                }
            }
        });
}

/// `max(v, 0)`.
fn relu_of<T: Real>(v: T) -> T {
    if v > T::zero() {
        v
    } else {
        T::zero()
    }
}

/// `out = max(x, 0)` elementwise (one block, single-threaded).
fn relu_into<T: Real>(x: &[T], out: &mut [MaybeUninit<T>]) {
    write(out, x.iter().map(|&v| relu_of(v)));
}

/// ReLU forward in one parallel pass: `out = max(x, 0)`.
pub fn relu<T: Real>(x: &[T], out: &mut [MaybeUninit<T>]) {
    out.par_chunks_mut(MIN_PARALLEL_ELEMS)
        .zip(x.par_chunks(MIN_PARALLEL_ELEMS))
        .for_each(|(o, x)| relu_into(x, o));
}

/// `sum = a + b` and `relu = max(a + b, 0)`, each written when asked for, in one parallel
/// pass (a residual add and the ReLU after it).
pub fn add_relu<T: Real>(
    a: &[T],
    b: &[T],
    sum: Option<&mut [MaybeUninit<T>]>,
    relu: Option<&mut [MaybeUninit<T>]>,
) {
    let blocks = a.len().div_ceil(MIN_PARALLEL_ELEMS);
    a.par_chunks(MIN_PARALLEL_ELEMS)
        .zip(b.par_chunks(MIN_PARALLEL_ELEMS))
        .zip(blocks_mut(sum, MIN_PARALLEL_ELEMS, blocks))
        .zip(blocks_mut(relu, MIN_PARALLEL_ELEMS, blocks))
        .for_each(|(((a, b), s), r)| match (s, r) {
            (Some(s), r) => {
                let s = write(s, a.iter().zip(b).map(|(&a, &b)| a + b));
                if let Some(r) = r {
                    relu_into(s, r);
                }
            }
            (None, Some(r)) => {
                write(r, a.iter().zip(b).map(|(&a, &b)| relu_of(a + b)));
            }
            (None, None) => {}
        });
}

/// ReLU dL/dx in one pass: `dx = g` where `x > 0`, else 0; with `also`, of the sum of two
/// gradients, `g + also` (rounded, then masked: the add and the ReLU's backward in turn).
pub fn relu_backward<T: Real>(x: &[T], grad: &[T], also: Option<&[T]>, dx: &mut [MaybeUninit<T>]) {
    let blocks = x.len().div_ceil(MIN_PARALLEL_ELEMS);
    let also: Vec<Option<&[T]>> = match also {
        Some(a) => a.chunks(MIN_PARALLEL_ELEMS).map(Some).collect(),
        None => vec![None; blocks],
    };
    dx.par_chunks_mut(MIN_PARALLEL_ELEMS)
        .zip(x.par_chunks(MIN_PARALLEL_ELEMS))
        .zip(grad.par_chunks(MIN_PARALLEL_ELEMS))
        .zip(also)
        .for_each(|(((dx, x), g), also)| match also {
            None => {
                write(dx, x.iter().zip(g).map(|(&x, &g)| masked(g, x)));
            }
            Some(a) => {
                let values = x.iter().zip(g).zip(a);
                write(dx, values.map(|((&x, &g), &a)| masked(g + a, x)));
            }
        });
}

/// Fully connected forward `y = x Wᵀ + b` for `x` `[N, F_in]`, `W` `[F_out, F_in]`, into `y`
/// (`[N, F_out]`).
pub fn linear<T: Real>(x: &[T], w: &[T], b: &[T], f_in: usize, y: &mut [T]) {
    let f_out = b.len();
    let n = y.len() / f_out.max(1);
    gemm_into((n, f_out, f_in), y, false, x, (f_in, 1), w, (1, f_in));
    for row in y.chunks_mut(f_out.max(1)) {
        row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
    }
}

/// dL/dx of [`linear`]: `dx = g W` (`[N, F_in]`).
pub fn linear_backward_input<T: Real>(
    w: &[T],
    grad: &[T],
    (n, f_in, f_out): (usize, usize, usize),
) -> Vec<T> {
    let mut dx = vec![T::zero(); n * f_in];
    gemm_into(
        (n, f_in, f_out),
        &mut dx,
        false,
        grad,
        (f_out, 1),
        w,
        (f_in, 1),
    );
    dx
}

/// Gradients of [`linear`]: `dx = g W` (`[N, F_in]`), `dW = gᵀ x` (`[F_out, F_in]`),
/// `db = Σ_n g` (`[F_out]`).
pub fn linear_backward<T: Real>(
    x: &[T],
    w: &[T],
    grad: &[T],
    (n, f_in, f_out): (usize, usize, usize),
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let dx = linear_backward_input(w, grad, (n, f_in, f_out));
    let mut dw = vec![T::zero(); f_out * f_in];
    gemm_into(
        (f_out, f_in, n),
        &mut dw,
        false,
        grad,
        (1, f_out),
        x,
        (f_in, 1),
    );
    let mut db = vec![T::zero(); f_out];
    for row in grad.chunks(f_out.max(1)) {
        db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
    }
    (dx, dw, db)
}

/// `y_p = L · x_p · Rᵀ` for every `[H, W]` plane p of `x` (`L` `[H, H]`, `R` `[W, W]`, all
/// row-major), into `y` (same shape as `x`): two single-threaded GEMMs per plane
/// (`t = x_p · Rᵀ`, then `y_p = L · t`), the planes in parallel.
pub fn separable<T: Real>(
    x: &[T],
    left: &[T],
    right: &[T],
    (h, w): (usize, usize),
    y: &mut [MaybeUninit<T>],
) {
    let plane = h * w;
    y.par_chunks_mut(plane.max(1))
        .zip(x.par_chunks(plane.max(1)))
        .with_min_len(min_blocks(plane))
        .for_each_init(
            || vec![T::zero(); plane],
            |t, (y, x)| {
                gemm_into((h, w, w), t, false, x, (w, 1), right, (1, w));
                gemm_into((h, w, h), init(y), false, left, (h, 1), t, (w, 1));
            },
        );
}

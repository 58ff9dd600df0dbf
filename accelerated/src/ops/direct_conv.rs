//! Direct 3x3 convolution (stride 1, padding 1) in f32 with AVX-512, without an im2col
//! matrix: each output row is one or two 16-lane vectors, and a block of [`OUT_BLOCK`] output
//! channels accumulates `Σ_{c, u, v} w[o, c, u, v] · x[c, i + u − 1, j + v − 1]` in registers,
//! reading every input row straight from a zero-padded copy of the image. The im2col + GEMM
//! path writes and reads back a matrix 9x the input for every convolution; here the input is
//! read from cache and each loaded vector serves [`OUT_BLOCK`] multiply-adds.
//!
//! Used for the forward convolution and, through [`super::cpu_kernels::conv2d_backward_input`],
//! dL/dx, when the CPU has AVX-512F and a row is 8, 16 or 32 pixels (all of ResNet-20's 3x3
//! stride-1 convolutions on CIFAR, VGG-16's larger maps); everything else (strided and 1x1
//! convolutions, other widths, f64, CPUs without AVX-512) stays on im2col + GEMM. The sum over
//! (c, u, v) runs in that order, so results are the same on every run and thread count; they
//! differ from the GEMM path's by rounding only.
//!
//! dL/dw ([`conv2d_backward_weight`]) runs on the same padded copies: for a few output and
//! input channels and one kernel row at a time, 16-lane accumulators per weight sum
//! `dy · x` over every output vector of a group of images, then join per-weight lane partial
//! sums that are added across lanes once, at the end.

use super::cpu_kernels::ConvGeom;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels one register block accumulates (16 accumulators of 16 lanes).
const OUT_BLOCK: usize = 8;

/// f32 lanes of a 512-bit vector.
const LANES: usize = 16;

/// Whether [`conv2d`] computes this convolution on this CPU.
pub fn applies(g: &ConvGeom) -> bool {
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding == 1;
    let rows = g.w == 2 * LANES
        || (g.w == LANES && g.h.is_multiple_of(2))
        || (g.w == LANES / 2 && g.h.is_multiple_of(4));
    shape && rows && has_avx512()
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// The convolution `y = conv(x, w)` (`[N, C_in, H, W] * [C_out, C_in, 3, 3]`, output
/// `[N, C_out, H, W]`); `g` must satisfy [`applies`]. One range of images per thread.
pub fn conv2d(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
    assert!(
        applies(g),
        "direct_conv::conv2d on an unsupported geometry {g:?}"
    );
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.h * g.w);
    assert_eq!(x.len(), g.n * in_image, "conv2d input length");
    assert_eq!(y.len(), g.n * out_image, "conv2d output length");
    assert_eq!(w.len(), g.c_out * g.c_in * 9, "conv2d weight length");
    let per_task = g.n.div_ceil(rayon::current_num_threads().max(1)).max(1);
    y.par_chunks_mut(per_task * out_image)
        .zip(x.par_chunks(per_task * in_image))
        .for_each(|(ys, xs)| {
            let mut padded = Padded::new(g);
            for (y, x) in ys
                .chunks_exact_mut(out_image)
                .zip(xs.chunks_exact(in_image))
            {
                padded.fill(g, x);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `applies` checked that the CPU has AVX-512F; the lengths were checked
                // above and `padded` holds one image in the layout `Layout::of(g)`.
                unsafe {
                    avx512::image(g, &padded.data, w, y)
                };
            }
        });
}

/// Vectors of output pixels one accumulator pass of [`conv2d_backward_weight`] covers at
/// least: a pass reads its block of dY and input channels once and adds its accumulators to
/// the lane partial sums once, so small maps take several images per pass.
const WEIGHT_PASS_VECTORS: usize = 64;

/// dL/dw of the convolution, `dw[o, c, u, v] = Σ_{n, i, j} dy[n, o, i, j] · x[n, c, i + u − 1,
/// j + v − 1]` (`[C_out, C_in, 3, 3]`); `g` must satisfy [`applies`]. The batch is cut into
/// `parts` ranges, one rayon task each; a range's sum is kept as 16 lane partial sums per
/// weight (one per vector lane, so no horizontal sum in the inner loop), whose lanes are added
/// in order at the end, and the ranges' sums are then added in order. `parts` is a constant of
/// the caller, not the thread count, so the result has the same bits on every machine.
pub fn conv2d_backward_weight(g: &ConvGeom, x: &[f32], dy: &[f32], parts: usize) -> Vec<f32> {
    assert!(
        applies(g),
        "direct_conv::conv2d_backward_weight on an unsupported geometry {g:?}"
    );
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.h * g.w);
    assert_eq!(x.len(), g.n * in_image, "dL/dw input length");
    assert_eq!(dy.len(), g.n * out_image, "dL/dw output-gradient length");
    let weights = g.c_out * g.c_in * 9;
    let per_task = g.n.div_ceil(parts.max(1)).max(1);
    let vectors = g.h * g.w / LANES;
    let per_pass = WEIGHT_PASS_VECTORS.div_ceil(vectors).min(per_task);
    let sums: Vec<Vec<f32>> = x
        .par_chunks(per_task * in_image)
        .zip(dy.par_chunks(per_task * out_image))
        .map(|(xs, dys)| {
            let mut lanes = vec![0.0f32; weights * LANES];
            let mut padded: Vec<Padded> = (0..per_pass).map(|_| Padded::new(g)).collect();
            for (xs, dys) in xs
                .chunks(per_pass * in_image)
                .zip(dys.chunks(per_pass * out_image))
            {
                let images = xs.len() / in_image;
                for (p, x) in padded.iter_mut().zip(xs.chunks_exact(in_image)) {
                    p.fill(g, x);
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `applies` checked that the CPU has AVX-512F; the first `images`
                // entries of `padded` hold the images of `dys` in the layout `Layout::of(g)`,
                // and `lanes` has 16 entries per weight.
                unsafe {
                    avx512::weight_grad(g, &padded[..images], dys, &mut lanes)
                };
            }
            lanes
                .chunks_exact(LANES)
                .map(|l| l.iter().fold(0.0, |a, &b| a + b))
                .collect()
        })
        .collect();
    let mut sums = sums.into_iter();
    let mut dw = sums.next().unwrap_or_else(|| vec![0.0; weights]);
    for part in sums {
        dw.iter_mut().zip(&part).for_each(|(a, &b)| *a += b);
    }
    dw
}

/// One image with a zero border: `[C_in][H + 2][row]` after one zero entry (and one more at
/// the end). Rows of 16 and 32 pixels are padded on both sides (`row = W + 2`); rows of 8 are
/// not (`row = 8`): their kernel loads two rows per vector and zeroes the lanes of the missing
/// columns with a mask, reading one entry before or after a row (the extra entries keep those
/// reads inside the buffer).
struct Padded {
    data: Vec<f32>,
}

/// Where [`Padded`] puts things for one geometry.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Entries of a row: `W + 2`, or `W` for rows of 8.
    row: usize,
    /// Entries of a channel: `(H + 2)·row`.
    plane: usize,
    /// Columns of zeros left of a row: 1, or 0 for rows of 8.
    left: usize,
}

impl Layout {
    fn of(g: &ConvGeom) -> Self {
        let (row, left) = if g.w == LANES / 2 {
            (g.w, 0)
        } else {
            (g.w + 2, 1)
        };
        Layout {
            row,
            plane: (g.h + 2) * row,
            left,
        }
    }

    /// Index of padded row `pr` of channel `c` from column `v − 1` of the image on (the input
    /// tap `v` of output column 0).
    fn tap(&self, c: usize, pr: usize, v: usize) -> usize {
        // Entry 0 of the buffer is the extra one: image column j of a row is at 1 + left + j.
        c * self.plane + pr * self.row + self.left + v
    }
}

impl Padded {
    fn new(g: &ConvGeom) -> Self {
        Padded {
            data: vec![0.0; g.c_in * Layout::of(g).plane + 2],
        }
    }

    /// Copies the image `x` (`[C_in, H, W]`) inside the border, which stays zero.
    fn fill(&mut self, g: &ConvGeom, x: &[f32]) {
        let at = Layout::of(g);
        for (c, channel) in x.chunks_exact(g.h * g.w).enumerate() {
            for (i, line) in channel.chunks_exact(g.w).enumerate() {
                // Column 0 of the image is tap v = 1 of output column 0.
                self.data[at.tap(c, i + 1, 1)..][..g.w].copy_from_slice(line);
            }
        }
    }
}

/// The first channel of each block of `size` channels out of `count`, then of each channel
/// left over, with whether it starts a full block.
fn blocks(count: usize, size: usize) -> impl Iterator<Item = (usize, bool)> {
    let full = count / size * size;
    (0..full)
        .step_by(size)
        .map(|o| (o, true))
        .chain((full..count).map(|o| (o, false)))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{blocks, ConvGeom, Layout, LANES, OUT_BLOCK};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// One image: `xp` the [`super::Padded`] image, `y` `[C_out][H][W]` (every element written). Rows of 32 pixels
    /// are two vectors, one row at a time; rows of 16 one vector, two rows at a time; rows of 8
    /// half a vector, four rows (two vectors) at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `xp`, `w` and `y` must have the lengths of `g`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn image(g: &ConvGeom, xp: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
        let y = y.as_mut_ptr().cast::<f32>();
        for (o, full) in blocks(g.c_out, OUT_BLOCK) {
            match (g.w, full) {
                (32, true) => rows::<OUT_BLOCK, 1, 2>(g, xp, w, y, o),
                (32, false) => rows::<1, 1, 2>(g, xp, w, y, o),
                (16, true) => rows::<OUT_BLOCK, 2, 1>(g, xp, w, y, o),
                (16, false) => rows::<1, 2, 1>(g, xp, w, y, o),
                (_, true) => rows8::<OUT_BLOCK>(g, xp, w, y, o),
                (_, false) => rows8::<1>(g, xp, w, y, o),
            }
        }
    }

    /// Output channels one dL/dw pass accumulates.
    const WEIGHT_OUTS: usize = 4;
    /// Input channels one dL/dw pass accumulates.
    const WEIGHT_INS: usize = 2;

    /// Adds the dL/dw of a few images (`xps` their [`super::Padded`] copies, `dys` their
    /// `[C_out][H][W]` gradients back to back) to `lanes` (16 lane partial sums per weight,
    /// `[C_out][C_in][3][3][16]`), in passes of [`WEIGHT_OUTS`] output channels, [`WEIGHT_INS`]
    /// input channels and one kernel row `u`: 24 accumulators that stay in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `xps` must hold the images of `dys` in the layout
    /// `Layout::of(g)` and `lanes` must have `16·C_out·C_in·9` entries.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weight_grad(g: &ConvGeom, xps: &[super::Padded], dys: &[f32], lanes: &mut [f32]) {
        for (o, o_full) in blocks(g.c_out, WEIGHT_OUTS) {
            for (c, c_full) in blocks(g.c_in, WEIGHT_INS) {
                for u in 0..3 {
                    match (o_full, c_full) {
                        (true, true) => {
                            weight_pass::<WEIGHT_OUTS, WEIGHT_INS>(g, xps, dys, lanes, (o, c, u))
                        }
                        (true, false) => {
                            weight_pass::<WEIGHT_OUTS, 1>(g, xps, dys, lanes, (o, c, u))
                        }
                        (false, true) => {
                            weight_pass::<1, WEIGHT_INS>(g, xps, dys, lanes, (o, c, u))
                        }
                        (false, false) => weight_pass::<1, 1>(g, xps, dys, lanes, (o, c, u)),
                    }
                }
            }
        }
    }

    /// One dL/dw pass: output channels `o0..o0 + OUTS`, input channels `c0..c0 + INS`, kernel
    /// row `u`, over every output vector of every image. Output vector `p` covers the 16 pixels
    /// from `16·p` on: part of a row of 32, a row of 16, or two rows of 8, whose input taps
    /// are loaded as in the forward kernels (masked for rows of 8).
    #[target_feature(enable = "avx512f")]
    unsafe fn weight_pass<const OUTS: usize, const INS: usize>(
        g: &ConvGeom,
        xps: &[super::Padded],
        dys: &[f32],
        lanes: &mut [f32],
        (o0, c0, u): (usize, usize, usize),
    ) {
        let masks: [__mmask16; 3] = if g.w == LANES / 2 {
            [0xfefe, 0xffff, 0x7f7f]
        } else {
            [0xffff; 3]
        };
        let (layout, pixels) = (Layout::of(g), g.h * g.w);
        let mut acc = [[[_mm512_setzero_ps(); 3]; INS]; OUTS];
        for (xp, dy) in xps.iter().zip(dys.chunks_exact(g.c_out * pixels)) {
            let (xp, dy) = (xp.data.as_ptr(), dy.as_ptr());
            for first in (0..pixels).step_by(LANES) {
                let (i, j) = (first / g.w, first % g.w);
                let grads: [__m512; OUTS] =
                    std::array::from_fn(|o| _mm512_loadu_ps(dy.add((o0 + o) * pixels + first)));
                for c in 0..INS {
                    for (v, &mask) in masks.iter().enumerate() {
                        let input =
                            _mm512_maskz_loadu_ps(mask, xp.add(layout.tap(c0 + c, i + u, v) + j));
                        for (sums, &grad) in acc.iter_mut().zip(&grads) {
                            sums[c][v] = _mm512_fmadd_ps(grad, input, sums[c][v]);
                        }
                    }
                }
            }
        }
        let lanes = lanes.as_mut_ptr();
        for (o, sums) in acc.iter().enumerate() {
            for (c, taps) in sums.iter().enumerate() {
                for (v, &sum) in taps.iter().enumerate() {
                    let at = ((((o0 + o) * g.c_in + c0 + c) * 3 + u) * 3 + v) * LANES;
                    let total = _mm512_add_ps(_mm512_loadu_ps(lanes.add(at)), sum);
                    _mm512_storeu_ps(lanes.add(at), total);
                }
            }
        }
    }

    /// Output channels `o0..o0 + OUTS` of an image of 8-pixel rows: each vector holds two
    /// output rows, each input vector the two input rows they read, loaded from one column
    /// before (`v` = 0) or after (`v` = 2) the row with the lanes of the column outside the
    /// image zeroed.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows8<const OUTS: usize>(
        g: &ConvGeom,
        xp: &[f32],
        w: &[f32],
        y: *mut f32,
        o0: usize,
    ) {
        // Lanes 0 and 8 are column 0 of a row, lanes 7 and 15 column 7.
        const MASKS: [__mmask16; 3] = [0xfefe, 0xffff, 0x7f7f];
        let (layout, taps) = (Layout::of(g), g.c_in * 9);
        let (xp, w) = (xp.as_ptr(), w.as_ptr());
        for i0 in (0..g.h).step_by(4) {
            let mut acc = [[_mm512_setzero_ps(); 2]; OUTS];
            for c in 0..g.c_in {
                for u in 0..3 {
                    for (v, &mask) in MASKS.iter().enumerate() {
                        // Output rows i0 + 2k, i0 + 2k + 1 read padded rows i0 + 2k + u and the
                        // next, columns v − 1 .. v + 7 (the rows of 8 lie back to back).
                        let input: [__m512; 2] = std::array::from_fn(|k| {
                            let at = layout.tap(c, i0 + 2 * k + u, v);
                            _mm512_maskz_loadu_ps(mask, xp.add(at))
                        });
                        for (o, sums) in acc.iter_mut().enumerate() {
                            let weight =
                                _mm512_set1_ps(*w.add((o0 + o) * taps + c * 9 + u * 3 + v));
                            for (a, &vector) in sums.iter_mut().zip(&input) {
                                *a = _mm512_fmadd_ps(weight, vector, *a);
                            }
                        }
                    }
                }
            }
            for (o, sums) in acc.iter().enumerate() {
                for (k, &sum) in sums.iter().enumerate() {
                    _mm512_storeu_ps(y.add(((o0 + o) * g.h + i0 + 2 * k) * g.w), sum);
                }
            }
        }
    }

    /// Output channels `o0..o0 + OUTS` of an image of 16- or 32-pixel rows, `ROWS` output rows
    /// of `VECS` vectors at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const OUTS: usize, const ROWS: usize, const VECS: usize>(
        g: &ConvGeom,
        xp: &[f32],
        w: &[f32],
        y: *mut f32,
        o0: usize,
    ) {
        let (layout, taps) = (Layout::of(g), g.c_in * 9);
        let (xp, w) = (xp.as_ptr(), w.as_ptr());
        for i0 in (0..g.h).step_by(ROWS) {
            let mut acc = [[[_mm512_setzero_ps(); VECS]; ROWS]; OUTS];
            for c in 0..g.c_in {
                for u in 0..3 {
                    for v in 0..3 {
                        // Input vectors: output row i0 + r reads padded row i0 + r + u, from
                        // column v on.
                        let mut input = [[_mm512_setzero_ps(); VECS]; ROWS];
                        for (r, vectors) in input.iter_mut().enumerate() {
                            let at = layout.tap(c, i0 + r + u, v);
                            for (k, vector) in vectors.iter_mut().enumerate() {
                                *vector = _mm512_loadu_ps(xp.add(at + k * LANES));
                            }
                        }
                        for (o, sums) in acc.iter_mut().enumerate() {
                            let weight =
                                _mm512_set1_ps(*w.add((o0 + o) * taps + c * 9 + u * 3 + v));
                            for (row, vectors) in sums.iter_mut().zip(&input) {
                                for (a, &vector) in row.iter_mut().zip(vectors) {
                                    *a = _mm512_fmadd_ps(weight, vector, *a);
                                }
                            }
                        }
                    }
                }
            }
            for (o, sums) in acc.iter().enumerate() {
                for (r, row) in sums.iter().enumerate() {
                    let at = ((o0 + o) * g.h + i0 + r) * g.w;
                    for (k, &sum) in row.iter().enumerate() {
                        _mm512_storeu_ps(y.add(at + k * LANES), sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The direct sum in f64 (the definition of the convolution).
    fn reference(g: &ConvGeom, x: &[f32], w: &[f32]) -> Vec<f64> {
        let mut y = vec![0.0; g.n * g.c_out * g.h * g.w];
        for n in 0..g.n {
            for o in 0..g.c_out {
                for i in 0..g.h {
                    for j in 0..g.w {
                        let mut sum = 0.0;
                        for c in 0..g.c_in {
                            for u in 0..3 {
                                for v in 0..3 {
                                    let (a, b) = ((i + u) as isize - 1, (j + v) as isize - 1);
                                    if a < 0 || b < 0 || a >= g.h as isize || b >= g.w as isize {
                                        continue;
                                    }
                                    let xi =
                                        ((n * g.c_in + c) * g.h + a as usize) * g.w + b as usize;
                                    sum +=
                                        w[((o * g.c_in + c) * 3 + u) * 3 + v] as f64 * x[xi] as f64;
                                }
                            }
                        }
                        y[((n * g.c_out + o) * g.h + i) * g.w + j] = sum;
                    }
                }
            }
        }
        y
    }

    /// Both row widths, channel counts with and without a partial block (3 output channels:
    /// the input gradient of the stem), several images per thread: the kernel equals the
    /// definition to f32 rounding of sums of this length.
    #[test]
    fn direct_convolution_matches_the_definition() {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for &(n, c_in, c_out, h, w) in &[
            (3, 16, 16, 32, 32),
            (2, 3, 16, 32, 32),
            (2, 16, 3, 32, 32),
            (5, 32, 32, 16, 16),
            (1, 8, 11, 4, 16),
            (4, 64, 8, 2, 32),
            (3, 64, 64, 8, 8),
            (2, 24, 5, 12, 8),
        ] {
            let g = ConvGeom {
                n,
                c_in,
                h,
                w,
                c_out,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
            };
            assert!(applies(&g));
            let x: Vec<f32> = (0..n * c_in * h * w)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let k: Vec<f32> = (0..c_out * c_in * 9)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            // NaN where the kernel would leave an element unwritten.
            let mut y = vec![MaybeUninit::new(f32::NAN); n * c_out * h * w];
            conv2d(&g, &x, &k, &mut y);
            // SAFETY: every element was initialised (to NaN) before the kernel ran.
            let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
            let bound = 2.0 * f32::EPSILON as f64 * (9 * c_in) as f64;
            for (a, b) in y.iter().zip(reference(&g, &x, &k)) {
                assert!(
                    (*a as f64 - b).abs() <= bound * b.abs().max(1.0),
                    "{g:?}: {a} vs {b}"
                );
            }
        }
    }

    /// dL/dw by its definition in f64.
    fn weight_reference(g: &ConvGeom, x: &[f32], dy: &[f32]) -> Vec<f64> {
        let mut dw = vec![0.0; g.c_out * g.c_in * 9];
        for n in 0..g.n {
            for o in 0..g.c_out {
                for c in 0..g.c_in {
                    for u in 0..3 {
                        for v in 0..3 {
                            let mut sum = 0.0;
                            for i in 0..g.h {
                                for j in 0..g.w {
                                    let (a, b) = ((i + u) as isize - 1, (j + v) as isize - 1);
                                    if a < 0 || b < 0 || a >= g.h as isize || b >= g.w as isize {
                                        continue;
                                    }
                                    let xi =
                                        ((n * g.c_in + c) * g.h + a as usize) * g.w + b as usize;
                                    let yi = ((n * g.c_out + o) * g.h + i) * g.w + j;
                                    sum += dy[yi] as f64 * x[xi] as f64;
                                }
                            }
                            dw[((o * g.c_in + c) * 3 + u) * 3 + v] += sum;
                        }
                    }
                }
            }
        }
        dw
    }

    /// Every row width, full and partial channel blocks on both sides (3 input channels: the
    /// stem; 5 and 3 output channels), batches that leave a short last pass, one and two parts:
    /// the kernel equals the definition to f32 rounding of sums of this length.
    #[test]
    fn direct_weight_gradient_matches_the_definition() {
        if !has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for &(n, c_in, c_out, h, w, parts) in &[
            (3, 16, 16, 32, 32, 2),
            (2, 3, 16, 32, 32, 1),
            (5, 32, 32, 16, 16, 2),
            (1, 8, 5, 4, 16, 2),
            (4, 7, 8, 2, 32, 3),
            (19, 64, 64, 8, 8, 2),
            (2, 24, 3, 12, 8, 1),
        ] {
            let g = ConvGeom {
                n,
                c_in,
                h,
                w,
                c_out,
                kh: 3,
                kw: 3,
                stride: 1,
                padding: 1,
            };
            let x: Vec<f32> = (0..n * c_in * h * w)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let dy: Vec<f32> = (0..n * c_out * h * w)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let dw = conv2d_backward_weight(&g, &x, &dy, parts);
            let bound = 2.0 * f32::EPSILON as f64 * (n * h * w) as f64;
            for (a, b) in dw.iter().zip(weight_reference(&g, &x, &dy)) {
                assert!(
                    (*a as f64 - b).abs() <= bound * b.abs().max(1.0),
                    "{g:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn other_geometries_do_not_apply() {
        let g = ConvGeom {
            n: 1,
            c_in: 1,
            h: 32,
            w: 32,
            c_out: 1,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
        };
        assert!(!applies(&ConvGeom { w: 4, h: 4, ..g }));
        assert!(!applies(&ConvGeom { w: 8, h: 6, ..g }));
        assert!(!applies(&ConvGeom { w: 16, h: 15, ..g }));
        assert!(!applies(&ConvGeom { stride: 2, ..g }));
        assert!(!applies(&ConvGeom {
            kh: 1,
            kw: 1,
            padding: 0,
            ..g
        }));
    }
}

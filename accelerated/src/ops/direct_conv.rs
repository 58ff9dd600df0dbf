//! Direct 3x3 convolution (stride 1, padding 1) in f32 with AVX-512, without an im2col
//! matrix: each output row is one or two 16-lane vectors (rows of at most 8 pixels: two rows
//! per vector), and a block of [`OUT_BLOCK`] output channels accumulates
//! `Σ_{c, u, v} w[o, c, u, v] · x[c, i + u − 1, j + v − 1]` in registers, reading every input
//! row straight from a zero-padded copy of the image. The im2col + GEMM path writes and reads
//! back a matrix 9x the input for every convolution; here the input is read from cache and
//! each loaded vector serves [`OUT_BLOCK`] multiply-adds. A row that is not a multiple of 16
//! pixels computes a partial last vector whose extra lanes are not stored.
//!
//! Used for the forward convolution and, through [`super::cpu_kernels::conv2d_backward_input`],
//! dL/dx, when the CPU has AVX-512F and a row is at most 32 pixels (every 3x3 stride-1
//! convolution of ResNet-20 on CIFAR-10 and Fashion-MNIST, VGG-16's on CIFAR); everything else
//! (strided and 1x1 convolutions, wider rows, f64, CPUs without AVX-512) stays on im2col +
//! GEMM. The sum over (c, u, v) runs in that order, so results are the same on every run and
//! thread count; they differ from the GEMM path's by rounding only.
//!
//! dL/dw ([`conv2d_backward_weight`]) runs on the same padded copies: for a few output and
//! input channels and one kernel row at a time, 16-lane accumulators per weight sum
//! `dy · x` over every output vector of a group of images, then join per-weight lane partial
//! sums that are added across lanes once, at the end.

use super::cpu_kernels::{sum_in_order, ConvGeom, ScaledGrad};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output channels one register block accumulates (16 accumulators of 16 lanes).
const OUT_BLOCK: usize = 8;

/// f32 lanes of a 512-bit vector.
const LANES: usize = 16;

/// Whether [`conv2d`] and [`conv2d_backward_weight`] compute this convolution on this CPU: a
/// 3x3 stride-1 "same" convolution of rows of at most 32 pixels.
pub fn applies(g: &ConvGeom) -> bool {
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding == 1;
    shape && (1..=2 * LANES).contains(&g.w) && g.h > 0 && has_avx512()
}

/// How the kernels cut an image's rows into 16-lane vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Rows of at most 8 pixels: two rows per vector (lanes 0..W and 8..8 + W), four rows per
    /// step of the forward kernel.
    Paired,
    /// Rows of 9 to 16 pixels: one vector per row, two rows per step.
    One,
    /// Rows of 17 to 32 pixels: two vectors per row, one row per step.
    Two,
}

impl Rows {
    fn of(g: &ConvGeom) -> Self {
        match g.w {
            0..=8 => Rows::Paired,
            9..=16 => Rows::One,
            _ => Rows::Two,
        }
    }

    /// Output rows one step of the forward kernel covers.
    fn per_step(self) -> usize {
        match self {
            Rows::Paired => 4,
            Rows::One => 2,
            Rows::Two => 1,
        }
    }
}

/// The lanes below `count` (at most 16).
fn low_lanes(count: usize) -> u16 {
    ((1u32 << count.min(LANES)) - 1) as u16
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// The image a convolution reads.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The values as they are.
    Plain(&'a [f32]),
    /// `scale_c · masked(grad, mask)`, computed while the kernel copies the image in: a
    /// backward pass's dL/dy through an eval-mode BatchNorm (and the ReLU after it), never
    /// written as a tensor of its own ([`ScaledGrad`]).
    Scaled(ScaledGrad<'a, f32>),
}

impl<'a> Source<'a> {
    fn len(&self) -> usize {
        match self {
            Source::Plain(x) => x.len(),
            Source::Scaled(s) => s.grad.len(),
        }
    }

    /// Elements `start..start + len` (whole images).
    fn range(&self, start: usize, len: usize) -> Source<'a> {
        match *self {
            Source::Plain(x) => Source::Plain(&x[start..start + len]),
            Source::Scaled(s) => Source::Scaled(ScaledGrad {
                grad: &s.grad[start..start + len],
                mask: s.mask.map(|m| &m[start..start + len]),
                scale: s.scale,
            }),
        }
    }
}

/// The convolution `y = conv(x, w)` (`[N, C_in, H, W] * [C_out, C_in, 3, 3]`, output
/// `[N, C_out, H, W]`); `g` must satisfy [`applies`]. One range of images per thread.
pub fn conv2d(g: &ConvGeom, x: Source<'_>, w: &[f32], y: &mut [MaybeUninit<f32>]) {
    assert!(
        applies(g),
        "direct_conv::conv2d on an unsupported geometry {g:?}"
    );
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.h * g.w);
    assert_eq!(x.len(), g.n * in_image, "conv2d input length");
    if let Source::Scaled(s) = x {
        assert_eq!(s.scale.len(), g.c_in, "conv2d input scale length");
        assert!(
            s.mask.is_none_or(|m| m.len() == x.len()),
            "conv2d mask length"
        );
    }
    assert_eq!(y.len(), g.n * out_image, "conv2d output length");
    assert_eq!(w.len(), g.c_out * g.c_in * 9, "conv2d weight length");
    let per_task = g.n.div_ceil(rayon::current_num_threads().max(1)).max(1);
    y.par_chunks_mut(per_task * out_image)
        .enumerate()
        .for_each(|(task, ys)| {
            let mut padded = Padded::new(g);
            for (i, y) in ys.chunks_exact_mut(out_image).enumerate() {
                padded.fill(g, x.range((task * per_task + i) * in_image, in_image));
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
    let vectors = Vector::all(g);
    let per_pass = WEIGHT_PASS_VECTORS.div_ceil(vectors.len()).min(per_task);
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
                    p.fill(g, Source::Plain(x));
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `applies` checked that the CPU has AVX-512F; the first `images`
                // entries of `padded` hold the images of `dys` in the layout `Layout::of(g)`,
                // `vectors` are the output vectors of `g` and `lanes` has 16 entries per
                // weight.
                unsafe {
                    avx512::weight_grad(g, &padded[..images], dys, &vectors, &mut lanes)
                };
            }
            lanes
                .chunks_exact(LANES)
                .map(|l| l.iter().fold(0.0, |a, &b| a + b))
                .collect()
        })
        .collect();
    sum_in_order(sums, weights)
}

/// One image with a zero border: `[C_in][rows][row]` after one zero entry, where `rows` is
/// `H + 2` with `H` rounded up to the forward kernel's rows per step (the rows a last, partial
/// step reads are zero), and [`LANES`] more zero entries at the end. Rows of more than 8 pixels
/// are padded on both sides (`row = W + 2`), and a vector that reaches past a row's last pixel
/// reads the next row (lanes whose output is never stored, or whose dY is zero). Rows of at most
/// 8 pixels are not (`row = 8`, zero after the last pixel): their kernels load two rows per
/// vector and zero the lanes of the columns outside the image with a mask, reading one entry
/// before or after a row.
struct Padded {
    data: Vec<f32>,
}

/// Where [`Padded`] puts things for one geometry.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Entries of a row: `W + 2`, or 8 for rows of at most 8 pixels.
    row: usize,
    /// Entries of a channel: `rows·row`.
    plane: usize,
    /// Columns of zeros left of a row: 1, or 0 for rows of at most 8 pixels.
    left: usize,
}

impl Layout {
    fn of(g: &ConvGeom) -> Self {
        let rows = Rows::of(g);
        let (row, left) = if rows == Rows::Paired {
            (LANES / 2, 0)
        } else {
            (g.w + 2, 1)
        };
        Layout {
            row,
            plane: (g.h.next_multiple_of(rows.per_step()) + 2) * row,
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
            data: vec![0.0; 1 + g.c_in * Layout::of(g).plane + LANES],
        }
    }

    /// Copies the image `x` (`[C_in, H, W]`) inside the border, which stays zero.
    fn fill(&mut self, g: &ConvGeom, x: Source<'_>) {
        let at = Layout::of(g);
        // Column 0 of the image is tap v = 1 of output column 0.
        let rows = (0..g.c_in).flat_map(|c| (0..g.h).map(move |i| (c, i)));
        for (k, (c, i)) in rows.enumerate() {
            let line = k * g.w..(k + 1) * g.w;
            let dst = &mut self.data[at.tap(c, i + 1, 1)..][..g.w];
            match x {
                Source::Plain(x) => dst.copy_from_slice(&x[line]),
                Source::Scaled(s) => s.row(c, line, dst),
            }
        }
    }
}

/// One output vector of an image, as the dL/dw kernel reads it.
#[derive(Debug, Clone, Copy)]
struct Vector {
    /// Its first output pixel in a plane (`[H][W]`).
    first: usize,
    /// The padded row its tap `u = 0` reads (that of the vector's first output row).
    row: usize,
    /// The column its lane 0 starts at (a multiple of 16).
    column: usize,
    /// Its lanes inside the image: a prefix of the first output row, and for paired rows
    /// (lanes 8..) the next row's when there is one.
    lanes: u16,
}

impl Vector {
    /// Every output vector of a plane of `g`, in the order of the rows.
    fn all(g: &ConvGeom) -> Vec<Vector> {
        let mut all = Vec::new();
        if Rows::of(g) == Rows::Paired {
            for row in (0..g.h).step_by(2) {
                let second = if row + 1 < g.h {
                    low_lanes(g.w) << 8
                } else {
                    0
                };
                all.push(Vector {
                    first: row * g.w,
                    row,
                    column: 0,
                    lanes: low_lanes(g.w) | second,
                });
            }
        } else {
            for row in 0..g.h {
                for column in (0..g.w).step_by(LANES) {
                    all.push(Vector {
                        first: row * g.w + column,
                        row,
                        column,
                        lanes: low_lanes(g.w - column),
                    });
                }
            }
        }
        all
    }
}

/// The load masks of input taps `v` = 0, 1, 2 for rows paired in vectors (lanes 0..W, 8..8 + W):
/// the lanes whose column `j + v − 1` lies outside the image are zeroed (column −1 of lanes 0
/// and 8; column W of lanes W − 1 and 7 + W, which for W < 8 read the zero column anyway).
fn paired_masks(w: usize) -> [u16; 3] {
    let edge = |j: usize| !((1u16 << j) | (1u16 << (j + 8)));
    [edge(0), u16::MAX, edge(w - 1)]
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
    use super::{
        blocks, low_lanes, paired_masks, ConvGeom, Layout, Rows, Vector, LANES, OUT_BLOCK,
    };
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// One image: `xp` the [`super::Padded`] image, `y` `[C_out][H][W]` (every element
    /// written). Rows of 17 to 32 pixels are two vectors, one row at a time; rows of 9 to 16 one
    /// vector, two rows at a time; rows of at most 8 half a vector, four rows (two vectors) at a
    /// time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `xp`, `w` and `y` must have the lengths of `g`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn image(g: &ConvGeom, xp: &[f32], w: &[f32], y: &mut [MaybeUninit<f32>]) {
        let y = y.as_mut_ptr().cast::<f32>();
        for (o, full) in blocks(g.c_out, OUT_BLOCK) {
            match (Rows::of(g), full) {
                (Rows::Two, true) => rows::<OUT_BLOCK, 1, 2>(g, xp, w, y, o),
                (Rows::Two, false) => rows::<1, 1, 2>(g, xp, w, y, o),
                (Rows::One, true) => rows::<OUT_BLOCK, 2, 1>(g, xp, w, y, o),
                (Rows::One, false) => rows::<1, 2, 1>(g, xp, w, y, o),
                (Rows::Paired, true) => paired::<OUT_BLOCK>(g, xp, w, y, o),
                (Rows::Paired, false) => paired::<1>(g, xp, w, y, o),
            }
        }
    }

    /// Output channels `o0..o0 + OUTS` of an image of rows of at most 8 pixels: each vector
    /// holds two output rows, each input vector the two input rows they read, loaded from one
    /// column before (`v` = 0) or after (`v` = 2) the row with the lanes of the column outside
    /// the image zeroed. Rows past the image are read from the zero rows and not stored.
    #[target_feature(enable = "avx512f")]
    unsafe fn paired<const OUTS: usize>(
        g: &ConvGeom,
        xp: &[f32],
        w: &[f32],
        y: *mut f32,
        o0: usize,
    ) {
        let masks = paired_masks(g.w);
        let (layout, taps) = (Layout::of(g), g.c_in * 9);
        let (xp, w) = (xp.as_ptr(), w.as_ptr());
        for i0 in (0..g.h).step_by(4) {
            let mut acc = [[_mm512_setzero_ps(); 2]; OUTS];
            for c in 0..g.c_in {
                for u in 0..3 {
                    for (v, &mask) in masks.iter().enumerate() {
                        // Output rows i0 + 2k, i0 + 2k + 1 read padded rows i0 + 2k + u and the
                        // next, columns v − 1 .. v + 7 (the rows of 8 entries lie back to back).
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
                    let row = i0 + 2 * k;
                    if row >= g.h {
                        continue;
                    }
                    let rows = if row + 1 < g.h { 2 } else { 1 };
                    let at = y.add(((o0 + o) * g.h + row) * g.w);
                    if g.w == LANES / 2 && rows == 2 {
                        _mm512_storeu_ps(at, sum);
                    } else {
                        // Lanes 0..W and 8..8 + W, packed to the 2W pixels of the two rows.
                        let lanes = low_lanes(g.w) | (low_lanes(g.w) << 8);
                        let packed = _mm512_maskz_compress_ps(lanes, sum);
                        _mm512_mask_storeu_ps(at, low_lanes(rows * g.w), packed);
                    }
                }
            }
        }
    }

    /// Output channels `o0..o0 + OUTS` of an image of rows of more than 8 pixels, `ROWS` output
    /// rows of `VECS` vectors at a time. The last vector of a row that is not a multiple of 16
    /// pixels reads on into the next padded row in its extra lanes, which are not stored; rows
    /// past the image are read from the zero rows and not stored.
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
                    if i0 + r >= g.h {
                        continue;
                    }
                    let at = ((o0 + o) * g.h + i0 + r) * g.w;
                    for (k, &sum) in row.iter().enumerate() {
                        let lanes = g.w - k * LANES;
                        if lanes >= LANES {
                            _mm512_storeu_ps(y.add(at + k * LANES), sum);
                        } else {
                            _mm512_mask_storeu_ps(y.add(at + k * LANES), low_lanes(lanes), sum);
                        }
                    }
                }
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
    /// `Layout::of(g)`, `vectors` must be `Vector::all(g)` and `lanes` must have
    /// `16·C_out·C_in·9` entries.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weight_grad(
        g: &ConvGeom,
        xps: &[super::Padded],
        dys: &[f32],
        vectors: &[Vector],
        lanes: &mut [f32],
    ) {
        let pass = Pass {
            g,
            xps,
            dys,
            vectors,
        };
        for (o, o_full) in blocks(g.c_out, WEIGHT_OUTS) {
            for (c, c_full) in blocks(g.c_in, WEIGHT_INS) {
                for u in 0..3 {
                    let at = (o, c, u);
                    match (o_full, c_full) {
                        (true, true) => pass.run::<WEIGHT_OUTS, WEIGHT_INS>(lanes, at),
                        (true, false) => pass.run::<WEIGHT_OUTS, 1>(lanes, at),
                        (false, true) => pass.run::<1, WEIGHT_INS>(lanes, at),
                        (false, false) => pass.run::<1, 1>(lanes, at),
                    }
                }
            }
        }
    }

    /// What every dL/dw pass over a group of images reads.
    struct Pass<'a> {
        g: &'a ConvGeom,
        xps: &'a [super::Padded],
        dys: &'a [f32],
        vectors: &'a [Vector],
    }

    impl Pass<'_> {
        /// One dL/dw pass: output channels `o0..o0 + OUTS`, input channels `c0..c0 + INS`,
        /// kernel row `u`, over every output vector of every image. A vector's dY lanes
        /// outside the image are zero (for paired rows narrower than 8, the 2W pixels are
        /// spread to lanes 0..W and 8..8 + W), so the input the other lanes read adds nothing.
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const OUTS: usize, const INS: usize>(
            &self,
            lanes: &mut [f32],
            (o0, c0, u): (usize, usize, usize),
        ) {
            let g = self.g;
            let masks = if Rows::of(g) == Rows::Paired {
                paired_masks(g.w)
            } else {
                [u16::MAX; 3]
            };
            let spread = g.w < LANES / 2;
            let (layout, pixels) = (Layout::of(g), g.h * g.w);
            let mut acc = [[[_mm512_setzero_ps(); 3]; INS]; OUTS];
            for (xp, dy) in self.xps.iter().zip(self.dys.chunks_exact(g.c_out * pixels)) {
                let (xp, dy) = (xp.data.as_ptr(), dy.as_ptr());
                for vector in self.vectors {
                    let grads: [__m512; OUTS] = std::array::from_fn(|o| {
                        let at = dy.add((o0 + o) * pixels + vector.first);
                        if spread {
                            let count = vector.lanes.count_ones() as usize;
                            let packed = _mm512_maskz_loadu_ps(low_lanes(count), at);
                            _mm512_maskz_expand_ps(vector.lanes, packed)
                        } else {
                            _mm512_maskz_loadu_ps(vector.lanes, at)
                        }
                    });
                    for c in 0..INS {
                        for (v, &mask) in masks.iter().enumerate() {
                            let at = layout.tap(c0 + c, vector.row + u, v) + vector.column;
                            let input = _mm512_maskz_loadu_ps(mask, xp.add(at));
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A 3x3 stride-1 "same" convolution of `n` images.
    fn same_3x3(n: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> ConvGeom {
        ConvGeom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh: 3,
            kw: 3,
            stride: 1,
            padding: 1,
        }
    }

    /// `len` values drawn uniformly from [-1, 1).
    fn uniform(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

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

    /// Every kind of row (32, 16 and 8 pixels as on CIFAR, 28, 14 and 7 as on Fashion-MNIST,
    /// rows that leave a partial last vector, odd heights that leave a partial last step, a
    /// 1x1 image), channel counts with and without a partial block (3 output channels: the
    /// input gradient of the stem), several images per thread: the kernel equals the
    /// definition to f32 rounding of sums of this length and writes every output element.
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
            (2, 5, 9, 28, 28),
            (3, 6, 8, 14, 14),
            (4, 3, 5, 7, 7),
            (2, 4, 3, 5, 3),
            (1, 2, 2, 1, 1),
            (1, 3, 8, 3, 20),
            (2, 3, 8, 6, 9),
            (1, 2, 8, 9, 31),
        ] {
            let g = same_3x3(n, c_in, c_out, h, w);
            assert!(applies(&g));
            let x = uniform(n * c_in * h * w, &mut rng);
            let k = uniform(c_out * c_in * 9, &mut rng);
            // NaN where the kernel would leave an element unwritten.
            let mut y = vec![MaybeUninit::new(f32::NAN); n * c_out * h * w];
            conv2d(&g, Source::Plain(&x), &k, &mut y);
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

    /// The rows of the forward test, full and partial channel blocks on both sides (3 input
    /// channels: the stem; 5 and 3 output channels), batches that leave a short last pass, one
    /// and two parts:
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
            (3, 5, 9, 28, 28, 2),
            (5, 6, 8, 14, 14, 2),
            (9, 3, 5, 7, 7, 2),
            (2, 4, 3, 5, 3, 1),
            (3, 2, 2, 1, 1, 2),
            (2, 3, 8, 3, 20, 2),
            (4, 3, 8, 6, 9, 1),
            (1, 2, 8, 9, 31, 1),
        ] {
            let g = same_3x3(n, c_in, c_out, h, w);
            let x = uniform(n * c_in * h * w, &mut rng);
            let dy = uniform(n * c_out * h * w, &mut rng);
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
    fn strided_wide_and_other_kernels_do_not_apply() {
        let g = same_3x3(1, 1, 1, 32, 32);
        assert!(!applies(&ConvGeom { w: 33, ..g }));
        assert!(!applies(&ConvGeom { h: 0, ..g }));
        assert!(!applies(&ConvGeom { stride: 2, ..g }));
        assert!(!applies(&ConvGeom { padding: 0, ..g }));
        assert!(!applies(&ConvGeom {
            kh: 1,
            kw: 1,
            padding: 0,
            ..g
        }));
    }
}

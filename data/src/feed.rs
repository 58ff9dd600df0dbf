//! Feeding training images: a seeded order per epoch, batches, and the standard CIFAR
//! augmentation (protocols.md: random crop with zero padding, random horizontal flip).
//!
//! **Order.** Epoch `e` visits the training images in the permutation drawn from
//! `Stream::DataOrder` with index `e` ([`crate::split::permutation`]); batch `b` is positions
//! `b·B .. min((b+1)·B, n)` of it. The last batch keeps the remainder (it has `n mod B` images
//! when B does not divide n); a caller that wants equal batches drops it.
//!
//! **Augmentation.** The crops and flips of batch `b` of epoch `e` are drawn from
//! `Stream::Augmentation` with index `e · 2^32 + b` ([`augment_stream_index`]), in the batch's
//! image order: for each image the crop's top offset, then its left offset (each uniform in
//! `0..=2·padding`, via [`crate::split::below`]), then the flip (`below(2) == 1`). Every batch
//! has its own stream, so a run resumed at batch b of epoch e draws exactly what an
//! uninterrupted run draws there. Callers must give each epoch of a run its own number (for
//! example count pre-training and training epochs together), since the same epoch number
//! repeats the same order and augmentation.

use eio_spec::config::DataConfig;
use eio_spec::rng::{Seeds, Stream};

use crate::images::{unit, ImageShape, Images};
use crate::split::{below, permutation};

/// Random crop with zero padding and random horizontal flip (the standard CIFAR training
/// augmentation: torchvision's `RandomCrop(size, padding)` then `RandomHorizontalFlip()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Zeros added on every side before cropping back to the original size.
    pub padding: usize,
    /// Flip left-right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// The augmentation `data` asks for: None when `data.augment` is false, else crop with
    /// `data.crop_padding` and flip.
    pub fn from_config(data: &DataConfig) -> Option<Augment> {
        data.augment.then_some(Augment {
            padding: data.crop_padding,
            flip: true,
        })
    }
}

/// The random part of one image's augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AugmentDraw {
    /// Row of the padded image where the crop starts, `0..=2·padding` (`padding` = no shift).
    pub top: usize,
    /// Column of the padded image where the crop starts, `0..=2·padding`.
    pub left: usize,
    /// Mirror left-right after cropping.
    pub flip: bool,
}

/// The augmentation stream index of batch `batch` of epoch `epoch`: `epoch · 2^32 + batch`
/// (both below 2^32).
pub fn augment_stream_index(epoch: usize, batch: usize) -> u64 {
    ((epoch as u64) << 32) | (batch as u64 & 0xffff_ffff)
}

/// Applies one draw to one image (C, H, W values): with `p = padding`,
/// `out[c][y][x] = src[c][y + top - p][x' + left - p]` where `x' = W-1-x` when flipped, else
/// `x`, and 0 (`T::default()`) where that falls outside the image. Works on the stored bytes
/// (u8) as on f32 pixels: it only moves values and writes zeros, so augmenting the bytes and
/// then converting gives the same f32 values as converting then augmenting.
///
/// # Panics
/// When `src` or `out` is not `shape.len()` long.
pub fn augment_image<T: Copy + Default>(
    src: &[T],
    shape: ImageShape,
    padding: usize,
    draw: AugmentDraw,
    out: &mut [T],
) {
    augment_map(src, shape, padding, draw, out, |v| v);
}

/// [`augment_image`] of an image's bytes, written as f32 in [0, 1] ([`unit()`]): what
/// [`EpochPlan::batch`] gives an engine.
///
/// # Panics
/// When `src` or `out` is not `shape.len()` long.
pub fn augment_unit(
    src: &[u8],
    shape: ImageShape,
    padding: usize,
    draw: AugmentDraw,
    out: &mut [f32],
) {
    augment_map(src, shape, padding, draw, out, unit);
}

fn augment_map<S: Copy, D: Copy + Default>(
    src: &[S],
    shape: ImageShape,
    padding: usize,
    draw: AugmentDraw,
    out: &mut [D],
    convert: impl Fn(S) -> D,
) {
    let (c, h, w) = (shape.channels, shape.height, shape.width);
    assert_eq!(src.len(), shape.len(), "augment_image: source length");
    assert_eq!(out.len(), shape.len(), "augment_image: output length");
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        let dst = &mut out[ch * h * w..(ch + 1) * h * w];
        for y in 0..h {
            let sy = (y + draw.top).checked_sub(padding).filter(|&sy| sy < h);
            for x in 0..w {
                let xx = if draw.flip { w - 1 - x } else { x };
                let sx = (xx + draw.left).checked_sub(padding).filter(|&sx| sx < w);
                dst[y * w + x] = match (sy, sx) {
                    (Some(sy), Some(sx)) => convert(plane[sy * w + sx]),
                    _ => D::default(),
                };
            }
        }
    }
}

/// One batch of training images, ready for an engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `len` images, C·H·W values each, laid out as [`Images::pixels`], as f32 in [0, 1]
    /// (`byte / 255`, [`unit()`]).
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
    pub len: usize,
    /// Which training images these are (indices into the `Images` given to
    /// [`EpochPlan::batch`]).
    pub indices: Vec<usize>,
}

/// The order and batches of one training epoch (see the module docs for the streams).
#[derive(Debug, Clone)]
pub struct EpochPlan {
    epoch: usize,
    batch_size: usize,
    order: Vec<usize>,
    seeds: Seeds,
}

impl EpochPlan {
    /// The plan of epoch `epoch` over `train_len` images in batches of `batch_size`.
    ///
    /// # Panics
    /// When `batch_size` is 0 (a validated config has `train.batch_size >= 1`).
    pub fn new(train_len: usize, batch_size: usize, epoch: usize, seeds: &Seeds) -> Self {
        assert!(batch_size > 0, "EpochPlan: batch_size must be >= 1");
        let mut rng = seeds.stream(Stream::DataOrder, epoch as u64);
        EpochPlan {
            epoch,
            batch_size,
            order: permutation(train_len, &mut rng),
            seeds: *seeds,
        }
    }

    /// The epoch number.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// The images of the epoch, in visiting order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Number of batches, the last one possibly partial: ceil(n / B).
    pub fn batches(&self) -> usize {
        self.order.len().div_ceil(self.batch_size)
    }

    /// The image indices of batch `b`.
    ///
    /// # Panics
    /// When `b >= self.batches()`.
    pub fn batch_indices(&self, b: usize) -> &[usize] {
        assert!(b < self.batches(), "batch {b} of {}", self.batches());
        let start = b * self.batch_size;
        &self.order[start..(start + self.batch_size).min(self.order.len())]
    }

    /// The augmentation draws of batch `b`, one per image in batch order.
    ///
    /// # Panics
    /// When `b >= self.batches()`.
    pub fn augment_draws(&self, b: usize, augment: Augment) -> Vec<AugmentDraw> {
        let n = self.batch_indices(b).len();
        let mut rng = self
            .seeds
            .stream(Stream::Augmentation, augment_stream_index(self.epoch, b));
        let span = 2 * augment.padding as u64 + 1;
        (0..n)
            .map(|_| {
                let top = below(&mut rng, span) as usize;
                let left = below(&mut rng, span) as usize;
                let flip = below(&mut rng, 2) == 1;
                AugmentDraw {
                    top,
                    left,
                    flip: augment.flip && flip,
                }
            })
            .collect()
    }

    /// Batch `b` of `images`, augmented when `augment` is Some, converted to f32 in [0, 1]
    /// (only this batch's images are converted).
    ///
    /// # Panics
    /// When `b >= self.batches()` or `images.len()` is not the `train_len` of [`EpochPlan::new`].
    pub fn batch(&self, images: &Images, b: usize, augment: Option<Augment>) -> Batch {
        assert_eq!(
            images.len(),
            self.order.len(),
            "EpochPlan made for {} images, given {}",
            self.order.len(),
            images.len()
        );
        let indices = self.batch_indices(b).to_vec();
        let l = images.shape.len();
        let mut pixels = vec![0.0f32; indices.len() * l];
        let labels = indices.iter().map(|&i| images.labels[i]).collect();
        match augment {
            None => images.write_unit(&indices, &mut pixels),
            Some(aug) => {
                let draws = self.augment_draws(b, aug);
                for ((dst, &i), draw) in pixels.chunks_exact_mut(l.max(1)).zip(&indices).zip(draws)
                {
                    augment_unit(images.image(i), images.shape, aug.padding, draw, dst);
                }
            }
        }
        Batch {
            len: indices.len(),
            pixels,
            labels,
            indices,
        }
    }
}

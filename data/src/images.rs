//! Images in memory: the bytes the files hold (u8, NCHW), with u32 labels; converted to f32 in
//! [0, 1] (byte / 255) a batch at a time.

use std::fmt;
use std::ops::Range;

use crate::DataError;

/// The size of one image: channels, height, width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// `channels x height x width`.
    pub fn new(channels: usize, height: usize, width: usize) -> Self {
        ImageShape {
            channels,
            height,
            width,
        }
    }

    /// Values per image, C·H·W.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// True when the shape holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for ImageShape {
    /// `3x32x32` (channels x height x width).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// A set of labelled images of one shape.
///
/// Image `i` is `pixels[i·L .. (i+1)·L]` with `L = shape.len()`, laid out channel by channel,
/// each channel row by row (C, H, W). The values are the bytes the files give (IDX, CIFAR
/// binaries, decoded JPEG/PNG); an engine sees them as f32 in [0, 1], `byte / 255`
/// ([`unit()`]), converted a batch at a time by [`Images::unit_pixels`],
/// [`Images::unit_range`] or [`Images::write_unit`], so a data set takes a quarter of the
/// memory it would as f32. Its label is `labels[i]`. The fields are public for reading; build
/// with [`Images::new`], which checks the lengths.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub shape: ImageShape,
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
}

impl Images {
    /// Images from their parts.
    ///
    /// # Errors
    /// [`DataError::BadHeader`] (origin `Images::new`) when `pixels.len()` is not
    /// `labels.len() · shape.len()`.
    pub fn new(shape: ImageShape, pixels: Vec<u8>, labels: Vec<u32>) -> Result<Self, DataError> {
        if labels.len().checked_mul(shape.len()) != Some(pixels.len()) {
            return Err(DataError::BadHeader {
                origin: "Images::new".into(),
                message: format!(
                    "{} pixel values for {} labels of shape {shape}",
                    pixels.len(),
                    labels.len()
                ),
            });
        }
        Ok(Images {
            shape,
            pixels,
            labels,
        })
    }

    /// Images from f32 pixels that are each `byte / 255` of a byte ([`unit()`]), as
    /// [`Images::unit_pixels`] gives them (a file of clean images written as f32, say).
    ///
    /// # Errors
    /// [`DataError::BadHeader`] naming `origin` when a value is not `b / 255` of any byte `b`
    /// (an adversarial image, say) or the lengths disagree as in [`Images::new`].
    pub fn from_unit(
        shape: ImageShape,
        pixels: &[f32],
        labels: Vec<u32>,
        origin: &str,
    ) -> Result<Self, DataError> {
        let bytes = pixels
            .iter()
            .enumerate()
            .map(|(k, &v)| {
                byte_of_unit(v).ok_or_else(|| DataError::BadHeader {
                    origin: origin.to_string(),
                    message: format!(
                        "pixel value {v} at position {k} is not byte / 255 of any byte 0..=255"
                    ),
                })
            })
            .collect::<Result<Vec<u8>, DataError>>()?;
        Images::new(shape, bytes, labels).map_err(|e| match e {
            DataError::BadHeader { message, .. } => DataError::BadHeader {
                origin: origin.to_string(),
                message,
            },
            other => other,
        })
    }

    /// No images, of `shape`.
    pub fn empty(shape: ImageShape) -> Self {
        Images {
            shape,
            pixels: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The bytes of image `i` (C·H·W values).
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let l = self.shape.len();
        &self.pixels[i * l..(i + 1) * l]
    }

    /// Image `i` as f32 in [0, 1] ([`unit()`] of each byte).
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn image_unit(&self, i: usize) -> Vec<f32> {
        self.image(i).iter().copied().map(unit).collect()
    }

    /// Every pixel as f32 in [0, 1], image after image ([`unit()`] of each byte): what
    /// the engines take. Allocates 4 bytes per pixel, so take it of a batch ([`Images::subset`],
    /// [`Images::unit_range`]) rather than of a whole data set.
    pub fn unit_pixels(&self) -> Vec<f32> {
        self.pixels.iter().copied().map(unit).collect()
    }

    /// Images `range` as f32 in [0, 1], image after image: one batch for an engine.
    ///
    /// # Panics
    /// When `range.end > self.len()` or `range.start > range.end`.
    pub fn unit_range(&self, range: Range<usize>) -> Vec<f32> {
        let l = self.shape.len();
        self.pixels[range.start * l..range.end * l]
            .iter()
            .copied()
            .map(unit)
            .collect()
    }

    /// Writes the images at `indices` (repeats allowed), in that order, into `out` as f32 in
    /// [0, 1]: image k of the list goes to `out[k·L .. (k+1)·L]`.
    ///
    /// # Panics
    /// When an index is `>= self.len()` or `out` is not `indices.len() · L` long.
    pub fn write_unit(&self, indices: &[usize], out: &mut [f32]) {
        let l = self.shape.len();
        assert_eq!(
            out.len(),
            indices.len() * l,
            "Images::write_unit: output length"
        );
        for (dst, &i) in out.chunks_exact_mut(l.max(1)).zip(indices) {
            for (d, &b) in dst.iter_mut().zip(self.image(i)) {
                *d = unit(b);
            }
        }
    }

    /// The images at `indices`, in that order (repeats allowed).
    ///
    /// # Panics
    /// When an index is `>= self.len()`.
    pub fn subset(&self, indices: &[usize]) -> Images {
        let mut pixels = Vec::with_capacity(indices.len() * self.shape.len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Images {
            shape: self.shape,
            pixels,
            labels,
        }
    }

    /// Appends `other`'s images.
    ///
    /// # Errors
    /// [`DataError::WrongImageSize`] naming `origin` when the shapes differ.
    pub fn append(&mut self, other: Images, origin: &str) -> Result<(), DataError> {
        if other.shape != self.shape {
            return Err(DataError::WrongImageSize {
                origin: origin.to_string(),
                expected: self.shape,
                found: other.shape,
            });
        }
        self.pixels.extend(other.pixels);
        self.labels.extend(other.labels);
        Ok(())
    }

    /// Images per class: `counts[k]` images have label `k` (labels `>= classes` are not
    /// counted).
    pub fn class_counts(&self, classes: usize) -> Vec<usize> {
        let mut counts = vec![0; classes];
        for &l in &self.labels {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// Byte `b` as a pixel value in [0, 1]: `f32::from(b) / 255.0`, the division rounded to the
/// nearest f32 (protocols.md: normalisation is the model's first op; the data give `b / 255`).
///
/// ```
/// assert_eq!(eio_data::unit(0), 0.0);
/// assert_eq!(eio_data::unit(255), 1.0);
/// assert_eq!(eio_data::unit(51), 0.2);
/// ```
#[inline]
pub fn unit(b: u8) -> f32 {
    f32::from(b) / 255.0
}

/// The byte `b` with `unit(b) == v`, if there is one (the 256 values are distinct).
fn byte_of_unit(v: f32) -> Option<u8> {
    if !(0.0..=1.0).contains(&v) {
        return None;
    }
    // Rounds to the nearest byte; exact because unit is increasing and its values are far
    // more than one f32 ulp apart.
    let b = (v * 255.0).round() as u8;
    (unit(b).to_bits() == v.to_bits()).then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_byte_over_255_for_every_byte() {
        for b in 0..=255u8 {
            let want = f32::from(b) / 255.0;
            assert_eq!(unit(b).to_bits(), want.to_bits(), "byte {b}");
            assert_eq!(byte_of_unit(unit(b)), Some(b), "byte {b} back");
        }
    }

    #[test]
    fn from_unit_rejects_values_that_are_not_bytes() {
        let shape = ImageShape::new(1, 1, 2);
        let ok = Images::from_unit(shape, &[unit(7), unit(255)], vec![3], "clean.safetensors");
        assert_eq!(ok.unwrap().pixels, vec![7, 255]);
        for bad in [0.5f32, -0.0 - 1e-3, 1.5, f32::NAN, unit(7) + 1e-6] {
            let err = Images::from_unit(shape, &[unit(1), bad], vec![0], "clean.safetensors")
                .unwrap_err()
                .to_string();
            assert!(err.contains("clean.safetensors"), "{err}");
            assert!(err.contains("position 1"), "{err}");
        }
        let err = Images::from_unit(shape, &[unit(1)], vec![0], "clean.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("clean.safetensors"), "{err}");
    }

    #[test]
    fn batches_convert_the_bytes_they_hold() {
        let shape = ImageShape::new(1, 1, 3);
        let images = Images::new(shape, (0..12).map(|b| b * 20).collect(), vec![0, 1, 2, 3])
            .expect("consistent sizes");
        let all = images.unit_pixels();
        assert_eq!(all.len(), 12);
        for (v, &b) in all.iter().zip(&images.pixels) {
            assert_eq!(v.to_bits(), unit(b).to_bits());
        }
        assert_eq!(images.unit_range(1..3), all[3..9].to_vec());
        assert_eq!(images.unit_range(2..2), Vec::<f32>::new());
        assert_eq!(images.image_unit(3), all[9..12].to_vec());
        let mut out = vec![f32::NAN; 9];
        images.write_unit(&[3, 0, 3], &mut out);
        assert_eq!(out[..3], all[9..12]);
        assert_eq!(out[3..6], all[0..3]);
        assert_eq!(out[6..9], all[9..12]);
        assert_eq!(
            images.subset(&[3, 0, 3]).unit_pixels(),
            out,
            "subset then convert = convert the chosen images"
        );
    }
}

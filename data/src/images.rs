//! Images in memory: f32 pixels in [0, 1], NCHW, with u32 labels.

use std::fmt;

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
/// each channel row by row (C, H, W), values in [0, 1] (byte / 255). Its label is `labels[i]`.
/// The fields are public for reading; build with [`Images::new`], which checks the lengths.
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    pub shape: ImageShape,
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Images {
    /// Images from their parts.
    ///
    /// # Errors
    /// [`DataError::BadHeader`] (origin `Images::new`) when `pixels.len()` is not
    /// `labels.len() · shape.len()`.
    pub fn new(shape: ImageShape, pixels: Vec<f32>, labels: Vec<u32>) -> Result<Self, DataError> {
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

    /// The pixels of image `i` (C·H·W values).
    ///
    /// # Panics
    /// When `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let l = self.shape.len();
        &self.pixels[i * l..(i + 1) * l]
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

/// Byte `b` as a pixel value in [0, 1].
#[inline]
pub(crate) fn unit(b: u8) -> f32 {
    f32::from(b) / 255.0
}

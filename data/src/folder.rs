//! Image folders: `<root>/<split>/<class>/<image>` of JPEG or PNG files, on disk or in a
//! `.tar.gz`.
//!
//! Classes are the sub-folders of the split, sorted by name (byte order of the UTF-8 names);
//! class k is the k-th name. Images in a class folder are read in name order. `<root>` may
//! also be the one sub-folder of the given folder or archive that holds the splits (a tarball
//! with a top-level folder). Names starting with `.` (`.DS_Store`, `._x.jpg` from macOS
//! archives, hidden folders) are not part of the layout and are passed over; anything else
//! that is not a class folder, or not a decodable image, is an error.

use std::path::Path;

use image::DynamicImage;

use crate::images::{ImageShape, Images};
use crate::tree::Tree;
use crate::DataError;

/// A split of an image-folder layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The folder name: `train` or `test`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// How many channels decoded images get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    /// 1 for a grey image, 3 for a colour one (alpha dropped); every image of the split must
    /// then agree with the first.
    Auto,
    /// Convert every image to 1 (luma, ITU-R BT.709 weights as the `image` crate) or 3 (RGB,
    /// grey replicated) channels.
    Exactly(usize),
}

/// Whether `root` of `tree` holds an image-folder layout (a `train` or `test` folder).
pub(crate) fn has_layout(tree: &Tree, root: &str) -> bool {
    [Split::Train, Split::Test]
        .iter()
        .any(|s| tree.is_dir(&Tree::child(root, s.as_str())))
}

fn hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Decodes one image file to its C, H, W bytes (the values an engine sees are these / 255).
///
/// # Errors
/// [`DataError::Decode`] naming `origin`; [`DataError::BadHeader`] for a channel count other
/// than 1 or 3.
pub fn decode_image(
    bytes: &[u8],
    origin: &str,
    channels: Channels,
) -> Result<(ImageShape, Vec<u8>), DataError> {
    // A decoder bug must not take the run down: a panic inside the decoder is reported as this
    // file's decode error.
    let decoded =
        std::panic::catch_unwind(|| image::load_from_memory(bytes)).unwrap_or_else(|_| {
            Err(image::ImageError::IoError(std::io::Error::other(
                "the image decoder panicked on this file",
            )))
        });
    let img = decoded.map_err(|source| DataError::Decode {
        origin: origin.to_string(),
        source,
    })?;
    let c = match channels {
        Channels::Auto => {
            if img.color().has_color() {
                3
            } else {
                1
            }
        }
        Channels::Exactly(c @ (1 | 3)) => c,
        Channels::Exactly(other) => {
            return Err(DataError::BadHeader {
                origin: origin.to_string(),
                message: format!(
                    "{other} channels asked for; image files decode to 1 (grey) or 3 (RGB)"
                ),
            })
        }
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let interleaved: Vec<u8> = match c {
        1 => DynamicImage::into_luma8(img).into_raw(),
        _ => DynamicImage::into_rgb8(img).into_raw(),
    };
    if c == 1 {
        return Ok((ImageShape::new(1, h, w), interleaved));
    }
    // HWC (interleaved) -> CHW.
    let mut out = vec![0u8; c * h * w];
    for (p, px) in interleaved.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * h * w + p] = v;
        }
    }
    Ok((ImageShape::new(c, h, w), out))
}

/// The files of one split: class names and, per class, the relative paths of its images.
type SplitFiles = (Vec<String>, Vec<Vec<String>>);

fn list_split(tree: &Tree, root: &str, split: Split) -> Result<SplitFiles, DataError> {
    let split_rel = Tree::child(root, split.as_str());
    if !tree.is_dir(&split_rel) {
        return Err(DataError::MissingSplit {
            root: tree.origin(root),
            split: split.as_str(),
            looked_for: format!("folder {}", tree.origin(&split_rel)),
        });
    }
    let mut classes = Vec::new();
    let mut files = Vec::new();
    for entry in tree.list(&split_rel)? {
        if hidden(&entry.name) {
            continue;
        }
        let class_rel = Tree::child(&split_rel, &entry.name);
        if !entry.is_dir {
            return Err(DataError::UnexpectedEntry {
                origin: tree.origin(&class_rel),
                what: "file where a class folder belongs",
            });
        }
        let mut images = Vec::new();
        for image in tree.list(&class_rel)? {
            if hidden(&image.name) {
                continue;
            }
            let rel = Tree::child(&class_rel, &image.name);
            if image.is_dir {
                return Err(DataError::UnexpectedEntry {
                    origin: tree.origin(&rel),
                    what: "folder inside a class folder",
                });
            }
            images.push(rel);
        }
        if images.is_empty() {
            return Err(DataError::EmptyClass {
                origin: tree.origin(&class_rel),
            });
        }
        classes.push(entry.name);
        files.push(images);
    }
    if classes.is_empty() {
        return Err(DataError::MissingSplit {
            root: tree.origin(root),
            split: split.as_str(),
            looked_for: format!("class folders in {}", tree.origin(&split_rel)),
        });
    }
    Ok((classes, files))
}

/// Reads one split of the layout under `root` of `tree`.
///
/// The files are decoded on rayon's pool, each straight into its place in the split's pixel
/// buffer, so the images keep the listing order (class by class, each class in name order)
/// whatever the thread count, and the split is held once. The first image (in that order)
/// fixes the shape; the error returned is that of the first file in order that fails to
/// decode or differs in shape, as a one-file-at-a-time reader would report.
pub(crate) fn read_split(
    tree: &Tree,
    root: &str,
    split: Split,
    channels: Channels,
) -> Result<(Images, Vec<String>), DataError> {
    use rayon::prelude::*;
    let (classes, files) = list_split(tree, root, split)?;
    let jobs: Vec<(String, u32)> = files
        .into_iter()
        .enumerate()
        .flat_map(|(k, images)| images.into_iter().map(move |rel| (rel, k as u32)))
        .collect();
    let decode = |rel: &String| {
        let origin = tree.origin(rel);
        tree.with_bytes(rel, |bytes| decode_image(bytes, &origin, channels))
    };
    // `classes` is non-empty and every class has an image, so there is a first job.
    let Some((first_rel, _)) = jobs.first() else {
        return Ok((Images::empty(ImageShape::new(0, 0, 0)), classes));
    };
    let (shape, first) = decode(first_rel)?;
    let l = shape.len();
    let place = |rel: &String, dst: &mut [u8]| -> Result<(), DataError> {
        let (s, values) = decode(rel)?;
        if s != shape {
            return Err(DataError::WrongImageSize {
                origin: tree.origin(rel),
                expected: shape,
                found: s,
            });
        }
        dst.copy_from_slice(&values);
        Ok(())
    };
    let mut pixels = vec![0u8; jobs.len() * l];
    pixels[..l].copy_from_slice(&first);
    let results: Vec<Result<(), DataError>> = if l == 0 {
        // Images without pixels (no decoder gives them) have nothing to place.
        jobs[1..]
            .par_iter()
            .map(|(rel, _)| place(rel, &mut []))
            .collect()
    } else {
        pixels[l..]
            .par_chunks_mut(l)
            .zip(&jobs[1..])
            .map(|(dst, (rel, _))| place(rel, dst))
            .collect()
    };
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(e);
    }
    let labels = jobs.iter().map(|(_, label)| *label).collect();
    Ok((Images::new(shape, pixels, labels)?, classes))
}

/// Reads both splits, checking that they name the same classes and have the same image shape.
pub(crate) fn read_both(
    tree: &Tree,
    root: &str,
    channels: Channels,
) -> Result<(Images, Images, Vec<String>), DataError> {
    let (train, classes) = read_split(tree, root, Split::Train, channels)?;
    // The test split must match the training images' channels even under `Auto`.
    let test_channels = match channels {
        Channels::Auto => Channels::Exactly(train.shape.channels),
        c => c,
    };
    let (test, test_classes) = read_split(tree, root, Split::Test, test_channels)?;
    if test_classes != classes {
        return Err(DataError::ClassMismatch {
            root: tree.origin(root),
            train: classes,
            test: test_classes,
        });
    }
    if test.shape != train.shape {
        return Err(DataError::WrongImageSize {
            origin: tree.origin(&Tree::child(root, "test")),
            expected: train.shape,
            found: test.shape,
        });
    }
    Ok((train, test, classes))
}

/// What the image-folder readers look for, for messages.
pub(crate) const LAYOUT: &str =
    "train/<class>/<image> and test/<class>/<image> (JPEG or PNG), in the folder or .tar.gz or one folder down";

/// Reads split `split` of an image-folder layout from a folder or a `.tar.gz` (recognised by
/// its content), with [`Channels::Auto`]. Returns the images, labelled by class index, and the
/// class names.
///
/// # Errors
/// [`DataError::NotFound`] when there is no layout, [`DataError::MissingSplit`],
/// [`DataError::EmptyClass`], [`DataError::UnexpectedEntry`], [`DataError::Decode`],
/// [`DataError::WrongImageSize`] (an image whose size or colour differs from the first),
/// [`DataError::Io`], [`DataError::Archive`].
pub fn read_image_folder(path: &Path, split: Split) -> Result<(Images, Vec<String>), DataError> {
    read_image_folder_with(path, split, Channels::Auto)
}

/// [`read_image_folder`] with a chosen channel conversion.
///
/// # Errors
/// As [`read_image_folder`].
pub fn read_image_folder_with(
    path: &Path,
    split: Split,
    channels: Channels,
) -> Result<(Images, Vec<String>), DataError> {
    let tree = Tree::open(path, "image folder", LAYOUT)?;
    let root = tree
        .find_root(has_layout)?
        .ok_or_else(|| DataError::NotFound {
            dataset: "image folder".into(),
            path: path.to_path_buf(),
            looked_for: LAYOUT.into(),
        })?;
    read_split(&tree, &root, split, channels)
}

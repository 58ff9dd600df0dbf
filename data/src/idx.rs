//! MNIST and Fashion-MNIST IDX files (LeCun's format), raw or gzipped.
//!
//! An IDX file is a big-endian header, magic `0x0000 TT DD` (TT = data type, 0x08 for unsigned
//! bytes; DD = number of dimensions), then DD big-endian u32 sizes, then the values. Image
//! files are `0x00000803` (N x rows x cols), label files `0x00000801` (N). The parsers check
//! every size against the bytes present before allocating anything, and refuse trailing bytes.

use std::path::Path;

use crate::images::{ImageShape, Images};
use crate::{read_file_maybe_gz, DataError};

/// Magic number of an IDX file of unsigned-byte images (3 dimensions).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte labels (1 dimension).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
/// Classes of MNIST and Fashion-MNIST.
pub const MNIST_CLASSES: usize = 10;

/// Reads the magic number and `dims` sizes; returns the sizes and the body.
fn idx_header<'a>(
    bytes: &'a [u8],
    origin: &str,
    magic: u32,
    dims: usize,
    what: &'static str,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let header = 4 + 4 * dims;
    if bytes.len() < 4 {
        return Err(DataError::Truncated {
            origin: origin.into(),
            what: "IDX header".into(),
            expected: header,
            found: bytes.len(),
        });
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(DataError::BadMagic {
            origin: origin.into(),
            expected: magic,
            found,
            what,
        });
    }
    if bytes.len() < header {
        return Err(DataError::Truncated {
            origin: origin.into(),
            what: "IDX header".into(),
            expected: header,
            found: bytes.len(),
        });
    }
    let sizes = (0..dims)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    Ok((sizes, &bytes[header..]))
}

/// Checks that `body` holds exactly `expected` bytes (`expected` None: the sizes overflow).
fn exact_body(
    body: &[u8],
    expected: Option<usize>,
    origin: &str,
    header: usize,
    what: String,
) -> Result<(), DataError> {
    let Some(expected) = expected.and_then(|e| e.checked_add(header)) else {
        return Err(DataError::BadHeader {
            origin: origin.into(),
            message: format!("{what} overflow the address space"),
        });
    };
    let found = body.len() + header;
    if found < expected {
        return Err(DataError::Truncated {
            origin: origin.into(),
            what,
            expected,
            found,
        });
    }
    if found > expected {
        return Err(DataError::TrailingBytes {
            origin: origin.into(),
            what,
            expected,
            found,
        });
    }
    Ok(())
}

/// Parses an IDX image file (`0x00000803`, N x rows x cols unsigned bytes) already in memory
/// (not gzipped). `origin` names it in errors.
///
/// Returns the shape (1 x rows x cols) and the N·rows·cols pixel bytes.
///
/// # Errors
/// [`DataError::Truncated`] (header or pixels cut short), [`DataError::BadMagic`],
/// [`DataError::BadHeader`] (zero rows or columns, sizes that overflow),
/// [`DataError::TrailingBytes`].
pub fn parse_idx_images(bytes: &[u8], origin: &str) -> Result<(ImageShape, Vec<u8>), DataError> {
    let (dims, body) = idx_header(
        bytes,
        origin,
        IDX_IMAGES_MAGIC,
        3,
        "IDX images: unsigned bytes, 3 dimensions",
    )?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadHeader {
            origin: origin.into(),
            message: format!("images of {rows}x{cols} pixels"),
        });
    }
    let expected = n.checked_mul(rows).and_then(|v| v.checked_mul(cols));
    exact_body(
        body,
        expected,
        origin,
        16,
        format!("{n} images of {rows}x{cols}"),
    )?;
    // Only now, with the size matching the bytes present, allocate.
    Ok((ImageShape::new(1, rows, cols), body.to_vec()))
}

/// Parses an IDX label file (`0x00000801`, N unsigned bytes) already in memory (not gzipped).
/// Labels are not range-checked here ([`read_idx`] checks them against the class count).
///
/// # Errors
/// [`DataError::Truncated`], [`DataError::BadMagic`], [`DataError::TrailingBytes`].
pub fn parse_idx_labels(bytes: &[u8], origin: &str) -> Result<Vec<u32>, DataError> {
    let (dims, body) = idx_header(
        bytes,
        origin,
        IDX_LABELS_MAGIC,
        1,
        "IDX labels: unsigned bytes, 1 dimension",
    )?;
    let n = dims[0];
    exact_body(body, Some(n), origin, 8, format!("{n} labels"))?;
    Ok(body.iter().map(|&b| u32::from(b)).collect())
}

/// Checks that every label is below `classes`.
///
/// # Errors
/// [`DataError::LabelOutOfRange`] for the first label that is not.
pub fn check_labels(labels: &[u32], classes: usize, origin: &str) -> Result<(), DataError> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(index) => Err(DataError::LabelOutOfRange {
            origin: origin.into(),
            index,
            label: labels[index],
            classes,
        }),
        None => Ok(()),
    }
}

/// Reads a pair of IDX files (each raw or gzipped: detected by the gzip magic bytes, not by the
/// name) into labelled images. Labels must be below 10 (MNIST, Fashion-MNIST).
///
/// # Errors
/// [`DataError::Io`] or [`DataError::Archive`] reading, any error of [`parse_idx_images`] /
/// [`parse_idx_labels`], [`DataError::CountMismatch`] when the files hold different counts,
/// [`DataError::LabelOutOfRange`].
pub fn read_idx(images_path: &Path, labels_path: &Path) -> Result<Images, DataError> {
    let image_origin = images_path.display().to_string();
    let label_origin = labels_path.display().to_string();
    let (shape, pixels) = parse_idx_images(&read_file_maybe_gz(images_path)?, &image_origin)?;
    let labels = parse_idx_labels(&read_file_maybe_gz(labels_path)?, &label_origin)?;
    let image_count = pixels.len() / shape.len();
    if image_count != labels.len() {
        return Err(DataError::CountMismatch {
            images: image_origin,
            image_count,
            labels: label_origin,
            label_count: labels.len(),
        });
    }
    check_labels(&labels, MNIST_CLASSES, &label_origin)?;
    Images::new(shape, pixels, labels)
}

/// The file names tried for one IDX file, e.g. `train-images-idx3-ubyte`,
/// `train-images.idx3-ubyte`, each also with `.gz`, in that order.
pub fn idx_candidates(prefix: &str, kind: &str, ext: &str) -> Vec<String> {
    let mut names = Vec::new();
    for base in [
        format!("{prefix}-{kind}-{ext}"),
        format!("{prefix}-{kind}.{ext}"),
    ] {
        names.push(base.clone());
        names.push(format!("{base}.gz"));
    }
    names
}

//! The invariants of the byte-level parsers, as checkers that the fuzz targets
//! (`fuzz/fuzz_targets/idx_parser.rs`, `fuzz/fuzz_targets/cifar_binary.rs`) and the seeded smoke
//! tests in `data/tests/fuzz_smoke.rs` both run.
//!
//! For any bytes, a parser must return (never panic, never allocate more than a small multiple
//! of its input) and:
//! 1. on success, the counts agree with the bytes: IDX `16 + N·rows·cols` (images) or `8 + N`
//!    (labels) bytes; CIFAR `N · (label bytes + 3072)`;
//! 2. on success, every pixel is the byte it was read from (which an engine sees as
//!    `byte / 255`, in [0, 1]) and every label is the byte it was read from, within the
//!    format's range for CIFAR;
//! 3. on failure, the message names the origin.

use crate::cifar::CIFAR_IMAGE_BYTES;
use crate::{parse_cifar_records, parse_idx_images, parse_idx_labels};

/// The origin given to the parsers by the checkers.
pub const FUZZ_ORIGIN: &str = "fuzz-input";

fn named(e: crate::DataError) -> Result<(), String> {
    let message = e.to_string();
    if message.contains(FUZZ_ORIGIN) {
        Ok(())
    } else {
        Err(format!("error message does not name the input: {message}"))
    }
}

/// Checks the IDX parsers on fuzzer bytes. Byte 0 selects: bit 0 clear = images, set = labels;
/// bit 1 set = overwrite the first four bytes of the rest with the right magic number (so the
/// fuzzer reaches the size checks quickly). The rest is the file.
///
/// # Errors
/// A description of the first invariant that does not hold.
pub fn check_idx(data: &[u8]) -> Result<(), String> {
    let Some((&mode, rest)) = data.split_first() else {
        return Ok(());
    };
    let labels = mode & 1 == 1;
    let mut bytes = rest.to_vec();
    if mode & 2 == 2 && bytes.len() >= 4 {
        let magic = if labels {
            crate::idx::IDX_LABELS_MAGIC
        } else {
            crate::idx::IDX_IMAGES_MAGIC
        };
        bytes[..4].copy_from_slice(&magic.to_be_bytes());
    }
    if labels {
        match parse_idx_labels(&bytes, FUZZ_ORIGIN) {
            Err(e) => named(e),
            Ok(l) => {
                if 8 + l.len() != bytes.len() {
                    return Err(format!("{} labels from {} bytes", l.len(), bytes.len()));
                }
                if l.iter().zip(&bytes[8..]).any(|(&l, &b)| l != u32::from(b)) {
                    return Err("a label differs from its byte".into());
                }
                Ok(())
            }
        }
    } else {
        match parse_idx_images(&bytes, FUZZ_ORIGIN) {
            Err(e) => named(e),
            Ok((shape, pixels)) => {
                let dims: Vec<usize> = (0..3)
                    .map(|d| {
                        let o = 4 + 4 * d;
                        u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]])
                            as usize
                    })
                    .collect();
                if shape.channels != 1 || shape.height != dims[1] || shape.width != dims[2] {
                    return Err(format!("shape {shape} from header {dims:?}"));
                }
                if 16 + pixels.len() != bytes.len() || pixels.len() != dims[0] * shape.len() {
                    return Err(format!(
                        "{} pixels from {} bytes, header {dims:?}",
                        pixels.len(),
                        bytes.len()
                    ));
                }
                check_pixels(&pixels, &bytes[16..])
            }
        }
    }
}

/// Checks the CIFAR record parser on fuzzer bytes. Byte 0 selects the label bytes: bit 0
/// clear = 1 (CIFAR-10), set = 2 (CIFAR-100). The rest is the file.
///
/// # Errors
/// A description of the first invariant that does not hold.
pub fn check_cifar(data: &[u8]) -> Result<(), String> {
    let Some((&mode, bytes)) = data.split_first() else {
        return Ok(());
    };
    let label_bytes = 1 + usize::from(mode & 1);
    let record = label_bytes + CIFAR_IMAGE_BYTES;
    match parse_cifar_records(bytes, FUZZ_ORIGIN, label_bytes) {
        Err(e) => named(e),
        Ok(images) => {
            let n = images.len();
            if n == 0 || n * record != bytes.len() {
                return Err(format!("{n} records from {} bytes", bytes.len()));
            }
            if images.shape != crate::ImageShape::new(3, 32, 32) {
                return Err(format!("shape {}", images.shape));
            }
            let classes = if label_bytes == 1 { 10 } else { 100 };
            for (i, rec) in bytes.chunks_exact(record).enumerate() {
                let label = images.labels[i];
                if label != u32::from(rec[label_bytes - 1]) || label as usize >= classes {
                    return Err(format!("record {i}: label {label}"));
                }
                if label_bytes == 2 && rec[0] >= 20 {
                    return Err(format!("record {i}: coarse label {} accepted", rec[0]));
                }
                check_pixels(images.image(i), &rec[label_bytes..])?;
            }
            Ok(())
        }
    }
}

fn check_pixels(pixels: &[u8], bytes: &[u8]) -> Result<(), String> {
    if pixels.len() != bytes.len() {
        return Err(format!("{} pixels for {} bytes", pixels.len(), bytes.len()));
    }
    for (i, (&p, &b)) in pixels.iter().zip(bytes).enumerate() {
        let v = crate::unit(p);
        if p != b || v != f32::from(b) / 255.0 || !(0.0..=1.0).contains(&v) {
            return Err(format!("pixel {i} is {p} ({v}) for byte {b}"));
        }
    }
    Ok(())
}

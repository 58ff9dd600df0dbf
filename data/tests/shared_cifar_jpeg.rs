//! The full CIFAR-10 JPEG tarball from the project's shared data folder, when present:
//! `$EIO_SHARED/data/cifar10-jpeg.tar.gz`, else `../shared/data/cifar10-jpeg.tar.gz` from the
//! workspace root. Prints a `skipped:` line when absent.

mod common;

use std::path::PathBuf;

use eio_data::*;
use eio_spec::config::Dataset;
use eio_spec::rng::Seeds;

fn tarball() -> Option<PathBuf> {
    let shared = std::env::var_os("EIO_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let path = shared.join("data/cifar10-jpeg.tar.gz");
    path.is_file().then_some(path)
}

#[test]
fn cifar10_jpeg_tarball() {
    let Some(path) = tarball() else {
        common::skip(
            "cifar10_jpeg_tarball",
            "cifar10-jpeg.tar.gz not found (set EIO_SHARED or place ../shared next to the workspace)",
        );
        return;
    };
    // Through `load`, as the binary does: dataset cifar10 with a path to an image-folder
    // tarball is detected as such.
    let mut c = eio_spec::Config::default();
    c.data.dataset = Dataset::Cifar10;
    c.data.path = Some(path.clone());
    let s = load(&c, &Seeds::new(0)).unwrap();
    assert!(s.source.contains("image folders"), "{}", s.source);
    // The default data.validation = 0: all 50,000 training images, as the authors and DVERGE.
    assert_eq!(s.train.len() + s.validation.len(), 50_000);
    assert_eq!(s.validation.len(), c.data.validation);
    assert_eq!(s.test.len(), 10_000);
    assert_eq!(s.train.shape, ImageShape::new(3, 32, 32));
    // Class folders sorted by name are CIFAR-10's label order.
    assert_eq!(s.classes, eio_data::cifar::CIFAR10_CLASSES);
    assert_eq!(s.test.class_counts(10), vec![1000; 10]);
    let mut train_counts = s.train.class_counts(10);
    for (t, v) in train_counts.iter_mut().zip(s.validation.class_counts(10)) {
        *t += v;
    }
    assert_eq!(train_counts, vec![5000; 10]);
    // Channel means near CIFAR-10's (protocols.md: 0.4914, 0.4822, 0.4465); JPEG shifts them a
    // little.
    let plane = 32 * 32;
    for (ch, want) in [0.4914f64, 0.4822, 0.4465].into_iter().enumerate() {
        let mut sum = 0.0;
        for i in 0..s.test.len() {
            sum += s.test.image_unit(i)[ch * plane..(ch + 1) * plane]
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>();
        }
        let mean = sum / (s.test.len() * plane) as f64;
        assert!((mean - want).abs() < 0.01, "channel {ch} mean {mean}");
    }
    let test_only = read_image_folder(&path, Split::Test).unwrap().0;
    assert_eq!(test_only, s.test);
}

/// FNV-1a, 64 bits.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Every pixel an engine sees (f32 bits of `byte / 255`) and every label of both splits, in
/// order, hashed: the values were recorded when images were held as f32 (commit 29a823d,
/// `image` 0.25 as locked), so this fails if the u8 storage, its conversion, the parallel
/// decoding or the reading order changed any value or moved any image. (A new JPEG decoder
/// may also change it; then check the change and record the new values.)
#[test]
fn cifar10_jpeg_pixels_and_order_are_pinned() {
    let Some(path) = tarball() else {
        common::skip(
            "cifar10_jpeg_pixels_and_order_are_pinned",
            "cifar10-jpeg.tar.gz not found (set EIO_SHARED or place ../shared next to the workspace)",
        );
        return;
    };
    for (split, n, pixels_fnv, labels_fnv) in [
        (
            Split::Test,
            10_000,
            0x9243_b536_4124_658f_u64,
            0x292f_ea34_3fce_a3e5_u64,
        ),
        (
            Split::Train,
            50_000,
            0xfcc7_5269_2fa4_990d,
            0xc311_66fa_77f2_66e5,
        ),
    ] {
        let (images, _) = read_image_folder(&path, split).unwrap();
        assert_eq!(images.len(), n);
        let mut h = 0xcbf2_9ce4_8422_2325_u64;
        for start in (0..n).step_by(1000) {
            for v in images.unit_range(start..(start + 1000).min(n)) {
                fnv(&mut h, &v.to_bits().to_le_bytes());
            }
        }
        let mut hl = 0xcbf2_9ce4_8422_2325_u64;
        for l in &images.labels {
            fnv(&mut hl, &l.to_le_bytes());
        }
        assert_eq!(
            h, pixels_fnv,
            "{split:?}: pixel values or image order changed"
        );
        assert_eq!(hl, labels_fnv, "{split:?}: label order changed");
    }
}

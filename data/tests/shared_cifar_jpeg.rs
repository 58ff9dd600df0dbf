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
            sum += s.test.image(i)[ch * plane..(ch + 1) * plane]
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

//! Each kind of bad data gives its own error, naming the file and what is wrong; nothing is
//! skipped. Corrupted inputs are built here from the fixtures' generator.

mod common;

use std::error::Error as _;
use std::path::Path;

use common::*;
use eio_data::*;

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn msg(e: &DataError) -> String {
    e.to_string()
}

// ---- CIFAR ----

#[test]
fn cifar_truncated_record() {
    let mut bytes = cifar10_record(0, 1);
    bytes.extend(&cifar10_record(1, 2)[..100]);
    let e = parse_cifar_records(&bytes, "batch.bin", 1).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Truncated {
                expected: 3073,
                found: 100,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg(&e).contains("batch.bin"), "{e}");
    assert!(msg(&e).contains("record 2"), "{e}");
    let e = parse_cifar_records(&[], "empty.bin", 1).unwrap_err();
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
}

#[test]
fn cifar_label_out_of_range() {
    let mut bytes = cifar10_record(0, 1);
    bytes.extend(cifar10_record(1, 10));
    let e = parse_cifar_records(&bytes, "b.bin", 1).unwrap_err();
    match &e {
        DataError::LabelOutOfRange {
            index,
            label,
            classes,
            ..
        } => assert_eq!((*index, *label, *classes), (1, 10, 10)),
        other => panic!("{other:?}"),
    }
    assert!(msg(&e).contains("b.bin"), "{e}");
    // CIFAR-100: fine label 100 and coarse label 20 are both refused.
    let e = parse_cifar_records(&cifar100_record(0, 1, 100), "t.bin", 2).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                label: 100,
                classes: 100,
                ..
            }
        ),
        "{e:?}"
    );
    let e = parse_cifar_records(&cifar100_record(0, 20, 5), "t.bin", 2).unwrap_err();
    assert!(msg(&e).contains("coarse"), "{e}");
    assert!(parse_cifar_records(&cifar100_record(0, 19, 99), "t.bin", 2).is_ok());
}

#[test]
fn cifar_bad_label_byte_count() {
    let e = parse_cifar_records(&cifar10_record(0, 1), "x", 3).unwrap_err();
    assert!(matches!(e, DataError::BadHeader { .. }), "{e:?}");
}

#[test]
fn cifar_file_errors_name_the_file() {
    let (_t, copy) = copy_fixture("cifar-10-batches-bin");
    // Truncate data_batch_3.bin by one byte.
    let f = copy.join("data_batch_3.bin");
    let mut b = std::fs::read(&f).unwrap();
    b.pop();
    std::fs::write(&f, b).unwrap();
    let e = read_cifar_binary(&copy).unwrap_err();
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
    assert!(msg(&e).contains("data_batch_3.bin"), "{e}");
    // A missing batch is named.
    std::fs::remove_file(&f).unwrap();
    let e = read_cifar_binary(&copy).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }), "{e:?}");
    assert!(msg(&e).contains("data_batch_3.bin"), "{e}");
}

#[test]
fn nothing_cifar_in_folder() {
    let t = dir();
    std::fs::write(t.path().join("readme.txt"), "hi").unwrap();
    let e = read_cifar_binary(t.path()).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }), "{e:?}");
    assert!(msg(&e).contains("data_batch_1.bin"), "{e}");
    assert!(msg(&e).contains("train.bin and test.bin"), "{e}");
}

// ---- archives ----

#[test]
fn damaged_and_fake_archives() {
    let t = dir();
    // Not gzip at all.
    let fake = t.path().join("fake.tar.gz");
    std::fs::write(&fake, b"this is not an archive").unwrap();
    let e = read_cifar_binary(&fake).unwrap_err();
    assert!(matches!(e, DataError::Archive { .. }), "{e:?}");
    assert!(msg(&e).contains("fake.tar.gz"), "{e}");
    assert!(e.source().is_some(), "cause kept");
    // A real archive cut in half.
    let good = std::fs::read(fixtures().join("image-folder.tar.gz")).unwrap();
    let cut = t.path().join("cut.tar.gz");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let e = read_image_folder(&cut, Split::Train).unwrap_err();
    assert!(matches!(e, DataError::Archive { .. }), "{e:?}");
    assert!(msg(&e).contains("cut.tar.gz"), "{e}");
}

#[test]
fn missing_path() {
    let e = read_cifar_binary(Path::new("/nonexistent/eio/cifar")).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }), "{e:?}");
    assert!(msg(&e).contains("/nonexistent/eio/cifar"), "{e}");
}

// ---- IDX ----

#[test]
fn idx_wrong_magic() {
    // A label file given as images.
    let e = parse_idx_images(&idx_labels(&[1, 2]), "lbl").unwrap_err();
    assert!(
        matches!(
            e,
            DataError::BadMagic {
                expected: 0x803,
                found: 0x801,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg(&e).contains("lbl"), "{e}");
    assert!(msg(&e).contains("0x00000801"), "{e}");
    let e = parse_idx_labels(&idx_images(0, 1), "img").unwrap_err();
    assert!(
        matches!(
            e,
            DataError::BadMagic {
                expected: 0x801,
                ..
            }
        ),
        "{e:?}"
    );
    // Another data type (0x0D = float) is refused the same way.
    let mut f = idx_images(0, 1);
    f[2] = 0x0d;
    assert!(matches!(
        parse_idx_images(&f, "f").unwrap_err(),
        DataError::BadMagic { found: 0x0d03, .. }
    ));
}

#[test]
fn idx_truncated_header_and_body() {
    let img = idx_images(0, 2);
    for cut in [0, 3, 4, 15] {
        let e = parse_idx_images(&img[..cut], "x").unwrap_err();
        assert!(
            matches!(e, DataError::Truncated { .. } | DataError::BadMagic { .. }),
            "cut {cut}: {e:?}"
        );
    }
    let e = parse_idx_images(&img[..15], "x").unwrap_err();
    assert!(msg(&e).contains("IDX header"), "{e}");
    let e = parse_idx_images(&img[..img.len() - 1], "x").unwrap_err();
    match e {
        DataError::Truncated {
            expected, found, ..
        } => assert_eq!((expected, found), (img.len(), img.len() - 1)),
        other => panic!("{other:?}"),
    }
    let lbl = idx_labels(&[1, 2, 3]);
    let e = parse_idx_labels(&lbl[..lbl.len() - 1], "l").unwrap_err();
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
}

#[test]
fn idx_huge_claims_are_refused_without_allocating() {
    let mut v = Vec::new();
    for w in [0x803u32, u32::MAX, u32::MAX, u32::MAX] {
        v.extend(w.to_be_bytes());
    }
    let e = parse_idx_images(&v, "huge").unwrap_err();
    assert!(
        matches!(e, DataError::Truncated { .. } | DataError::BadHeader { .. }),
        "{e:?}"
    );
    let mut l = Vec::new();
    l.extend(0x801u32.to_be_bytes());
    l.extend(u32::MAX.to_be_bytes());
    assert!(matches!(
        parse_idx_labels(&l, "huge").unwrap_err(),
        DataError::Truncated { .. }
    ));
}

#[test]
fn idx_zero_sized_images_and_trailing_bytes() {
    let mut v = Vec::new();
    for w in [0x803u32, 5, 0, 3] {
        v.extend(w.to_be_bytes());
    }
    assert!(matches!(
        parse_idx_images(&v, "z").unwrap_err(),
        DataError::BadHeader { .. }
    ));
    let mut img = idx_images(0, 1);
    img.push(7);
    let e = parse_idx_images(&img, "extra").unwrap_err();
    assert!(matches!(e, DataError::TrailingBytes { .. }), "{e:?}");
    let mut lbl = idx_labels(&[1]);
    lbl.push(0);
    assert!(matches!(
        parse_idx_labels(&lbl, "extra").unwrap_err(),
        DataError::TrailingBytes { .. }
    ));
}

#[test]
fn idx_count_mismatch_and_label_range() {
    let t = dir();
    let (i, l) = (t.path().join("i"), t.path().join("l"));
    std::fs::write(&i, idx_images(0, 3)).unwrap();
    std::fs::write(&l, idx_labels(&[1, 2])).unwrap();
    let e = read_idx(&i, &l).unwrap_err();
    match &e {
        DataError::CountMismatch {
            image_count,
            label_count,
            ..
        } => assert_eq!((*image_count, *label_count), (3, 2)),
        other => panic!("{other:?}"),
    }
    std::fs::write(&l, idx_labels(&[1, 10, 2])).unwrap();
    let e = read_idx(&i, &l).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::LabelOutOfRange {
                index: 1,
                label: 10,
                classes: 10,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg(&e).contains(&l.display().to_string()), "{e}");
}

#[test]
fn idx_corrupt_gzip() {
    let t = dir();
    let (i, l) = (t.path().join("i.gz"), t.path().join("l"));
    let gz = gzip(&idx_images(0, 3));
    std::fs::write(&i, &gz[..gz.len() - 12]).unwrap();
    std::fs::write(&l, idx_labels(&[1, 2, 3])).unwrap();
    let e = read_idx(&i, &l).unwrap_err();
    assert!(matches!(e, DataError::Archive { .. }), "{e:?}");
    assert!(msg(&e).contains("i.gz"), "{e}");
    assert!(e.source().is_some());
}

#[test]
fn mnist_folder_missing_file() {
    let (_t, copy) = copy_fixture("mnist");
    std::fs::remove_file(copy.join("t10k-labels-idx1-ubyte")).unwrap();
    let e = read_mnist_folder(&copy, eio_spec::config::Dataset::Mnist).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }), "{e:?}");
    assert!(msg(&e).contains("t10k-labels-idx1-ubyte.gz"), "{e}");
    let e = read_mnist_folder(&copy.join("nope"), eio_spec::config::Dataset::Mnist).unwrap_err();
    assert!(matches!(e, DataError::NotFound { .. }), "{e:?}");
}

// ---- image folders ----

fn folder_with(extra: &[(String, Vec<u8>)], drop: &[&str]) -> tempfile::TempDir {
    let t = dir();
    let files: Vec<(String, Vec<u8>)> = folder_files()
        .into_iter()
        .filter(|(p, _)| !drop.contains(&p.as_str()))
        .chain(extra.iter().cloned())
        .collect();
    write_tree(t.path(), &files);
    t
}

/// Each error on disk and inside a `.tar.gz` (with the same layout).
fn both_ways(
    extra: &[(String, Vec<u8>)],
    drop: &[&str],
    empty_dirs: &[&str],
    split: Split,
    check: impl Fn(&DataError),
) {
    let t = folder_with(extra, drop);
    for d in empty_dirs {
        std::fs::create_dir_all(t.path().join(d)).unwrap();
    }
    check(&read_image_folder(t.path(), split).unwrap_err());
    if empty_dirs.is_empty() {
        let files: Vec<(String, Vec<u8>)> = folder_files()
            .into_iter()
            .filter(|(p, _)| !drop.contains(&p.as_str()))
            .chain(extra.iter().cloned())
            .collect();
        let tar = t.path().join("x.tar.gz");
        std::fs::write(&tar, tar_gz(Some("top"), &files)).unwrap();
        check(&read_image_folder(&tar, split).unwrap_err());
    }
}

#[test]
fn image_of_the_wrong_size() {
    let odd = png_gray(0, 7, 7);
    // Grey 7x7 among RGB 5x4: wrong size (and channels under Auto).
    both_ways(
        &[("train/bee/2.png".into(), odd)],
        &[],
        &[],
        Split::Train,
        |e| {
            match e {
                DataError::WrongImageSize {
                    origin,
                    expected,
                    found,
                } => {
                    assert!(origin.ends_with("train/bee/2.png"), "{origin}");
                    assert_eq!(*expected, ImageShape::new(3, 4, 5));
                    assert_eq!(*found, ImageShape::new(1, 7, 7));
                }
                other => panic!("{other:?}"),
            }
            assert!(msg(e).contains("3x4x5"), "{e}");
        },
    );
}

#[test]
fn undecodable_file() {
    let mut broken = png_rgb(3);
    broken.truncate(40);
    both_ways(
        &[("train/ant/broken.png".into(), broken)],
        &[],
        &[],
        Split::Train,
        |e| {
            assert!(matches!(e, DataError::Decode { .. }), "{e:?}");
            assert!(msg(e).contains("train/ant/broken.png"), "{e}");
            assert!(e.source().is_some(), "decoder error kept as source");
        },
    );
    both_ways(
        &[("test/bee/notes.txt".into(), b"not an image".to_vec())],
        &[],
        &[],
        Split::Test,
        |e| {
            assert!(matches!(e, DataError::Decode { .. }), "{e:?}");
            assert!(msg(e).contains("notes.txt"), "{e}");
        },
    );
}

/// Files are decoded in parallel, but the error is that of the first bad file in reading
/// order (class by class, names in byte order), whatever finishes first: here 200 good images
/// and, later in order, an undecodable file before one of the wrong size, on disk and in a
/// `.tar.gz`.
#[test]
fn first_bad_file_in_reading_order_is_reported() {
    let mut extra: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("train/bee/a{i:03}.png"), png_rgb(i)))
        .collect();
    let mut broken = png_rgb(3);
    broken.truncate(40);
    extra.push(("train/bee/m-broken.png".into(), broken));
    extra.push(("train/bee/z-odd.png".into(), png_gray(0, 7, 7)));
    extra.push(("train/cow/0-odd.png".into(), png_gray(0, 7, 7)));
    for _ in 0..3 {
        both_ways(&extra, &[], &[], Split::Train, |e| {
            assert!(matches!(e, DataError::Decode { .. }), "{e:?}");
            assert!(msg(e).contains("train/bee/m-broken.png"), "{e}");
        });
    }
    // Without the broken file the wrong size is reported, at the first odd file in order.
    extra.retain(|(p, _)| !p.ends_with("m-broken.png"));
    both_ways(&extra, &[], &[], Split::Train, |e| {
        assert!(matches!(e, DataError::WrongImageSize { .. }), "{e:?}");
        assert!(msg(e).contains("train/bee/z-odd.png"), "{e}");
    });
}

#[test]
fn empty_class_folder() {
    both_ways(&[], &[], &["train/cow"], Split::Train, |e| {
        assert!(matches!(e, DataError::EmptyClass { .. }), "{e:?}");
        assert!(msg(e).contains("train/cow"), "{e}");
    });
    // In an archive, a listed folder with no file.
    let t = dir();
    let tar = t.path().join("e.tar.gz");
    let mut files = folder_files();
    files.push(("test/cow/.keep".into(), Vec::new()));
    std::fs::write(&tar, tar_gz(None, &files)).unwrap();
    let e = read_image_folder(&tar, Split::Test).unwrap_err();
    assert!(matches!(e, DataError::EmptyClass { .. }), "{e:?}");
    assert!(msg(&e).contains("test/cow"), "{e}");
}

#[test]
fn missing_split() {
    both_ways(
        &[],
        &["test/ant/5.png", "test/bee/6.png"],
        &[],
        Split::Test,
        |e| {
            assert!(
                matches!(e, DataError::MissingSplit { split: "test", .. }),
                "{e:?}"
            );
        },
    );
    let t = dir();
    std::fs::create_dir_all(t.path().join("train")).unwrap();
    let e = read_image_folder(t.path(), Split::Train).unwrap_err();
    assert!(matches!(e, DataError::MissingSplit { .. }), "{e:?}");
    assert!(msg(&e).contains("class folders"), "{e}");
    let e = read_image_folder(t.path(), Split::Test).unwrap_err();
    assert!(msg(&e).contains("no test split"), "{e}");
}

#[test]
fn stray_file_and_nested_folder() {
    both_ways(
        &[("train/readme.txt".into(), b"hi".to_vec())],
        &[],
        &[],
        Split::Train,
        |e| {
            assert!(matches!(e, DataError::UnexpectedEntry { .. }), "{e:?}");
            assert!(msg(e).contains("train/readme.txt"), "{e}");
        },
    );
    both_ways(
        &[("train/ant/sub/1.png".into(), png_rgb(1))],
        &[],
        &[],
        Split::Train,
        |e| {
            assert!(matches!(e, DataError::UnexpectedEntry { .. }), "{e:?}");
            assert!(msg(e).contains("train/ant/sub"), "{e}");
        },
    );
}

#[test]
fn hidden_files_are_not_part_of_the_layout() {
    let t = folder_with(
        &[
            ("train/.DS_Store".into(), b"junk".to_vec()),
            ("train/ant/._9.png".into(), b"resource fork".to_vec()),
        ],
        &[],
    );
    let (images, classes) = read_image_folder(t.path(), Split::Train).unwrap();
    assert_eq!(classes, ["ant", "bee"]);
    assert_eq!(images.len(), 4);
}

#[test]
fn train_and_test_classes_must_match() {
    let t = folder_with(&[("test/cow/1.png".into(), png_rgb(1))], &[]);
    let mut c = eio_spec::Config::default();
    c.data.dataset = eio_spec::config::Dataset::ImageFolder;
    c.data.path = Some(t.path().to_path_buf());
    c.data.validation = 0;
    let e = load(&c, &eio_spec::rng::Seeds::new(0)).unwrap_err();
    match &e {
        DataError::ClassMismatch { train, test, .. } => {
            assert_eq!(train, &["ant", "bee"]);
            assert_eq!(test, &["ant", "bee", "cow"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn validation_larger_than_training_set() {
    let mut c = eio_spec::Config::default();
    c.data.path = Some(fixtures().join("cifar-10-batches-bin"));
    c.data.validation = 5;
    let e = load(&c, &eio_spec::rng::Seeds::new(0)).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Config {
                field: "validation",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(msg(&e).contains("5 of 5"), "{e}");
}

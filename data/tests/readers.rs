//! Every reader on the committed fixtures: exact pixel values and labels, class and file order,
//! the same data from a folder, the folder one level down and a `.tar.gz`; `load` end to end.

mod common;

use common::*;
use eio_data::*;
use eio_spec::config::Dataset;
use eio_spec::rng::Seeds;
use eio_spec::Config;

/// Image `k` as an engine gets it (f32 in [0, 1]) is `expected`, to the bit.
fn assert_image(images: &Images, k: usize, expected: &[f32], what: &str) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&images.image_unit(k)),
        bits(expected),
        "{what}: image {k}"
    );
}

#[test]
fn cifar10_binaries_exact() {
    let data = read_cifar_binary(&fixtures().join("cifar-10-batches-bin")).unwrap();
    assert_eq!(data.train.shape, ImageShape::new(3, 32, 32));
    assert_eq!(
        data.train.labels,
        CIFAR10_TRAIN_LABELS.map(u32::from).to_vec()
    );
    assert_eq!(
        data.test.labels,
        CIFAR10_TEST_LABELS.map(u32::from).to_vec()
    );
    for i in 0..5 {
        assert_image(&data.train, i, &image_f32(i, 3, 32, 32), "train");
    }
    for i in 0..2 {
        assert_image(&data.test, i, &image_f32(100 + i, 3, 32, 32), "test");
    }
    // The record's bytes are R, G, B planes: channel 1 row 2 column 3 is byte 1024 + 2·32 + 3.
    assert_eq!(data.train.image(0)[1024 + 2 * 32 + 3], pixel(0, 1, 2, 3));
    assert_eq!(
        data.train.image_unit(0)[1024 + 2 * 32 + 3],
        f32::from(pixel(0, 1, 2, 3)) / 255.0
    );
    assert_eq!(data.classes[0], "airplane");
    assert_eq!(data.classes.len(), 10);
    assert!(data.source.contains("CIFAR-10 binaries"), "{}", data.source);
}

#[test]
fn cifar10_from_parent_folder_and_tarball_are_identical() {
    let direct = read_cifar_binary(&fixtures().join("cifar-10-batches-bin")).unwrap();
    // The fixtures folder holds cifar-10-batches-bin/ one level down.
    let (_tmp, copy) = copy_fixture("cifar-10-batches-bin");
    let parent = read_cifar_binary(copy.parent().unwrap()).unwrap();
    let tar = read_cifar_binary(&fixtures().join("cifar-10-binary.tar.gz")).unwrap();
    for other in [&parent, &tar] {
        assert_eq!(other.train, direct.train);
        assert_eq!(other.test, direct.test);
        assert_eq!(other.classes, direct.classes);
    }
    assert!(
        tar.source.contains("cifar-10-binary.tar.gz"),
        "{}",
        tar.source
    );
}

#[test]
fn cifar100_uses_fine_labels() {
    let data = read_cifar_binary(&fixtures().join("cifar-100-binary")).unwrap();
    let fine: Vec<u32> = CIFAR100_TRAIN_LABELS
        .iter()
        .map(|&(_, f)| u32::from(f))
        .collect();
    assert_eq!(data.train.labels, fine);
    assert_eq!(data.test.labels, vec![17, 64]);
    assert_eq!(data.classes.len(), 100);
    assert_eq!(data.classes[99], "worm");
    assert_eq!(data.classes[42], "leopard");
    let mut sorted = data.classes.clone();
    sorted.sort();
    assert_eq!(
        sorted, data.classes,
        "CIFAR-100 fine names are alphabetical"
    );
    for i in 0..3 {
        assert_image(&data.train, i, &image_f32(i, 3, 32, 32), "train");
    }
}

#[test]
fn idx_raw_and_gz_are_identical_and_exact() {
    let raw = read_idx(
        &fixtures().join("mnist/train-images-idx3-ubyte"),
        &fixtures().join("mnist/train-labels-idx1-ubyte"),
    )
    .unwrap();
    let gz = read_idx(
        &fixtures().join("mnist-gz/train-images-idx3-ubyte.gz"),
        &fixtures().join("mnist-gz/train-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    assert_eq!(raw, gz);
    assert_eq!(raw.shape, ImageShape::new(1, IDX_ROWS, IDX_COLS));
    assert_eq!(raw.labels, IDX_TRAIN_LABELS.map(u32::from).to_vec());
    for i in 0..5 {
        assert_image(&raw, i, &image_f32(i, 1, IDX_ROWS, IDX_COLS), "idx");
    }
}

#[test]
fn mnist_folder_reader_finds_raw_gz_and_one_level_down() {
    let raw = read_mnist_folder(&fixtures().join("mnist"), Dataset::FashionMnist).unwrap();
    let gz = read_mnist_folder(&fixtures().join("mnist-gz"), Dataset::FashionMnist).unwrap();
    assert_eq!(raw.train, gz.train);
    assert_eq!(raw.test, gz.test);
    assert_eq!(raw.test.labels, vec![1, 8]);
    assert_eq!(raw.classes[0], "T-shirt/top");
    let (_tmp, copy) = copy_fixture("mnist");
    let down = read_mnist_folder(copy.parent().unwrap(), Dataset::Mnist).unwrap();
    assert_eq!(down.train, raw.train);
    assert_eq!(down.classes[9], "9");
}

/// The expected training images of the image-folder fixture in reading order.
fn folder_train_expected() -> (Vec<Option<usize>>, Vec<u32>) {
    // ant/10.png, ant/9.png, ant/b.jpg, bee/1.png (name order: "10" < "9" < "b").
    (vec![Some(10), Some(9), None, Some(1)], vec![0, 0, 0, 1])
}

fn check_folder_train(images: &Images, classes: &[String]) {
    assert_eq!(classes, ["ant", "bee"]);
    assert_eq!(images.shape, ImageShape::new(3, FOLDER_H, FOLDER_W));
    let (which, labels) = folder_train_expected();
    assert_eq!(images.labels, labels);
    for (k, w) in which.iter().enumerate() {
        match w {
            Some(i) => assert_image(images, k, &image_f32(*i, 3, FOLDER_H, FOLDER_W), "png"),
            None => {
                // The flat JPEG: every pixel within 2 grey levels of its colour.
                let img = images.image_unit(k);
                for c in 0..3 {
                    for &v in &img[c * FOLDER_H * FOLDER_W..(c + 1) * FOLDER_H * FOLDER_W] {
                        let want = f32::from(JPEG_RGB[c]) / 255.0;
                        assert!(
                            (v - want).abs() <= 2.0 / 255.0,
                            "jpeg channel {c}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn image_folder_exact_order_and_classes() {
    let root = fixtures().join("image-folder");
    let (train, classes) = read_image_folder(&root, Split::Train).unwrap();
    check_folder_train(&train, &classes);
    let (test, test_classes) = read_image_folder(&root, Split::Test).unwrap();
    assert_eq!(test_classes, classes);
    assert_eq!(test.labels, vec![0, 1]);
    assert_image(&test, 0, &image_f32(5, 3, FOLDER_H, FOLDER_W), "test");
    assert_image(&test, 1, &image_f32(6, 3, FOLDER_H, FOLDER_W), "test");
}

#[test]
fn image_folder_tarball_with_top_folder_and_parent_folder() {
    let (train, classes) =
        read_image_folder(&fixtures().join("image-folder.tar.gz"), Split::Train).unwrap();
    check_folder_train(&train, &classes);
    let (_tmp, copy) = copy_fixture("image-folder");
    let (down, classes) = read_image_folder(copy.parent().unwrap(), Split::Train).unwrap();
    check_folder_train(&down, &classes);
    // A tarball without a top folder reads the same.
    let tmp = tempfile::tempdir().unwrap();
    let flat = tmp.path().join("flat.tar.gz");
    std::fs::write(&flat, tar_gz(None, &folder_files())).unwrap();
    let (flat_train, classes) = read_image_folder(&flat, Split::Train).unwrap();
    assert_eq!(flat_train, train);
    assert_eq!(classes, ["ant", "bee"]);
}

/// Many image files (decoded in parallel) come out in reading order, each exactly its file's
/// bytes: classes by name, files in a class by name (not in the order they were written), the
/// same from a folder and a `.tar.gz`, and the same as decoding the files one by one with
/// `decode_image`.
#[test]
fn many_files_keep_reading_order_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let classes = ["c", "a", "b"];
    let mut files = Vec::new();
    // Written in reverse name order; file `x{j:03}` of class k holds image 1000·k + j.
    for (k, class) in classes.iter().enumerate() {
        for j in (0..70usize).rev() {
            files.push((format!("train/{class}/x{j:03}.png"), png_rgb(1000 * k + j)));
        }
        files.push((format!("test/{class}/0.png"), png_rgb(k)));
    }
    write_tree(tmp.path(), &files);
    let tar = tmp.path().join("many.tar.gz");
    std::fs::write(&tar, tar_gz(Some("top"), &files)).unwrap();
    let (from_dir, names) = read_image_folder(tmp.path(), Split::Train).unwrap();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(from_dir.len(), 210);
    let mut by_one = Vec::new();
    for (label, class) in names.iter().enumerate() {
        let k = classes.iter().position(|c| c == class).unwrap();
        for j in 0..70 {
            let i = 70 * label + j;
            assert_eq!(from_dir.labels[i], label as u32);
            assert_eq!(
                from_dir.image(i),
                &image_bytes(1000 * k + j, 3, FOLDER_H, FOLDER_W)[..],
                "image {i} = {class}/x{j:03}.png"
            );
            assert_image(
                &from_dir,
                i,
                &image_f32(1000 * k + j, 3, FOLDER_H, FOLDER_W),
                "many",
            );
            let path = tmp.path().join(format!("train/{class}/x{j:03}.png"));
            let (shape, bytes) =
                folder::decode_image(&std::fs::read(&path).unwrap(), "x", Channels::Auto).unwrap();
            assert_eq!(shape, from_dir.shape);
            by_one.extend(bytes);
        }
    }
    assert_eq!(by_one, from_dir.pixels);
    let (from_tar, _) = read_image_folder(&tar, Split::Train).unwrap();
    assert_eq!(from_tar, from_dir);
}

#[test]
fn class_names_sort_by_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = ["zebra", "Zulu", "apple", "10", "9"]
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            [
                (format!("train/{c}/x.png"), png_rgb(i)),
                (format!("test/{c}/x.png"), png_rgb(i)),
            ]
        })
        .collect();
    write_tree(tmp.path(), &files);
    let (images, classes) = read_image_folder(tmp.path(), Split::Train).unwrap();
    assert_eq!(classes, ["10", "9", "Zulu", "apple", "zebra"]);
    // Label k is the k-th name; "10" was written as image 3.
    assert_eq!(images.labels, vec![0, 1, 2, 3, 4]);
    assert_image(&images, 0, &image_f32(3, 3, FOLDER_H, FOLDER_W), "class 10");
}

#[test]
fn grey_images_get_one_channel_or_are_converted() {
    let tmp = tempfile::tempdir().unwrap();
    let files = vec![
        ("train/a/0.png".to_string(), png_gray(0, 3, 2)),
        ("train/b/0.png".to_string(), png_gray(1, 3, 2)),
        ("test/a/0.png".to_string(), png_gray(2, 3, 2)),
        ("test/b/0.png".to_string(), png_gray(3, 3, 2)),
    ];
    write_tree(tmp.path(), &files);
    let (auto, _) = read_image_folder(tmp.path(), Split::Train).unwrap();
    assert_eq!(auto.shape, ImageShape::new(1, 2, 3));
    assert_eq!(auto.image(1), &image_bytes(1, 1, 2, 3)[..]);
    assert_image(&auto, 1, &image_f32(1, 1, 2, 3), "grey");
    let (rgb, _) = read_image_folder_with(tmp.path(), Split::Train, Channels::Exactly(3)).unwrap();
    assert_eq!(rgb.shape, ImageShape::new(3, 2, 3));
    let grey = image_f32(1, 1, 2, 3);
    assert_eq!(&rgb.image_unit(1)[0..6], &grey[..]);
    assert_eq!(&rgb.image_unit(1)[6..12], &grey[..]);
    assert_eq!(&rgb.image_unit(1)[12..18], &grey[..]);
}

fn config_for(dataset: Dataset, path: std::path::PathBuf) -> Config {
    let mut c = Config::default();
    c.data.dataset = dataset;
    c.data.path = Some(path);
    c.data.validation = 0;
    c
}

#[test]
fn load_cifar10_binaries_folder_and_tarball() {
    for path in [
        fixtures().join("cifar-10-batches-bin"),
        fixtures().join("cifar-10-binary.tar.gz"),
    ] {
        let mut c = config_for(Dataset::Cifar10, path.clone());
        c.data.validation = 2;
        let s = load(&c, &Seeds::new(0)).unwrap();
        assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (3, 2, 2));
        assert!(
            s.summary().contains("3 train, 2 validation, 2 test"),
            "{}",
            s.summary()
        );
    }
}

#[test]
fn load_cifar10_path_may_be_an_image_folder() {
    let mut c = config_for(Dataset::Cifar10, fixtures().join("image-folder.tar.gz"));
    c.model.input_size = 4; // not square: must be refused
    let err = load(&c, &Seeds::new(0)).unwrap_err();
    assert!(matches!(err, DataError::ModelMismatch { .. }), "{err}");
    assert!(err.to_string().contains("3x4x5"), "{err}");
    c.model.classes = 2;
    c.model.input_size = 5;
    let err = load(&c, &Seeds::new(0)).unwrap_err().to_string();
    assert!(err.contains("images are 3x4x5"), "{err}");
}

#[test]
fn load_image_folder_checks_classes_against_model() {
    // Square images so the shape fits a model.
    let tmp = tempfile::tempdir().unwrap();
    let sq = |i: usize| {
        let img = image::RgbImage::from_fn(4, 4, |x, y| {
            image::Rgb(std::array::from_fn(|c| pixel(i, c, y as usize, x as usize)))
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let files: Vec<(String, Vec<u8>)> = vec![
        ("train/a/0.png".into(), sq(0)),
        ("train/a/1.png".into(), sq(1)),
        ("train/b/0.png".into(), sq(2)),
        ("test/a/0.png".into(), sq(3)),
        ("test/b/0.png".into(), sq(4)),
    ];
    write_tree(tmp.path(), &files);
    let mut c = config_for(Dataset::ImageFolder, tmp.path().to_path_buf());
    c.model.input_size = 4;
    let err = load(&c, &Seeds::new(0)).unwrap_err().to_string();
    assert!(
        err.contains("the data have 2 classes but model.classes = 10"),
        "{err}"
    );
    c.model.classes = 2;
    let s = load(&c, &Seeds::new(0)).unwrap();
    assert_eq!(s.classes, ["a", "b"]);
    assert_eq!(s.train.labels, vec![0, 0, 1]);
    assert_image(&s.train, 2, &image_f32(2, 3, 4, 4), "load");
    // Grey model: images converted to one channel.
    c.model.in_channels = 1;
    c.model.mean = vec![0.5];
    c.model.std = vec![0.5];
    let s = load(&c, &Seeds::new(0)).unwrap();
    assert_eq!(s.train.shape, ImageShape::new(1, 4, 4));
}

#[test]
fn load_fashion_mnist_fixture_with_limit() {
    let mut c = config_for(Dataset::FashionMnist, fixtures().join("mnist-gz"));
    c.model.in_channels = 1;
    c.model.mean = vec![0.5];
    c.model.std = vec![0.5];
    let err = load(&c, &Seeds::new(0)).unwrap_err().to_string();
    assert!(err.contains("images are 1x4x3"), "{err}");
    assert!(err.contains("model.input_size = 32"), "{err}");
    c.model.input_size = 4;
    let err = load(&c, &Seeds::new(0)).unwrap_err().to_string();
    assert!(err.contains("images are 1x4x3"), "{err}");
    // Square IDX images in a temporary folder.
    let tmp = tempfile::tempdir().unwrap();
    let square = |first: usize, n: usize| {
        let mut v = Vec::new();
        for w in [0x803u32, n as u32, 3, 3] {
            v.extend(w.to_be_bytes());
        }
        for i in 0..n {
            v.extend(image_bytes(first + i, 1, 3, 3));
        }
        v
    };
    write_tree(
        tmp.path(),
        &[
            ("train-images-idx3-ubyte".into(), square(0, 6)),
            (
                "train-labels-idx1-ubyte".into(),
                idx_labels(&[0, 1, 2, 3, 4, 5]),
            ),
            ("t10k-images-idx3-ubyte".into(), square(50, 2)),
            ("t10k-labels-idx1-ubyte".into(), idx_labels(&[9, 9])),
        ],
    );
    c.data.path = Some(tmp.path().to_path_buf());
    c.model.input_size = 3;
    c.data.validation = 2;
    c.data.train_limit = Some(3);
    let s = load(&c, &Seeds::new(4)).unwrap();
    assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (3, 2, 2));
    // Every kept image is one of the originals with its own label (label k = image k).
    for (set, n) in [(&s.train, 3), (&s.validation, 2)] {
        for k in 0..n {
            let label = set.labels[k] as usize;
            assert_image(set, k, &image_f32(label, 1, 3, 3), "kept");
        }
    }
    // Without the limit the validation images are the same.
    c.data.train_limit = None;
    let full = load(&c, &Seeds::new(4)).unwrap();
    assert_eq!(full.validation, s.validation);
    assert_eq!(full.train.len(), 4);
}

#[test]
fn image_folder_dataset_needs_a_path() {
    let mut c = Config::default();
    c.data.dataset = Dataset::ImageFolder;
    let err = load(&c, &Seeds::new(0)).unwrap_err();
    assert!(
        matches!(err, DataError::Config { field: "path", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("data.path"), "{err}");
}

#[test]
fn default_paths() {
    assert_eq!(
        default_path(Dataset::FashionMnist).unwrap(),
        std::path::PathBuf::from("/usr/share/datasets/fashion-mnist")
    );
    assert_eq!(
        default_path(Dataset::Mnist).unwrap(),
        std::path::PathBuf::from("/usr/share/datasets/mnist")
    );
    assert_eq!(
        default_path(Dataset::Cifar10).unwrap(),
        std::path::PathBuf::from("data/cifar-10-batches-bin")
    );
    assert_eq!(
        default_path(Dataset::Cifar100).unwrap(),
        std::path::PathBuf::from("data/cifar-100-binary")
    );
    assert_eq!(default_path(Dataset::ImageFolder), None);
}

#[test]
fn missing_cifar_says_what_was_looked_for() {
    // The test's working directory is data/, which has no data/cifar-10-batches-bin.
    let mut c = Config::default();
    c.data.dataset = Dataset::Cifar100;
    let err = load(&c, &Seeds::new(0)).unwrap_err().to_string();
    assert!(err.contains("train.bin and test.bin"), "{err}");
    assert!(err.contains("data/cifar-100-binary"), "{err}");
    assert!(err.contains("data/cifar-100-binary.tar.gz"), "{err}");
    assert!(err.contains("train/<class>"), "{err}");
}

/// The default `data.validation = 0`: `load` keeps every training image and no validation set.
#[test]
fn load_without_a_holdout_keeps_every_training_image() {
    let mut c = Config::default();
    assert_eq!(c.data.validation, 0, "the default trains on everything");
    c.data.path = Some(fixtures().join("cifar-10-batches-bin"));
    let s = load(&c, &Seeds::new(0)).unwrap();
    assert_eq!((s.train.len(), s.validation.len(), s.test.len()), (5, 0, 2));
    assert!(s.validation.is_empty());
    assert!(
        s.summary().contains("5 train, 0 validation, 2 test"),
        "{}",
        s.summary()
    );
    // In file order: the same images as the unsplit training set.
    c.data.validation = 2;
    let split = load(&c, &Seeds::new(0)).unwrap();
    let mut all = split.train.labels.clone();
    all.extend(&split.validation.labels);
    all.sort_unstable();
    let mut everything = s.train.labels.clone();
    everything.sort_unstable();
    assert_eq!(all, everything);
}

#[test]
fn cifar10_folder_with_cifar100_files_is_not_found() {
    let mut c = config_for(Dataset::Cifar10, fixtures().join("cifar-100-binary"));
    c.data.validation = 0;
    let err = load(&c, &Seeds::new(0)).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
}

/// Debian's dataset-fashion-mnist, when installed: the real files, through `load` with the
/// quick preset's model settings.
#[test]
fn debian_fashion_mnist_when_installed() {
    let dir = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.is_dir() {
        skip(
            "debian_fashion_mnist_when_installed",
            &format!(
                "{} absent (apt-get install dataset-fashion-mnist)",
                dir.display()
            ),
        );
        return;
    }
    let mut c = eio_spec::Preset::Quick.config().unwrap();
    c.data.train_limit = None;
    let s = load(&c, &Seeds::new(0)).unwrap();
    assert_eq!(s.train.len() + s.validation.len(), 60_000);
    assert_eq!(s.validation.len(), c.data.validation);
    assert_eq!(s.test.len(), 10_000);
    assert_eq!(s.train.shape, ImageShape::new(1, 28, 28));
    let counts = s.test.class_counts(10);
    assert_eq!(counts, vec![1000; 10]);
    let mean: f64 = s
        .test
        .unit_pixels()
        .iter()
        .map(|&p| f64::from(p))
        .sum::<f64>()
        / s.test.pixels.len() as f64;
    // Fashion-MNIST's test mean is 0.2868 (the quick preset normalises with 0.2860, the
    // training mean).
    assert!((mean - 0.2868).abs() < 0.002, "test mean {mean}");
}

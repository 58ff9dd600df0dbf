//! The committed fixtures in `data/tests/fixtures/`, generated here from formulas, so each
//! test knows every expected pixel and label, and `fixtures.rs` checks that the committed files
//! are exactly what this code generates. Regenerate with
//! `EIO_WRITE_FIXTURES=1 cargo test -p eio-data --test fixtures`.
#![allow(dead_code)]

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use image::{GrayImage, ImageFormat, RgbImage};

/// `data/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The pixel byte of image `i`, channel `c`, row `y`, column `x` in every generated file
/// (distinct images, channels and positions get distinct values for the small sizes used).
pub fn pixel(i: usize, c: usize, y: usize, x: usize) -> u8 {
    ((i * 37 + c * 11 + y * 5 + x * 3 + 1) % 256) as u8
}

/// Image `i` as C, H, W bytes.
pub fn image_bytes(i: usize, c: usize, h: usize, w: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                v.push(pixel(i, ch, y, x));
            }
        }
    }
    v
}

/// As f32 in [0, 1].
pub fn image_f32(i: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    image_bytes(i, c, h, w)
        .into_iter()
        .map(|b| f32::from(b) / 255.0)
        .collect()
}

/// CIFAR-10 training labels: one record per `data_batch_k.bin`, image i = k-1.
pub const CIFAR10_TRAIN_LABELS: [u8; 5] = [3, 1, 4, 1, 5];
/// CIFAR-10 test labels: `test_batch.bin`, images 100 and 101.
pub const CIFAR10_TEST_LABELS: [u8; 2] = [9, 2];
/// CIFAR-100 (coarse, fine) training labels, images 0..3.
pub const CIFAR100_TRAIN_LABELS: [(u8, u8); 3] = [(19, 99), (0, 0), (7, 42)];
/// CIFAR-100 (coarse, fine) test labels, images 100, 101.
pub const CIFAR100_TEST_LABELS: [(u8, u8); 2] = [(3, 17), (11, 64)];

pub fn cifar10_record(i: usize, label: u8) -> Vec<u8> {
    let mut v = vec![label];
    v.extend(image_bytes(i, 3, 32, 32));
    v
}

pub fn cifar100_record(i: usize, coarse: u8, fine: u8) -> Vec<u8> {
    let mut v = vec![coarse, fine];
    v.extend(image_bytes(i, 3, 32, 32));
    v
}

/// `cifar-10-batches-bin/*`: (file name, bytes).
pub fn cifar10_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = CIFAR10_TRAIN_LABELS
        .iter()
        .enumerate()
        .map(|(i, &l)| (format!("data_batch_{}.bin", i + 1), cifar10_record(i, l)))
        .collect();
    let test: Vec<u8> = CIFAR10_TEST_LABELS
        .iter()
        .enumerate()
        .flat_map(|(i, &l)| cifar10_record(100 + i, l))
        .collect();
    files.push(("test_batch.bin".into(), test));
    files
}

/// `cifar-100-binary/*`.
pub fn cifar100_files() -> Vec<(String, Vec<u8>)> {
    let train = CIFAR100_TRAIN_LABELS
        .iter()
        .enumerate()
        .flat_map(|(i, &(c, f))| cifar100_record(i, c, f))
        .collect();
    let test = CIFAR100_TEST_LABELS
        .iter()
        .enumerate()
        .flat_map(|(i, &(c, f))| cifar100_record(100 + i, c, f))
        .collect();
    vec![("train.bin".into(), train), ("test.bin".into(), test)]
}

/// IDX image dimensions of the MNIST-format fixtures.
pub const IDX_ROWS: usize = 4;
pub const IDX_COLS: usize = 3;
/// IDX training labels (images 0..5) and test labels (images 100, 101).
pub const IDX_TRAIN_LABELS: [u8; 5] = [7, 0, 9, 3, 3];
pub const IDX_TEST_LABELS: [u8; 2] = [1, 8];

pub fn idx_images(first: usize, n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x803u32, n as u32, IDX_ROWS as u32, IDX_COLS as u32] {
        v.extend(word.to_be_bytes());
    }
    for i in 0..n {
        v.extend(image_bytes(first + i, 1, IDX_ROWS, IDX_COLS));
    }
    v
}

pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(0x801u32.to_be_bytes());
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend(labels);
    v
}

/// `mnist/*` (raw; `mnist-gz/` holds the same files gzipped, with `.gz` added).
pub fn idx_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("train-images-idx3-ubyte".into(), idx_images(0, 5)),
        (
            "train-labels-idx1-ubyte".into(),
            idx_labels(&IDX_TRAIN_LABELS),
        ),
        ("t10k-images-idx3-ubyte".into(), idx_images(100, 2)),
        (
            "t10k-labels-idx1-ubyte".into(),
            idx_labels(&IDX_TEST_LABELS),
        ),
    ]
}

/// Image-folder fixture size.
pub const FOLDER_H: usize = 4;
pub const FOLDER_W: usize = 5;

pub fn png_rgb(i: usize) -> Vec<u8> {
    let img = RgbImage::from_fn(FOLDER_W as u32, FOLDER_H as u32, |x, y| {
        image::Rgb(std::array::from_fn(|c| pixel(i, c, y as usize, x as usize)))
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

pub fn png_gray(i: usize, w: u32, h: u32) -> Vec<u8> {
    let img = GrayImage::from_fn(w, h, |x, y| {
        image::Luma([pixel(i, 0, y as usize, x as usize)])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

/// A flat-colour JPEG (flat, so the lossy codec reproduces it to within a grey level or two).
pub fn jpeg_flat(rgb: [u8; 3]) -> Vec<u8> {
    let img = RgbImage::from_pixel(FOLDER_W as u32, FOLDER_H as u32, image::Rgb(rgb));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100)
        .encode_image(&img)
        .expect("encode jpeg");
    out
}

/// The flat colour of the JPEG fixture.
pub const JPEG_RGB: [u8; 3] = [200, 40, 120];

/// The image-folder layout (relative path, bytes). Classes `ant` and `bee`; file names chosen
/// so that name order ("10.png" < "9.png" < "b.jpg") differs from numeric order.
///
/// Expected reading order and labels:
/// train: ant/10.png (image 10), ant/9.png (image 9), ant/b.jpg (JPEG), bee/1.png (image 1)
/// test: ant/5.png (image 5), bee/6.png (image 6)
pub fn folder_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("train/ant/9.png".into(), png_rgb(9)),
        ("train/ant/10.png".into(), png_rgb(10)),
        ("train/ant/b.jpg".into(), jpeg_flat(JPEG_RGB)),
        ("train/bee/1.png".into(), png_rgb(1)),
        ("test/ant/5.png".into(), png_rgb(5)),
        ("test/bee/6.png".into(), png_rgb(6)),
    ]
}

/// A `.tar.gz` of `files`, every path under `top/` (when given), folders listed first, fixed
/// metadata (mtime 0, mode 0644/0755, owner 0).
pub fn tar_gz(top: Option<&str>, files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let prefix = |p: &str| match top {
        Some(t) => format!("{t}/{p}"),
        None => p.to_string(),
    };
    let mut dirs: Vec<String> = Vec::new();
    if let Some(t) = top {
        dirs.push(t.to_string());
    }
    for (p, _) in files {
        let mut acc = String::new();
        let parts: Vec<&str> = p.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            let d = prefix(&acc);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut builder = tar::Builder::new(gz);
    for d in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_size(0);
        builder
            .append_data(&mut h, format!("{d}/"), std::io::empty())
            .expect("tar dir");
    }
    for (p, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(bytes.len() as u64);
        builder
            .append_data(&mut h, prefix(p), &bytes[..])
            .expect("tar file");
    }
    builder
        .into_inner()
        .expect("tar finish")
        .finish()
        .expect("gzip finish")
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip finish")
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// The regular files of a `.tar.gz` (path, bytes), in archive order.
pub fn untar_gz(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut out = Vec::new();
    for e in a.entries().expect("tar") {
        let mut e = e.expect("entry");
        if e.header().entry_type().is_file() {
            let p = e.path().expect("path").to_string_lossy().into_owned();
            let mut b = Vec::new();
            e.read_to_end(&mut b).expect("read");
            out.push((p, b));
        }
    }
    out
}

/// Every committed fixture: (path under `fixtures/`, bytes, compared how).
pub enum Compare {
    /// Byte for byte.
    Exact,
    /// After gunzip (compressors may change between flate2 releases).
    Gzip,
    /// The archive's regular files after gunzip.
    TarGz,
}

pub fn all_fixtures() -> Vec<(String, Vec<u8>, Compare)> {
    let mut out = Vec::new();
    for (n, b) in cifar10_files() {
        out.push((format!("cifar-10-batches-bin/{n}"), b, Compare::Exact));
    }
    let tagged: Vec<(String, Vec<u8>)> = cifar10_files();
    out.push((
        "cifar-10-binary.tar.gz".into(),
        tar_gz(Some("cifar-10-batches-bin"), &tagged),
        Compare::TarGz,
    ));
    for (n, b) in cifar100_files() {
        out.push((format!("cifar-100-binary/{n}"), b, Compare::Exact));
    }
    for (n, b) in idx_files() {
        out.push((format!("mnist-gz/{n}.gz"), gzip(&b), Compare::Gzip));
        out.push((format!("mnist/{n}"), b, Compare::Exact));
    }
    for (p, b) in folder_files() {
        out.push((format!("image-folder/{p}"), b, Compare::Exact));
    }
    out.push((
        "image-folder.tar.gz".into(),
        tar_gz(Some("image-folder"), &folder_files()),
        Compare::TarGz,
    ));
    out
}

/// Writes `files` (relative path, bytes) under `root`.
pub fn write_tree(root: &Path, files: &[(String, Vec<u8>)]) {
    for (p, b) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, b).expect("write");
    }
}

/// A copy of fixture folder `name` in a fresh temporary folder; returns (guard, copy path).
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = tmp.path().join(name);
    copy_dir(&fixtures().join(name), &dst);
    (tmp, dst)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir") {
        let e = e.expect("entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy");
        }
    }
}

/// Prints `skipped: <test>: <reason>` straight to stderr, past the test harness's capture, so
/// it shows in a plain `cargo test`.
pub fn skip(test: &str, reason: &str) {
    let line = format!("\nskipped: {test}: {reason}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

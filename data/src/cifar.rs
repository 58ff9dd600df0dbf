//! The official CIFAR-10 and CIFAR-100 binary files.
//!
//! CIFAR-10 (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`): records of one label
//! byte (0..9) and 3072 pixel bytes, 1024 red then 1024 green then 1024 blue, each channel row
//! by row: already C, H, W. CIFAR-100 (`train.bin`, `test.bin`): records of a coarse label byte
//! (0..19), a fine label byte (0..99) and the same 3072 bytes; eio uses the fine label.

use std::path::Path;

use crate::images::{ImageShape, Images};
use crate::tree::Tree;
use crate::{DataError, LoadedData};

/// Pixel bytes of one CIFAR record (3 x 32 x 32).
pub const CIFAR_IMAGE_BYTES: usize = 3 * 32 * 32;

/// The CIFAR-10 class names, by label.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The CIFAR-100 fine class names, by label.
pub const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// Which CIFAR binary format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// One label byte per record; files `data_batch_1..5.bin`, `test_batch.bin`.
    Cifar10,
    /// Coarse and fine label bytes per record; files `train.bin`, `test.bin`.
    Cifar100,
}

impl CifarKind {
    /// Label bytes per record.
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    /// The training files, in reading order.
    pub fn train_files(self) -> &'static [&'static str] {
        match self {
            CifarKind::Cifar10 => &[
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            CifarKind::Cifar100 => &["train.bin"],
        }
    }

    /// The test file.
    pub fn test_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "test_batch.bin",
            CifarKind::Cifar100 => "test.bin",
        }
    }

    /// The class names.
    pub fn classes(self) -> Vec<String> {
        match self {
            CifarKind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            CifarKind::Cifar100 => CIFAR100_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `CIFAR-10` or `CIFAR-100`.
    pub fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 => "CIFAR-100",
        }
    }

    /// The file names, for messages.
    pub fn files_description(self) -> String {
        match self {
            CifarKind::Cifar10 => "data_batch_1.bin .. data_batch_5.bin and test_batch.bin".into(),
            CifarKind::Cifar100 => "train.bin and test.bin".into(),
        }
    }
}

/// Parses CIFAR binary records already in memory. `label_bytes` is 1 (CIFAR-10: the label,
/// 0..9) or 2 (CIFAR-100: coarse label 0..19, then the fine label 0..99, which is returned).
/// `origin` names the bytes in errors.
///
/// # Errors
/// [`DataError::BadHeader`] for another `label_bytes`; [`DataError::Truncated`] when the
/// length is not a whole number of records (naming the cut record);
/// [`DataError::LabelOutOfRange`].
pub fn parse_cifar_records(
    bytes: &[u8],
    origin: &str,
    label_bytes: usize,
) -> Result<Images, DataError> {
    let (coarse_classes, classes) = match label_bytes {
        1 => (None, 10),
        2 => (Some(20), 100),
        other => {
            return Err(DataError::BadHeader {
                origin: origin.into(),
                message: format!("{other} label bytes per record (CIFAR-10 has 1, CIFAR-100 2)"),
            })
        }
    };
    let record = label_bytes + CIFAR_IMAGE_BYTES;
    let whole = bytes.len() / record;
    let rest = bytes.len() % record;
    if rest != 0 || bytes.is_empty() {
        return Err(DataError::Truncated {
            origin: origin.into(),
            what: format!("record {} ({record}-byte records)", whole + 1),
            expected: record,
            found: rest,
        });
    }
    let mut pixels = Vec::with_capacity(whole * CIFAR_IMAGE_BYTES);
    let mut labels = Vec::with_capacity(whole);
    for (index, rec) in bytes.chunks_exact(record).enumerate() {
        if let Some(coarse) = coarse_classes {
            if rec[0] as usize >= coarse {
                return Err(DataError::LabelOutOfRange {
                    origin: format!("{origin} (coarse label)"),
                    index,
                    label: u32::from(rec[0]),
                    classes: coarse,
                });
            }
        }
        let label = rec[label_bytes - 1];
        if label as usize >= classes {
            return Err(DataError::LabelOutOfRange {
                origin: origin.into(),
                index,
                label: u32::from(label),
                classes,
            });
        }
        labels.push(u32::from(label));
        pixels.extend_from_slice(&rec[label_bytes..]);
    }
    Images::new(ImageShape::new(3, 32, 32), pixels, labels)
}

/// Whether the CIFAR binaries of `kind` start at `root` (its first training file is there).
pub(crate) fn has_binaries(tree: &Tree, root: &str, kind: CifarKind) -> bool {
    tree.is_file(&Tree::child(root, kind.train_files()[0]))
}

/// Reads the binaries of `kind` under `root` of `tree`.
pub(crate) fn read_tree(tree: &Tree, root: &str, kind: CifarKind) -> Result<LoadedData, DataError> {
    let read = |name: &str| -> Result<Images, DataError> {
        let rel = Tree::child(root, name);
        let origin = tree.origin(&rel);
        if !tree.is_file(&rel) {
            return Err(DataError::NotFound {
                dataset: kind.name().into(),
                path: tree.path().to_path_buf(),
                looked_for: format!("{origin} ({} are all needed)", kind.files_description()),
            });
        }
        tree.with_bytes(&rel, |bytes| {
            parse_cifar_records(bytes, &origin, kind.label_bytes())
        })
    };
    let mut train = Images::empty(ImageShape::new(3, 32, 32));
    for name in kind.train_files() {
        let part = read(name)?;
        train.append(part, &tree.origin(&Tree::child(root, name)))?;
    }
    let test = read(kind.test_file())?;
    Ok(LoadedData {
        train,
        test,
        classes: kind.classes(),
        source: format!(
            "{} binaries in {}",
            kind.name(),
            tree.origin(root).trim_end_matches(':')
        ),
    })
}

/// Reads the official CIFAR-10 or CIFAR-100 binaries (whichever is found) from a folder, the
/// folder one level down (e.g. `cifar-10-batches-bin/`), or the official
/// `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz`.
///
/// # Errors
/// [`DataError::NotFound`] (saying which files were looked for), any error of
/// [`parse_cifar_records`], [`DataError::Io`], [`DataError::Archive`].
pub fn read_cifar_binary(path: &Path) -> Result<LoadedData, DataError> {
    let looked_for = format!(
        "CIFAR-10 ({}) or CIFAR-100 ({}) in the folder or .tar.gz, or one folder down",
        CifarKind::Cifar10.files_description(),
        CifarKind::Cifar100.files_description()
    );
    let tree = Tree::open(path, "CIFAR", &looked_for)?;
    for kind in [CifarKind::Cifar10, CifarKind::Cifar100] {
        if let Some(root) = tree.find_root(|t, r| has_binaries(t, r, kind))? {
            return read_tree(&tree, &root, kind);
        }
    }
    Err(DataError::NotFound {
        dataset: "CIFAR".into(),
        path: path.to_path_buf(),
        looked_for,
    })
}

//! Image data for eio: readers for the data sets the paper and its users train on, and the
//! seeded choices made with them.
//!
//! * Readers ([`read_cifar_binary`], [`read_image_folder`], [`read_idx`], and the byte-level
//!   [`parse_cifar_records`], [`parse_idx_images`], [`parse_idx_labels`]) give [`Images`]: the
//!   pixel bytes the files hold, one image after another, each C, H, W row-major, with u32
//!   labels. Engines take them as f32 in [0, 1] (byte / 255, [`unit()`]; normalisation is the
//!   model's first op, protocols.md), converted one batch at a time
//!   ([`Images::unit_range`], [`Images::write_unit`], [`EpochPlan::batch`]). Image folders are
//!   decoded in parallel, into the images' file order.
//! * [`load`] reads the data set a [`Config`] names, checks it against the model config, and
//!   applies `data.train_limit` and the `data.validation` hold-out ([`split::holdout`]).
//! * [`eval_subset`] is the fixed evaluation subset; [`EpochPlan`] is the per-epoch order,
//!   batching and augmentation, resumable at any batch.
//!
//! Every random choice comes from [`eio_spec::rng::Seeds`] streams: `Validation` (hold-out and
//! train limit), `EvalSubset`, `DataOrder` (index: epoch) and `Augmentation` (index:
//! epoch · 2^32 + batch).
//!
//! Bad data is an error ([`DataError`]) naming the file and what is wrong with it: nothing is
//! skipped or patched, and no input makes a reader panic (the IDX and CIFAR parsers are fuzzed,
//! see [`fuzz_check`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use eio_spec::config::{DataConfig, Dataset, ModelConfig};
use eio_spec::rng::Seeds;
use eio_spec::Config;

pub mod cifar;
mod error;
pub mod feed;
pub mod folder;
pub mod fuzz_check;
pub mod idx;
mod images;
pub mod split;
mod tree;

pub use cifar::{parse_cifar_records, read_cifar_binary, CifarKind};
pub use error::DataError;
pub use feed::{Augment, AugmentDraw, Batch, EpochPlan};
pub use folder::{read_image_folder, read_image_folder_with, Channels, Split};
pub use idx::{parse_idx_images, parse_idx_labels, read_idx};
pub use images::{unit, ImageShape, Images};
pub use split::{eval_subset, holdout, Holdout};

use tree::Tree;

/// The Fashion-MNIST class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The MNIST class names (the digits), by label.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// A data set as read: all training images, the test images, the class names.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedData {
    pub train: Images,
    pub test: Images,
    /// Class names by label.
    pub classes: Vec<String>,
    /// What was read, for logs, e.g. `CIFAR-10 binaries in data/cifar-10-batches-bin`.
    pub source: String,
}

/// The images of a run: training images (after `data.train_limit`), the held-out validation
/// images, the test images, the class names.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSplits {
    pub train: Images,
    pub validation: Images,
    pub test: Images,
    /// Class names by label.
    pub classes: Vec<String>,
    /// What was read, for logs.
    pub source: String,
}

impl DataSplits {
    /// One line for logs: source, shape and counts.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} classes, images {} (CxHxW); {} train, {} validation, {} test",
            self.source,
            self.classes.len(),
            self.train.shape,
            self.train.len(),
            self.validation.len(),
            self.test.len()
        )
    }
}

/// The folder or file a data set is read from when `data.path` is unset: Fashion-MNIST
/// `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`), MNIST
/// `/usr/share/datasets/mnist`, CIFAR-10 `data/cifar-10-batches-bin`, CIFAR-100
/// `data/cifar-100-binary` (relative to the working directory). None for `image-folder`, which
/// needs a path.
pub fn default_path(dataset: Dataset) -> Option<PathBuf> {
    match dataset {
        Dataset::FashionMnist => Some("/usr/share/datasets/fashion-mnist".into()),
        Dataset::Mnist => Some("/usr/share/datasets/mnist".into()),
        Dataset::Cifar10 => Some("data/cifar-10-batches-bin".into()),
        Dataset::Cifar100 => Some("data/cifar-100-binary".into()),
        Dataset::ImageFolder => None,
    }
}

/// Where to look: `data.path`, or the default path and, for CIFAR, the official archive next
/// to it (`data/cifar-10-binary.tar.gz`, `data/cifar-100-binary.tar.gz`).
fn candidate_paths(data: &DataConfig) -> Result<Vec<PathBuf>, DataError> {
    if let Some(p) = &data.path {
        return Ok(vec![p.clone()]);
    }
    let Some(default) = default_path(data.dataset) else {
        return Err(DataError::Config {
            field: "path",
            message: format!(
                "dataset image-folder needs data.path: a folder or .tar.gz holding {}",
                folder::LAYOUT
            ),
        });
    };
    let mut paths = vec![default];
    match data.dataset {
        Dataset::Cifar10 => paths.push("data/cifar-10-binary.tar.gz".into()),
        Dataset::Cifar100 => paths.push("data/cifar-100-binary.tar.gz".into()),
        _ => {}
    }
    Ok(paths)
}

fn dataset_name(dataset: Dataset) -> &'static str {
    match dataset {
        Dataset::Cifar10 => "CIFAR-10",
        Dataset::Cifar100 => "CIFAR-100",
        Dataset::Mnist => "MNIST",
        Dataset::FashionMnist => "Fashion-MNIST",
        Dataset::ImageFolder => "image folder",
    }
}

/// Reads the data set `data` names, whole (no hold-out). `in_channels` (the model's) sets the
/// channels image files are decoded to (1 = grey, 3 = RGB); the binary formats have fixed
/// channels, checked by [`load`].
///
/// For `cifar10` / `cifar100` the path may hold the official binaries or an image-folder
/// layout, as a folder, the folder one level down, or a `.tar.gz`: whichever is found.
///
/// # Errors
/// [`DataError::Config`] for `image-folder` without a path, [`DataError::NotFound`] saying what
/// was looked for where, and every reader error.
pub fn read_dataset(data: &DataConfig, in_channels: usize) -> Result<LoadedData, DataError> {
    let paths = candidate_paths(data)?;
    let name = dataset_name(data.dataset);
    let path = match paths.iter().find(|p| p.exists()) {
        Some(p) => p.clone(),
        None => {
            return Err(DataError::NotFound {
                dataset: name.into(),
                path: paths[0].clone(),
                looked_for: looked_for(data.dataset, &paths),
            })
        }
    };
    let channels = Channels::Exactly(in_channels);
    match data.dataset {
        Dataset::Mnist | Dataset::FashionMnist => read_mnist_folder(&path, data.dataset),
        Dataset::Cifar10 | Dataset::Cifar100 => {
            let kind = if data.dataset == Dataset::Cifar10 {
                CifarKind::Cifar10
            } else {
                CifarKind::Cifar100
            };
            let tree = Tree::open(&path, name, &looked_for(data.dataset, &paths))?;
            if let Some(root) = tree.find_root(|t, r| cifar::has_binaries(t, r, kind))? {
                return cifar::read_tree(&tree, &root, kind);
            }
            if let Some(root) = tree.find_root(folder::has_layout)? {
                return read_folder_tree(&tree, &root, channels, name);
            }
            Err(DataError::NotFound {
                dataset: name.into(),
                path,
                looked_for: looked_for(data.dataset, &paths),
            })
        }
        Dataset::ImageFolder => {
            let tree = Tree::open(&path, name, folder::LAYOUT)?;
            match tree.find_root(folder::has_layout)? {
                Some(root) => read_folder_tree(&tree, &root, channels, name),
                None => Err(DataError::NotFound {
                    dataset: name.into(),
                    path,
                    looked_for: folder::LAYOUT.into(),
                }),
            }
        }
    }
}

fn read_folder_tree(
    tree: &Tree,
    root: &str,
    channels: Channels,
    name: &str,
) -> Result<LoadedData, DataError> {
    let (train, test, classes) = folder::read_both(tree, root, channels)?;
    Ok(LoadedData {
        train,
        test,
        classes,
        source: format!("{name} image folders in {}", tree.origin(root)),
    })
}

fn looked_for(dataset: Dataset, paths: &[PathBuf]) -> String {
    let what = match dataset {
        Dataset::Cifar10 => format!(
            "the CIFAR-10 binaries ({}) or {}",
            CifarKind::Cifar10.files_description(),
            folder::LAYOUT
        ),
        Dataset::Cifar100 => format!(
            "the CIFAR-100 binaries ({}) or {}",
            CifarKind::Cifar100.files_description(),
            folder::LAYOUT
        ),
        Dataset::Mnist | Dataset::FashionMnist => {
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, \
             t10k-labels-idx1-ubyte (each raw or .gz; also named *.idx3-ubyte), in the folder \
             or one folder down"
                .into()
        }
        Dataset::ImageFolder => folder::LAYOUT.into(),
    };
    let places: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    format!("{what}; tried {}", places.join(", "))
}

/// Reads MNIST or Fashion-MNIST IDX files from folder `path` (or the one folder down that
/// holds them): `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
/// `t10k-labels-idx1-ubyte`, each raw or `.gz`, also with `.idx` instead of `-idx` (the first
/// of those names that exists is read).
///
/// # Errors
/// [`DataError::NotFound`] naming the missing file and the names tried, and every error of
/// [`read_idx`].
pub fn read_mnist_folder(path: &Path, dataset: Dataset) -> Result<LoadedData, DataError> {
    let name = dataset_name(dataset);
    let all = looked_for(dataset, &[path.to_path_buf()]);
    if !path.is_dir() {
        return Err(DataError::NotFound {
            dataset: name.into(),
            path: path.to_path_buf(),
            looked_for: format!("a folder holding {all}"),
        });
    }
    let tree = Tree::Dir(path.to_path_buf());
    let first = idx::idx_candidates("train", "images", "idx3-ubyte");
    let root = tree
        .find_root(|t, r| first.iter().any(|f| t.is_file(&Tree::child(r, f))))?
        .ok_or_else(|| DataError::NotFound {
            dataset: name.into(),
            path: path.to_path_buf(),
            looked_for: all.clone(),
        })?;
    let find = |prefix: &str, kind: &str, ext: &str| -> Result<PathBuf, DataError> {
        let names = idx::idx_candidates(prefix, kind, ext);
        names
            .iter()
            .map(|n| Tree::child(&root, n))
            .find(|rel| tree.is_file(rel))
            .map(|rel| path.join(rel))
            .ok_or_else(|| DataError::NotFound {
                dataset: name.into(),
                path: path.join(&root),
                looked_for: names.join(" or "),
            })
    };
    let train = read_idx(
        &find("train", "images", "idx3-ubyte")?,
        &find("train", "labels", "idx1-ubyte")?,
    )?;
    let test = read_idx(
        &find("t10k", "images", "idx3-ubyte")?,
        &find("t10k", "labels", "idx1-ubyte")?,
    )?;
    if test.shape != train.shape {
        return Err(DataError::WrongImageSize {
            origin: find("t10k", "images", "idx3-ubyte")?.display().to_string(),
            expected: train.shape,
            found: test.shape,
        });
    }
    let classes = match dataset {
        Dataset::FashionMnist => FASHION_MNIST_CLASSES.iter(),
        _ => MNIST_CLASSES.iter(),
    }
    .map(|s| s.to_string())
    .collect();
    Ok(LoadedData {
        train,
        test,
        classes,
        source: format!("{name} IDX files in {}", tree.origin(&root)),
    })
}

/// Checks the data against the model config: image shape against `model.in_channels` and
/// `model.input_size`, class count against `model.classes`, and that neither split is empty.
///
/// # Errors
/// [`DataError::ModelMismatch`] saying which setting to change, [`DataError::Empty`].
pub fn check_against_model(data: &LoadedData, model: &ModelConfig) -> Result<(), DataError> {
    for (images, split) in [(&data.train, "training"), (&data.test, "test")] {
        if images.is_empty() {
            return Err(DataError::Empty {
                origin: data.source.clone(),
                split,
            });
        }
    }
    let s = data.train.shape;
    if s.channels != model.in_channels
        || s.height != model.input_size
        || s.width != model.input_size
    {
        return Err(DataError::ModelMismatch {
            source_desc: data.source.clone(),
            message: format!(
                "images are {s} (CxHxW) but the model takes {}x{}x{} \
                 (model.in_channels = {}, model.input_size = {}); set them to match the data",
                model.in_channels,
                model.input_size,
                model.input_size,
                model.in_channels,
                model.input_size
            ),
        });
    }
    if data.classes.len() != model.classes {
        return Err(DataError::ModelMismatch {
            source_desc: data.source.clone(),
            message: format!(
                "the data have {} classes but model.classes = {}",
                data.classes.len(),
                model.classes
            ),
        });
    }
    Ok(())
}

/// Reads the data set of `config.data`, checks it against `config.model`, and splits the
/// training images: `data.validation` held out and at most `data.train_limit` kept, both
/// seeded ([`holdout`]). The test images are all returned; take [`eval_subset`] of them for
/// the attacks.
///
/// # Errors
/// Every error of [`read_dataset`] and [`check_against_model`]; [`DataError::Config`] when the
/// hold-out leaves no training image.
pub fn load(config: &Config, seeds: &Seeds) -> Result<DataSplits, DataError> {
    let data = read_dataset(&config.data, config.model.in_channels)?;
    check_against_model(&data, &config.model)?;
    let h = holdout(
        data.train.len(),
        config.data.validation,
        config.data.train_limit,
        seeds,
    )?;
    let validation = data.train.subset(&h.validation);
    // `h.train` is ascending, so keeping every image is the identity: no copy.
    let train = if h.train.len() == data.train.len() {
        data.train
    } else {
        data.train.subset(&h.train)
    };
    Ok(DataSplits {
        validation,
        train,
        test: data.test,
        classes: data.classes,
        source: data.source,
    })
}

/// Reads a file, decompressing it when it starts with the gzip magic bytes.
///
/// # Errors
/// [`DataError::Io`]; [`DataError::Archive`] for a damaged gzip stream.
pub fn read_file_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !bytes.starts_with(&tree::GZIP_MAGIC) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|source| DataError::Archive {
            path: path.to_path_buf(),
            member: "gzip stream".into(),
            source,
        })?;
    Ok(out)
}

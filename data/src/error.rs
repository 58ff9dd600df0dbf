//! What can go wrong reading data, each case naming the file and what is wrong with it.

use std::path::PathBuf;

use crate::images::ImageShape;

/// Reading, checking or splitting a data set failed.
///
/// Every variant names where the problem is: `origin` is a file path, or
/// `archive.tar.gz:member/path` for a file inside an archive. No reader skips a bad record or
/// substitutes a value; the first problem found is returned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be opened or read.
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `.tar.gz` archive (or a `.gz` file) is damaged or not an archive.
    #[error("cannot read archive {path} (at {member})")]
    Archive {
        path: PathBuf,
        /// The last member reached, or `start` when the archive could not be opened.
        member: String,
        #[source]
        source: std::io::Error,
    },
    /// The file ends inside a header or a record.
    #[error("{origin}: truncated {what}: expected {expected} bytes, found {found}")]
    Truncated {
        origin: String,
        /// What was being read, e.g. `IDX header` or `record 3 of 10001`.
        what: String,
        expected: usize,
        found: usize,
    },
    /// The file has more bytes than its header or record size accounts for.
    #[error("{origin}: {found} bytes where {what} account for {expected}; extra bytes at the end")]
    TrailingBytes {
        origin: String,
        what: String,
        expected: usize,
        found: usize,
    },
    /// The IDX magic number is not the one expected (wrong file, or not unsigned bytes).
    #[error("{origin}: wrong magic number 0x{found:08x}, expected 0x{expected:08x} ({what})")]
    BadMagic {
        origin: String,
        expected: u32,
        found: u32,
        what: &'static str,
    },
    /// A header field that makes no sense (zero image size, sizes that overflow).
    #[error("{origin}: bad header: {message}")]
    BadHeader { origin: String, message: String },
    /// A label is not a class index of the data set.
    #[error("{origin}: label {label} of record {index} is out of range (the data set has {classes} classes)")]
    LabelOutOfRange {
        origin: String,
        index: usize,
        label: u32,
        classes: usize,
    },
    /// An image's size or channel count differs from the others or from what the format fixes.
    #[error("{origin}: image is {found}, expected {expected}")]
    WrongImageSize {
        origin: String,
        expected: ImageShape,
        found: ImageShape,
    },
    /// An image file that the `image` crate (JPEG, PNG) cannot decode.
    #[error("{origin}: cannot decode image (JPEG and PNG are supported)")]
    Decode {
        origin: String,
        #[source]
        source: image::ImageError,
    },
    /// A class folder with no image in it.
    #[error("{origin}: class folder is empty")]
    EmptyClass { origin: String },
    /// Something other than a class folder, or other than an image file, in an image-folder
    /// layout.
    #[error("{origin}: unexpected {what} (layout is <root>/<split>/<class>/<image>)")]
    UnexpectedEntry { origin: String, what: &'static str },
    /// A split (`train` or `test`) of an image-folder layout is missing.
    #[error("{root}: no {split} split (looked for {looked_for})")]
    MissingSplit {
        root: String,
        split: &'static str,
        looked_for: String,
    },
    /// The train and test splits of an image folder name different classes.
    #[error("{root}: train classes {train:?} differ from test classes {test:?}")]
    ClassMismatch {
        root: String,
        train: Vec<String>,
        test: Vec<String>,
    },
    /// An image file and its label file hold different numbers of items.
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels")]
    CountMismatch {
        images: String,
        image_count: usize,
        labels: String,
        label_count: usize,
    },
    /// None of the files a data set needs were found where it was looked for.
    #[error("{dataset}: nothing readable at {path} (looked for {looked_for})")]
    NotFound {
        dataset: String,
        path: PathBuf,
        looked_for: String,
    },
    /// A split with no image at all.
    #[error("{origin}: no {split} images")]
    Empty { origin: String, split: &'static str },
    /// The data do not fit the model config.
    #[error("{source_desc}: {message}")]
    ModelMismatch {
        /// What was read (as [`crate::DataSplits::source`]).
        source_desc: String,
        message: String,
    },
    /// The data config asks for something the data cannot give.
    #[error("data.{field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

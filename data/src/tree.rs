//! A folder on disk or a `.tar.gz` read into memory, seen through the same few operations, so
//! that every reader works on both.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::DataError;

/// The gzip magic bytes.
pub(crate) const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A folder, or the regular files and folders of a `.tar.gz`.
pub(crate) enum Tree {
    Dir(PathBuf),
    Archive {
        path: PathBuf,
        /// Regular files by their `/`-separated path inside the archive.
        files: BTreeMap<String, Vec<u8>>,
        /// Every folder, listed or implied by a file's path.
        dirs: BTreeSet<String>,
    },
}

/// One entry of a folder listing.
pub(crate) struct Entry {
    pub name: String,
    pub is_dir: bool,
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

/// True when the file at `path` starts with the gzip magic bytes.
pub(crate) fn is_gzip_file(path: &Path) -> Result<bool, DataError> {
    let mut head = [0u8; 2];
    let mut file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut got = 0;
    while got < 2 {
        let n = file
            .read(&mut head[got..])
            .map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            return Ok(false);
        }
        got += n;
    }
    Ok(head == GZIP_MAGIC)
}

impl Tree {
    /// A folder, or a `.tar.gz` (recognised by its gzip magic bytes) read whole into memory.
    ///
    /// # Errors
    /// [`DataError::NotFound`] when `path` does not exist, [`DataError::Io`],
    /// [`DataError::Archive`] for a damaged archive or a file that is not a `.tar.gz`.
    pub fn open(path: &Path, dataset: &str, looked_for: &str) -> Result<Tree, DataError> {
        let meta = fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataError::NotFound {
                    dataset: dataset.to_string(),
                    path: path.to_path_buf(),
                    looked_for: looked_for.to_string(),
                }
            } else {
                DataError::io(path, e)
            }
        })?;
        if meta.is_dir() {
            return Ok(Tree::Dir(path.to_path_buf()));
        }
        if !is_gzip_file(path)? {
            return Err(DataError::Archive {
                path: path.to_path_buf(),
                member: "start".into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not a folder and not a .tar.gz (no gzip magic bytes); expected {looked_for}"),
                ),
            });
        }
        Self::read_archive(path)
    }

    fn read_archive(path: &Path) -> Result<Tree, DataError> {
        let file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
        let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(file));
        let mut archive = tar::Archive::new(gz);
        let archive_err = |member: &str, source| DataError::Archive {
            path: path.to_path_buf(),
            member: member.to_string(),
            source,
        };
        let mut files = BTreeMap::new();
        let mut dirs = BTreeSet::new();
        let mut last = String::from("start");
        for entry in archive.entries().map_err(|e| archive_err(&last, e))? {
            let mut entry = entry.map_err(|e| archive_err(&last, e))?;
            let name = entry
                .path()
                .map_err(|e| archive_err(&last, e))?
                .to_string_lossy()
                .into_owned();
            last = name.clone();
            let name = normalise(&name);
            if name.is_empty() {
                continue;
            }
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                add_parents(&mut dirs, &name);
                dirs.insert(name);
            } else if kind.is_file() {
                let mut bytes = Vec::with_capacity(entry.size().min(1 << 26) as usize);
                entry
                    .read_to_end(&mut bytes)
                    .map_err(|e| archive_err(&last, e))?;
                add_parents(&mut dirs, &name);
                files.insert(name, bytes);
            }
            // Links and special entries hold no image data; the layout never needs them.
        }
        Ok(Tree::Archive {
            path: path.to_path_buf(),
            files,
            dirs,
        })
    }

    /// How errors name the file `rel` of this tree.
    pub fn origin(&self, rel: &str) -> String {
        match self {
            Tree::Dir(root) => {
                if rel.is_empty() {
                    root.display().to_string()
                } else {
                    root.join(rel).display().to_string()
                }
            }
            Tree::Archive { path, .. } => format!("{}:{rel}", path.display()),
        }
    }

    /// The path of the folder or archive.
    pub fn path(&self) -> &Path {
        match self {
            Tree::Dir(p) => p,
            Tree::Archive { path, .. } => path,
        }
    }

    /// True for a folder, or the archive root.
    pub fn is_dir(&self, rel: &str) -> bool {
        match self {
            Tree::Dir(root) => root.join(rel).is_dir(),
            Tree::Archive { dirs, .. } => rel.is_empty() || dirs.contains(rel),
        }
    }

    /// True for a regular file.
    pub fn is_file(&self, rel: &str) -> bool {
        match self {
            Tree::Dir(root) => root.join(rel).is_file(),
            Tree::Archive { files, .. } => files.contains_key(rel),
        }
    }

    /// The bytes of file `rel`.
    ///
    /// # Errors
    /// [`DataError::Io`].
    pub fn read(&self, rel: &str) -> Result<Vec<u8>, DataError> {
        match self {
            Tree::Dir(root) => {
                let p = root.join(rel);
                fs::read(&p).map_err(|e| DataError::io(p, e))
            }
            Tree::Archive { files, path, .. } => files.get(rel).cloned().ok_or_else(|| {
                DataError::io(
                    path.join(rel),
                    std::io::Error::new(std::io::ErrorKind::NotFound, "not in the archive"),
                )
            }),
        }
    }

    /// The bytes of file `rel`, borrowed where the tree holds them.
    pub fn with_bytes<T>(
        &self,
        rel: &str,
        f: impl FnOnce(&[u8]) -> Result<T, DataError>,
    ) -> Result<T, DataError> {
        match self {
            Tree::Archive { files, .. } if files.contains_key(rel) => f(&files[rel]),
            _ => f(&self.read(rel)?),
        }
    }

    /// The entries of folder `rel`, sorted by name (byte order).
    ///
    /// # Errors
    /// [`DataError::Io`]; [`DataError::UnexpectedEntry`] for a name that is not UTF-8.
    pub fn list(&self, rel: &str) -> Result<Vec<Entry>, DataError> {
        let mut out = Vec::new();
        match self {
            Tree::Dir(root) => {
                let dir = root.join(rel);
                let read = fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
                for entry in read {
                    let entry = entry.map_err(|e| DataError::io(&dir, e))?;
                    let Ok(name) = entry.file_name().into_string() else {
                        return Err(DataError::UnexpectedEntry {
                            origin: entry.path().display().to_string(),
                            what: "file name that is not UTF-8",
                        });
                    };
                    // `metadata` follows symbolic links, so a linked folder or image counts.
                    let path = entry.path();
                    let meta = fs::metadata(&path).map_err(|e| DataError::io(&path, e))?;
                    out.push(Entry {
                        name,
                        is_dir: meta.is_dir(),
                    });
                }
            }
            Tree::Archive { files, dirs, .. } => {
                let prefix = if rel.is_empty() {
                    String::new()
                } else {
                    format!("{rel}/")
                };
                for (set_is_dir, keys) in [
                    (
                        false,
                        Box::new(files.keys()) as Box<dyn Iterator<Item = &String>>,
                    ),
                    (true, Box::new(dirs.iter())),
                ] {
                    let start = prefix.clone();
                    for key in keys.skip_while(|k| k.as_str() < start.as_str()) {
                        let Some(rest) = key.strip_prefix(&prefix) else {
                            break;
                        };
                        if !rest.is_empty() && !rest.contains('/') {
                            out.push(Entry {
                                name: rest.to_string(),
                                is_dir: set_is_dir,
                            });
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The layout root: `""` when `marker(tree, "")` holds, else the one sub-folder (in name
    /// order, the first) for which it holds. None when neither.
    pub fn find_root(
        &self,
        marker: impl Fn(&Tree, &str) -> bool,
    ) -> Result<Option<String>, DataError> {
        if marker(self, "") {
            return Ok(Some(String::new()));
        }
        for entry in self.list("")? {
            if entry.is_dir && marker(self, &entry.name) {
                return Ok(Some(entry.name));
            }
        }
        Ok(None)
    }

    /// `root/name` as a relative path.
    pub fn child(root: &str, name: &str) -> String {
        join(root, name)
    }
}

/// `./a/b/` -> `a/b`.
fn normalise(name: &str) -> String {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn add_parents(dirs: &mut BTreeSet<String>, name: &str) {
    let mut end = 0;
    while let Some(i) = name[end..].find('/') {
        dirs.insert(name[..end + i].to_string());
        end += i + 1;
    }
}

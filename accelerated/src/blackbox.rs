//! The black-box transfer suite (paper Sec. 4.1, DVERGE's protocol) on the device: generated
//! once from surrogate models, stored as a folder, and used to score any model
//! all-or-nothing. What the versions are, how they are named, seeded and sharded is
//! `eio_spec::blackbox`.
//!
//! # A suite folder
//! * `manifest.json` ([`Manifest`]): the suite's settings (`blackbox` section), the master seed
//!   of its random streams, the evaluation images (test-set indices and a SHA-256 of their
//!   pixels), every surrogate (name, file, SHA-256 of the file, members, training seed) and the
//!   job list. Every shard writes the same manifest; a folder made with other settings,
//!   surrogates or images is refused rather than mixed.
//! * `clean.safetensors`: the evaluation images (`images`, f32 `[N, C, H, W]` in [0, 1]) and
//!   their labels (`labels`, u32), so scoring needs no data set.
//! * `eps_<ε>/<version>.safetensors`: one job, the adversarial `images` (f32, same shape),
//!   with metadata `eio-blackbox-job` ([`JobMeta`]): the job, the attack settings, the
//!   surrogate (name and hash), the seed and stream, the batch size and the wall time.
//!
//! Every file is written atomically ([`crate::safe_write`]: temporary file, fsync, rename) and
//! the safetensors files carry a checksum ([`crate::integrity`]), so a killed generation leaves
//! whole jobs only; rerunning the same command removes the killed writer's temporary files,
//! skips every job whose file is present, intact and matches, and redoes the rest (a damaged
//! job file, one that fails its checksum, is redone).

use std::collections::HashMap;
use std::fs;
use std::path::{Path as FsPath, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use eio_data::Images;
use eio_spec::attack::AttackSettings;
use eio_spec::blackbox::{self as spec, Job, Shard};
use eio_spec::config::{BlackboxConfig, Config};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::verdict::Verdict;
use eio_spec::{Path, Plan};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attack::{pgd, Member, Target};
use crate::checkpoint::{write_atomically, Checkpoint, CheckpointError};
use crate::evaluate::{EpsilonResult, WhiteBoxReport};
use crate::train::range_tensors;

/// The manifest's format tag.
pub const FORMAT: &str = "eio-blackbox-suite/1";
/// Metadata key of a job file.
pub const JOB_META: &str = "eio-blackbox-job";
/// First `Gates` stream index of a randomised target's predictions while scoring (far from
/// training and white-box indices).
pub const SCORE_GATES: u64 = 3 << 60;

/// Errors of generating or scoring a suite, each naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BlackboxError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("surrogate {name} ({path})")]
    Surrogate {
        name: String,
        path: PathBuf,
        #[source]
        source: Box<CheckpointError>,
    },
    #[error("{0}")]
    Usage(String),
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Verdict(#[from] eio_spec::verdict::VerdictError),
}

/// A surrogate as the manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurrogateRecord {
    /// Its name in version names, e.g. `baseline3`.
    pub name: String,
    /// The file it was read from, as given.
    pub file: String,
    /// SHA-256 of that file.
    pub sha256: String,
    /// Members of the ensemble.
    pub members: usize,
    /// The seed it was trained with (`seed` of its config).
    pub seed: u64,
    /// e.g. `ResNet-20 width 1`.
    pub model: String,
}

/// `manifest.json` of a suite folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub config: BlackboxConfig,
    /// Master seed of the suite's streams ([`Stream::Blackbox`]).
    pub seed: u64,
    /// Where the images came from, e.g. the data set's source line.
    pub dataset: String,
    /// Test-set indices of the evaluation images.
    pub image_indices: Vec<usize>,
    /// SHA-256 of the clean images' f32 pixels (little-endian) and u32 labels.
    pub images_sha256: String,
    pub surrogates: Vec<SurrogateRecord>,
    pub jobs: Vec<Job>,
}

/// The metadata of one job file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    pub job: Job,
    pub settings: AttackSettings,
    pub surrogate: String,
    pub surrogate_sha256: String,
    pub images_sha256: String,
    /// Master seed; batch b drew from `Stream::Blackbox` split `job_stream_index(job, b)`.
    pub seed: u64,
    pub batch_size: usize,
    /// The engine's float type (`f32`, `f64`).
    pub dtype: String,
    /// Wall time of the job.
    pub seconds: f64,
}

/// SHA-256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of the images as an engine sees them (each pixel's f32 `byte / 255`, little-endian)
/// and their u32 labels.
fn images_sha256(images: &Images) -> String {
    let mut h = Sha256::new();
    for &p in &images.pixels {
        h.update(eio_data::unit(p).to_le_bytes());
    }
    for l in &images.labels {
        h.update(l.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A surrogate model loaded for generation.
pub struct Surrogate {
    pub record: SurrogateRecord,
    pub checkpoint: Checkpoint,
    plan: Plan,
    path: Path,
}

impl Surrogate {
    /// Reads the model at `file` as the surrogate `name` (a plain network or an ensemble of
    /// them, as `eio train` writes a baseline).
    ///
    /// # Errors
    /// An unreadable or invalid file, or a random gated network (n > 1).
    pub fn load(
        name: &str,
        file: &FsPath,
        device: &Device,
        dtype: DType,
    ) -> Result<Surrogate, BlackboxError> {
        let bytes = fs::read(file).map_err(|source| BlackboxError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        let surrogate_err = |source| BlackboxError::Surrogate {
            name: name.to_string(),
            path: file.to_path_buf(),
            source: Box::new(source),
        };
        let checkpoint =
            Checkpoint::from_bytes(&bytes, file, device, Some(dtype)).map_err(surrogate_err)?;
        let config = &checkpoint.meta.config;
        if config.model.n != 1 {
            return Err(BlackboxError::Invalid {
                path: file.to_path_buf(),
                message: format!(
                    "surrogate {name} is a random gated network (model.n = {}); surrogates are plain networks or ensembles of them (`eio train` with train.method = \"baseline\")",
                    config.model.n
                ),
            });
        }
        let plan = checkpoint.plan().map_err(|e| BlackboxError::Invalid {
            path: file.to_path_buf(),
            message: e.to_string(),
        })?;
        let path = Checkpoint::plain_path(&plan);
        Ok(Surrogate {
            record: SurrogateRecord {
                name: name.to_string(),
                file: file.display().to_string(),
                sha256: sha256_hex(&bytes),
                members: checkpoint.members.len(),
                seed: config.seed,
                model: format!("{} width {}", config.model.name(), config.model.width),
            },
            checkpoint,
            plan,
            path,
        })
    }

    fn target(&self) -> Target<'_> {
        let members: Vec<Member<'_>> = self
            .checkpoint
            .members
            .iter()
            .map(|state| Member {
                plan: &self.plan,
                state,
                path: &self.path,
            })
            .collect();
        Target::of_members(members)
    }
}

fn clean_file(dir: &FsPath) -> PathBuf {
    dir.join("clean.safetensors")
}

fn manifest_file(dir: &FsPath) -> PathBuf {
    dir.join("manifest.json")
}

fn host_view<'a>(dtype: Dtype, shape: Vec<usize>, bytes: &'a [u8]) -> TensorView<'a> {
    TensorView::new(dtype, shape, bytes).expect("the byte count matches the shape")
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_file(path: &FsPath, bytes: &[u8]) -> Result<(), BlackboxError> {
    write_atomically(path, bytes).map_err(|source| BlackboxError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn serialize(
    path: &FsPath,
    tensors: Vec<(&str, TensorView<'_>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, BlackboxError> {
    crate::integrity::serialize_sealed(tensors, metadata.unwrap_or_default()).map_err(|e| {
        BlackboxError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    })
}

/// Checks the checksum of a suite file ([`crate::integrity`]; files without one pass).
fn check_sealed(path: &FsPath, bytes: &[u8]) -> Result<(), BlackboxError> {
    crate::integrity::check(bytes)
        .map(|_| ())
        .map_err(|e| BlackboxError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn read_f32(
    path: &FsPath,
    st: &SafeTensors<'_>,
    name: &str,
) -> Result<(Vec<usize>, Vec<f32>), BlackboxError> {
    let invalid = |message: String| BlackboxError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let view = st
        .tensor(name)
        .map_err(|e| invalid(format!("tensor {name:?}: {e}")))?;
    if view.dtype() != Dtype::F32 {
        return Err(invalid(format!(
            "tensor {name:?} is {:?}, expected F32",
            view.dtype()
        )));
    }
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((view.shape().to_vec(), values))
}

/// The evaluation images of a suite with their test-set indices.
pub struct SuiteImages {
    pub images: Images,
    pub indices: Vec<usize>,
    /// The data set's source line.
    pub dataset: String,
}

/// What one [`generate`] call did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerateSummary {
    /// Jobs of this shard.
    pub jobs: usize,
    /// Jobs whose file was already there and matched.
    pub skipped: usize,
    /// Jobs generated now, with their wall time in seconds.
    pub generated: Vec<(String, f64)>,
    /// Stopped early by the interrupt flag (every finished job is kept).
    pub interrupted: bool,
}

/// Progress of [`generate`].
pub trait GenerateProgress {
    /// Job `done` of `total` of this shard starts (`skipped`: its file was already there).
    fn job(&mut self, job: &Job, done: usize, total: usize, skipped: bool);
    /// The job finished in `seconds`.
    fn finished(&mut self, job: &Job, seconds: f64);
    /// Something the user should know (a repair of the folder); printed to stderr by default.
    fn note(&mut self, message: &str) {
        eprintln!("{message}");
    }
}

/// Generates the jobs of `shard` of the suite in `dir` from `surrogates` on `images`, with the
/// settings of `config.blackbox` and the master seed `config.seed`. Writes (or checks) the
/// manifest and the clean images first; skips every job whose file is present and matches.
/// `interrupt` is polled between jobs.
///
/// # Errors
/// A folder holding a different suite, an SGM version on a surrogate without residual blocks,
/// a device or I/O error (each naming the file).
#[allow(clippy::too_many_arguments)]
pub fn generate(
    dir: &FsPath,
    config: &Config,
    surrogates: &[Surrogate],
    images: &SuiteImages,
    shard: Shard,
    device: &Device,
    dtype: DType,
    progress: &mut dyn GenerateProgress,
    interrupt: &std::sync::atomic::AtomicBool,
) -> Result<GenerateSummary, BlackboxError> {
    let bb = &config.blackbox;
    let names: Vec<String> = surrogates.iter().map(|s| s.record.name.clone()).collect();
    let jobs = spec::jobs(bb, &names);
    for (s, surrogate) in surrogates.iter().enumerate() {
        let needs_sgm = bb.attacks.contains(&eio_spec::config::SuiteAttack::Sgm);
        if needs_sgm && surrogate.plan.residual_blocks().is_empty() {
            return Err(BlackboxError::Usage(format!(
                "surrogate {} ({}) has no residual blocks: SGM needs a ResNet surrogate (drop \"sgm\" from blackbox.attacks)",
                names[s], surrogate.record.file
            )));
        }
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        config: bb.clone(),
        seed: config.seed,
        dataset: images.dataset.clone(),
        image_indices: images.indices.clone(),
        images_sha256: images_sha256(&images.images),
        surrogates: surrogates.iter().map(|s| s.record.clone()).collect(),
        jobs: jobs.clone(),
    };
    fs::create_dir_all(dir).map_err(|source| BlackboxError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    // Temporary files of a generation killed mid-write (the suite folder and its eps_ folders).
    let mut folders: Vec<PathBuf> = vec![dir.to_path_buf()];
    for job in &jobs {
        if let Some(parent) = dir.join(job.file()).parent() {
            if !folders.iter().any(|f| f == parent) {
                folders.push(parent.to_path_buf());
            }
        }
    }
    let mut stale = 0;
    for folder in &folders {
        stale += crate::safe_write::remove_stale_temporaries(folder).map_err(|source| {
            BlackboxError::Write {
                path: folder.clone(),
                source,
            }
        })?;
    }
    if stale > 0 {
        progress.note(&format!(
            "{}: removed {stale} temporary file(s) left by a killed generation",
            dir.display()
        ));
    }
    write_or_check_manifest(dir, &manifest)?;
    write_or_check_clean(dir, &images.images, &manifest.images_sha256)?;
    let mine: Vec<&Job> = jobs.iter().filter(|j| shard.contains(j)).collect();
    let mut summary = GenerateSummary {
        jobs: mine.len(),
        ..GenerateSummary::default()
    };
    let seeds = Seeds::new(config.seed);
    for (done, job) in mine.iter().enumerate() {
        if interrupt.load(std::sync::atomic::Ordering::SeqCst) {
            summary.interrupted = true;
            break;
        }
        let path = dir.join(job.file());
        let surrogate = &surrogates[job.version.surrogate];
        let settings = spec::settings(bb, &job.version, job.eps);
        if path.exists() {
            match read_job_meta(&path) {
                Ok(meta)
                    if meta.job == **job
                        && meta.settings == settings
                        && meta.surrogate_sha256 == surrogate.record.sha256
                        && meta.images_sha256 == manifest.images_sha256
                        && meta.seed == config.seed =>
                {
                    summary.skipped += 1;
                    progress.job(job, done, mine.len(), true);
                    continue;
                }
                Ok(_) => {
                    return Err(BlackboxError::Invalid {
                        path,
                        message: "holds a job made with other settings, surrogate, images or seed; use a new suite folder".into(),
                    })
                }
                // A damaged file (a partial copy, say): the job is redone.
                Err(_) => {}
            }
        }
        progress.job(job, done, mine.len(), false);
        let started = Instant::now();
        let target = surrogate.target();
        let n = images.images.len();
        let mut adversarial: Vec<f32> = Vec::with_capacity(images.images.pixels.len());
        for (b, start) in (0..n).step_by(bb.batch_size).enumerate() {
            let end = (start + bb.batch_size).min(n);
            let (x, y) = range_tensors(&images.images, start..end, device, dtype)?;
            let mut rng = seeds.stream(Stream::Blackbox, spec::job_stream_index(job, b));
            let adv = pgd(&target, &x, &y, &settings, &mut rng)?;
            adversarial.extend(adv.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        let seconds = started.elapsed().as_secs_f64();
        let meta = JobMeta {
            job: (*job).clone(),
            settings,
            surrogate: surrogate.record.name.clone(),
            surrogate_sha256: surrogate.record.sha256.clone(),
            images_sha256: manifest.images_sha256.clone(),
            seed: config.seed,
            batch_size: bb.batch_size,
            dtype: format!("{dtype:?}").to_lowercase(),
            seconds,
        };
        let s = &images.images.shape;
        let bytes = f32_bytes(&adversarial);
        let text = serde_json::to_string(&meta).expect("job metadata serialises");
        let file = serialize(
            &path,
            vec![(
                "images",
                host_view(Dtype::F32, vec![n, s.channels, s.height, s.width], &bytes),
            )],
            Some(HashMap::from([(JOB_META.to_string(), text)])),
        )?;
        write_file(&path, &file)?;
        progress.finished(job, seconds);
        summary.generated.push((job.version.name.clone(), seconds));
    }
    Ok(summary)
}

fn write_or_check_manifest(dir: &FsPath, manifest: &Manifest) -> Result<(), BlackboxError> {
    let path = manifest_file(dir);
    if path.exists() {
        let stored = read_manifest(dir)?;
        if stored != *manifest {
            let mut what = Vec::new();
            if stored.config != manifest.config {
                what.push("blackbox settings");
            }
            if stored.seed != manifest.seed {
                what.push("seed");
            }
            if stored.surrogates != manifest.surrogates {
                what.push("surrogates");
            }
            if stored.images_sha256 != manifest.images_sha256
                || stored.image_indices != manifest.image_indices
            {
                what.push("evaluation images");
            }
            return Err(BlackboxError::Invalid {
                path,
                message: format!(
                    "the suite in this folder differs in: {}; generate into a new folder",
                    if what.is_empty() {
                        "its job list".to_string()
                    } else {
                        what.join(", ")
                    }
                ),
            });
        }
        return Ok(());
    }
    let text = serde_json::to_string_pretty(manifest).expect("the manifest serialises");
    write_file(&path, text.as_bytes())
}

fn write_or_check_clean(dir: &FsPath, images: &Images, sha: &str) -> Result<(), BlackboxError> {
    let path = clean_file(dir);
    if path.exists() {
        if let Ok(stored) = read_clean(dir) {
            if images_sha256(&stored) == sha {
                return Ok(());
            }
        }
    }
    let s = &images.shape;
    let pixels = f32_bytes(&images.unit_pixels());
    let labels: Vec<u8> = images.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    let bytes = serialize(
        &path,
        vec![
            (
                "images",
                host_view(
                    Dtype::F32,
                    vec![images.len(), s.channels, s.height, s.width],
                    &pixels,
                ),
            ),
            ("labels", host_view(Dtype::U32, vec![images.len()], &labels)),
        ],
        None,
    )?;
    write_file(&path, &bytes)
}

/// Reads `manifest.json` of the suite in `dir`.
///
/// # Errors
/// A missing or unreadable manifest, or one of another format.
pub fn read_manifest(dir: &FsPath) -> Result<Manifest, BlackboxError> {
    let path = manifest_file(dir);
    let text = fs::read_to_string(&path).map_err(|source| BlackboxError::Read {
        path: path.clone(),
        source,
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| BlackboxError::Invalid {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if manifest.format != FORMAT {
        return Err(BlackboxError::Invalid {
            path,
            message: format!("format {:?}, expected {FORMAT:?}", manifest.format),
        });
    }
    Ok(manifest)
}

fn read_clean(dir: &FsPath) -> Result<Images, BlackboxError> {
    let path = clean_file(dir);
    let bytes = fs::read(&path).map_err(|source| BlackboxError::Read {
        path: path.clone(),
        source,
    })?;
    let invalid = |message: String| BlackboxError::Invalid {
        path: path.clone(),
        message,
    };
    check_sealed(&path, &bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let (shape, pixels) = read_f32(&path, &st, "images")?;
    let labels = st
        .tensor("labels")
        .map_err(|e| invalid(format!("tensor \"labels\": {e}")))?;
    if labels.dtype() != Dtype::U32 {
        return Err(invalid("tensor \"labels\" is not U32".into()));
    }
    let labels: Vec<u32> = labels
        .data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let [_, c, h, w] = shape[..] else {
        return Err(invalid(format!(
            "images have shape {shape:?}, expected [N, C, H, W]"
        )));
    };
    // Written from the test images, so every value is byte / 255 of a byte; anything else
    // is a damaged or foreign file.
    Images::from_unit(
        eio_data::ImageShape::new(c, h, w),
        &pixels,
        labels,
        "tensor \"images\"",
    )
    .map_err(|e| invalid(e.to_string()))
}

fn read_job(path: &FsPath) -> Result<(JobMeta, Vec<usize>, Vec<f32>), BlackboxError> {
    let bytes = fs::read(path).map_err(|source| BlackboxError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| BlackboxError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    check_sealed(path, &bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let text = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(JOB_META))
        .ok_or_else(|| invalid(format!("no {JOB_META:?} metadata: not a suite job file")))?;
    let meta: JobMeta =
        serde_json::from_str(text).map_err(|e| invalid(format!("{JOB_META}: {e}")))?;
    let (shape, pixels) = read_f32(path, &st, "images")?;
    Ok((meta, shape, pixels))
}

fn read_job_meta(path: &FsPath) -> Result<JobMeta, BlackboxError> {
    read_job(path).map(|(meta, _, _)| meta)
}

/// A suite read for scoring.
pub struct Suite {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub clean: Images,
}

/// The state of a suite folder's jobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SuiteStatus {
    pub jobs: usize,
    /// Job files that are missing.
    pub missing: Vec<String>,
}

impl Suite {
    /// Reads the manifest and clean images of the suite in `dir`.
    ///
    /// # Errors
    /// A missing or invalid manifest or clean-image file, or images that do not match the
    /// manifest's hash.
    pub fn open(dir: &FsPath) -> Result<Suite, BlackboxError> {
        let manifest = read_manifest(dir)?;
        let clean = read_clean(dir)?;
        if images_sha256(&clean) != manifest.images_sha256 {
            return Err(BlackboxError::Invalid {
                path: clean_file(dir),
                message: "the images do not match the manifest's hash".into(),
            });
        }
        Ok(Suite {
            dir: dir.to_path_buf(),
            manifest,
            clean,
        })
    }

    /// Which job files are present.
    pub fn status(&self) -> SuiteStatus {
        SuiteStatus {
            jobs: self.manifest.jobs.len(),
            missing: self
                .manifest
                .jobs
                .iter()
                .map(Job::file)
                .filter(|f| !self.dir.join(f).exists())
                .collect(),
        }
    }

    /// Checks the file of `job`: `Ok(false)` when it is missing, `Ok(true)` when it is intact
    /// (its checksum, when it has one) and holds that job for this suite's images.
    ///
    /// # Errors
    /// A damaged file, or one holding another job or shape (named).
    pub fn check_job(&self, job: &Job) -> Result<bool, BlackboxError> {
        let path = self.dir.join(job.file());
        if !path.exists() {
            return Ok(false);
        }
        let (meta, shape, _) = read_job(&path)?;
        let s = &self.clean.shape;
        if meta.job != *job || shape != [self.clean.len(), s.channels, s.height, s.width] {
            return Err(BlackboxError::Invalid {
                path,
                message: format!(
                    "does not hold job {} of the manifest (shape {shape:?})",
                    job.version.name
                ),
            });
        }
        Ok(true)
    }

    /// The suite's versions (names, in order).
    pub fn version_names(&self) -> Vec<String> {
        let names: Vec<String> = self
            .manifest
            .surrogates
            .iter()
            .map(|s| s.name.clone())
            .collect();
        spec::versions(&self.manifest.config, &names)
            .into_iter()
            .map(|v| v.name)
            .collect()
    }

    /// Scores `target` on every version: per ε, an image is robust only if `target` classifies
    /// every version of it correctly (a randomised target draws its paths from `Stream::Gates`
    /// split [`SCORE_GATES`] + job index, seeded by `seed`). `clean_accuracy` is on the clean
    /// images. Predictions run in batches of `batch_size`.
    ///
    /// # Errors
    /// A missing or damaged job file (named), or a device error.
    pub fn score(
        &self,
        target: &Target<'_>,
        seed: u64,
        batch_size: usize,
        device: &Device,
        dtype: DType,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<WhiteBoxReport, BlackboxError> {
        let status = self.status();
        if !status.missing.is_empty() {
            return Err(BlackboxError::Invalid {
                path: self.dir.clone(),
                message: format!(
                    "the suite is incomplete: {} of {} job files are missing (first: {}); finish it with `eio blackbox generate`",
                    status.missing.len(),
                    status.jobs,
                    status.missing[0]
                ),
            });
        }
        let seeds = Seeds::new(seed);
        let truth: Vec<usize> = self.clean.labels.iter().map(|&y| y as usize).collect();
        let clean = self.predict(
            target,
            &self.clean.unit_pixels(),
            batch_size,
            &seeds,
            SCORE_GATES - 1,
            device,
            dtype,
        )?;
        let clean_accuracy = accuracy(&clean, &truth);
        let versions = self.version_names();
        let total = self.manifest.jobs.len();
        let mut per_eps = Vec::new();
        let mut done = 0;
        for &eps in &self.manifest.config.eps {
            let mut verdict = Verdict::new(truth.len(), &versions)?;
            for job in self.manifest.jobs.iter().filter(|j| j.eps == eps) {
                let path = self.dir.join(job.file());
                let (meta, shape, pixels) = read_job(&path)?;
                let s = &self.clean.shape;
                if meta.job != *job || shape != [truth.len(), s.channels, s.height, s.width] {
                    return Err(BlackboxError::Invalid {
                        path,
                        message: format!(
                            "does not hold job {} of the manifest (shape {shape:?})",
                            job.version.name
                        ),
                    });
                }
                let predicted = self.predict(
                    target,
                    &pixels,
                    batch_size,
                    &seeds,
                    SCORE_GATES + job.index as u64,
                    device,
                    dtype,
                )?;
                let correct: Vec<bool> =
                    predicted.iter().zip(&truth).map(|(p, y)| p == y).collect();
                verdict.record(&job.version.name, &correct)?;
                done += 1;
                progress(done, total);
            }
            per_eps.push(EpsilonResult {
                eps,
                robustness: verdict.finish()?,
            });
        }
        Ok(WhiteBoxReport {
            clean_accuracy,
            per_eps,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn predict(
        &self,
        target: &Target<'_>,
        pixels: &[f32],
        batch_size: usize,
        seeds: &Seeds,
        gates: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Vec<usize>, BlackboxError> {
        let per_image = self.clean.shape.len();
        let n = pixels.len() / per_image;
        let mut rng = seeds.stream(Stream::Gates, gates);
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(batch_size.max(1)) {
            let end = (start + batch_size.max(1)).min(n);
            let x = Tensor::from_vec(
                pixels[start * per_image..end * per_image].to_vec(),
                (
                    end - start,
                    self.clean.shape.channels,
                    self.clean.shape.height,
                    self.clean.shape.width,
                ),
                device,
            )?
            .to_dtype(dtype)?;
            out.extend(target.predict(&x, &mut rng)?);
        }
        Ok(out)
    }
}

fn accuracy(predicted: &[usize], truth: &[usize]) -> f64 {
    predicted.iter().zip(truth).filter(|(p, y)| p == y).count() as f64 / truth.len().max(1) as f64
}

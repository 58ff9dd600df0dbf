//! The transferability matrix of DVERGE's figure (Yang et al. 2020, `eval/eval_transferability.py`):
//! how often a PGD example made on one member of an ensemble fools another member, and the
//! whole ensemble.
//!
//! The protocol, as DVERGE's script runs it (defaults from its `arguments.py`
//! `transf_eval_args` and the script body):
//!
//! 1. **Sources** are the ensemble's N members (for an RGN: N chosen paths, each a fixed-path
//!    network in eval mode, [`random_paths`]).
//! 2. **Images**: the test images that *every* member classifies correctly
//!    ([`all_correct`]); of those, a seeded random subset of `images` = 1000
//!    ([`choose_subset`], `Stream::EvalSubset` split [`SUBSET_STREAM_INDEX`] = 1, so it never
//!    coincides with the white-box evaluation subset, split 0).
//! 3. For each source i and each restart r < `restarts` = 5: L-inf PGD on member i alone
//!    (eval-mode BN, its plain logits, cross-entropy, ε = 0.03, 50 steps of ε/5, a uniform
//!    random start in the ε ball, clamped to [0, 1]; [`TransferSettings::attack`]).
//! 4. Each adversarial batch is classified by every member j and by the whole ensemble (the
//!    log of the mean softmax, DVERGE's `Ensemble`): column j < N is member j, column N is
//!    the ensemble ([`Column`]).
//! 5. All-or-nothing over restarts: an image counts as correct for (i, j) only if it is
//!    correct under every restart; entry (i, j) is the **attack success rate**, the share of
//!    images *not* correctly classified ([`TransferRecorder::finish`], through
//!    [`crate::verdict::Verdict`]). The result is an N x (N + 1) matrix ([`TransferMatrix`]).
//!
//! Random starts: the start of source i, restart r, on image batch b (images
//! `b·batch_size .. (b+1)·batch_size` of the subset) comes from `Stream::AttackStart` split
//! [`start_stream_index`]`(i, r, b)` = 2^63 + b·2^40 + i·2^20 + r. Bit 63 set and bit 62 clear
//! keep these splits apart from the white-box evaluation's (`e·2^32 + k·2^16 + r`, plus
//! `b·2^48`) and from the sanity check's `u64::MAX`. A restart's start does not depend on how
//! many restarts are run, so adding restarts only adds versions (success never drops), and the
//! matrix does not depend on how an engine groups restarts or sources into passes. It does
//! depend on `batch_size` (as DVERGE's depends on its loader's batches under
//! `torch.manual_seed(rs)`).
//!
//! Departures from DVERGE's script, none of which changes what is measured: its random
//! starts come from `torch.manual_seed(restart)` per restart (ours from the seeded streams
//! above, so two engines agree); its loss is the batch *sum* of cross-entropies (ours the
//! mean; the sign step is the same); its subset is drawn by Python's `random.seed(0)` (ours
//! by the run's seed).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::attack::AttackSettings;
use crate::config::AttackLoss;
use crate::gates::{Path, PathError, PathSpace};
use crate::rng::{sample, Seeds, Stream};
use crate::verdict::{Verdict, VerdictError};

/// The split of `Stream::EvalSubset` that draws the transfer subset (the white-box evaluation
/// subset is split 0).
pub const SUBSET_STREAM_INDEX: u64 = 1;

/// The split of `Stream::Gates` that draws an RGN's source paths ([`random_paths`]): 2^62 − 2,
/// next to the derivation's 2^62 − 1 and below the validation paths' 2^62 + epoch, far from
/// the training iterations and the evaluation splits.
pub const PATHS_STREAM_INDEX: u64 = (1 << 62) - 2;

/// Bit 63 of every random-start split of the matrix ([`start_stream_index`]).
pub const START_STREAM_TAG: u64 = 1 << 63;

/// Sources (and so members) a matrix can have: the source field of a split is 20 bits.
pub const MAX_SOURCES: usize = 1 << 20;
/// Restarts a matrix can have: the restart field of a split is 20 bits.
pub const MAX_RESTARTS: usize = 1 << 20;
/// Image batches a matrix can have: the batch field of a split is 22 bits (bit 62 stays clear).
pub const MAX_BATCHES: usize = 1 << 22;

/// The name of the last column (and the CSV header's): the whole ensemble.
pub const ENSEMBLE_COLUMN: &str = "ensemble";

/// The `Stream::AttackStart` split of the random start of source `source`, restart `restart`,
/// image batch `batch`: 2^63 + batch·2^40 + source·2^20 + restart.
///
/// # Panics
/// If `source` ≥ [`MAX_SOURCES`], `restart` ≥ [`MAX_RESTARTS`] or `batch` ≥ [`MAX_BATCHES`]
/// ([`TransferRecorder::new`] refuses such a matrix first).
pub fn start_stream_index(source: usize, restart: usize, batch: usize) -> u64 {
    assert!(
        source < MAX_SOURCES && restart < MAX_RESTARTS && batch < MAX_BATCHES,
        "transfer-matrix split out of range: source {source}, restart {restart}, batch {batch}"
    );
    START_STREAM_TAG | ((batch as u64) << 40) | ((source as u64) << 20) | restart as u64
}

/// Mistakes in setting up or assembling a transfer matrix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransferError {
    /// A setting out of range.
    #[error("transfer matrix: {field} {message}")]
    BadSetting {
        field: &'static str,
        message: String,
    },
    /// A matrix needs two sources to say anything about transfer.
    #[error(
        "a transfer matrix needs at least 2 sources (ensemble members or RGN paths), got {got}"
    )]
    TooFewSources { got: usize },
    /// More sources, restarts or batches than the random-start splits can name.
    #[error("transfer matrix too large for its random-start splits: {what} {got} (at most {max})")]
    TooLarge {
        what: &'static str,
        got: usize,
        max: usize,
    },
    /// No test image is classified correctly by every source.
    #[error(
        "no test image (of {pool}) is classified correctly by every source: nothing to attack"
    )]
    NoCandidates { pool: usize },
    /// More distinct paths asked for than the RGN has.
    #[error("{asked} distinct paths asked for, but the RGN has only {available}")]
    TooManyPaths { asked: usize, available: u128 },
    /// The RGN's path space is malformed.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A record outside the matrix.
    #[error("transfer matrix: {what} {got} out of range (there are {count})")]
    OutOfRange {
        what: &'static str,
        got: usize,
        count: usize,
    },
    /// A result recorded twice.
    #[error("transfer matrix: source {source_index}, {column}, restart {restart}, image {image} recorded twice")]
    Duplicate {
        source_index: usize,
        column: Column,
        restart: usize,
        image: usize,
    },
    /// A result never recorded: an image cannot count either way without it.
    #[error("transfer matrix: source {source_index}, {column}, restart {restart}, image {image} has no result")]
    Missing {
        source_index: usize,
        column: Column,
        restart: usize,
        image: usize,
    },
    /// Labels that do not fit the matrix.
    #[error("transfer matrix: {got} labels for {expected} sources")]
    Labels { got: usize, expected: usize },
    /// The all-or-nothing verdict could not be formed.
    #[error(transparent)]
    Verdict(#[from] VerdictError),
}

/// The protocol's settings. Defaults: DVERGE's `transf_eval_args` (`--subset-num 1000`,
/// `--random-start 5`, `--steps 50`), its script's ε list `[0.03]` and step ε/5, and its
/// `data_args` batch size 128.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSettings {
    /// L-inf radius in [0, 1] pixel units. Default 0.03.
    pub eps: f64,
    /// PGD steps. Default 50.
    pub steps: usize,
    /// Step size as a fraction of ε. Default 0.2 (ε/5).
    pub step_fraction: f64,
    /// Random restarts per source; an image resists only if it resists all. Default 5.
    pub restarts: usize,
    /// Images in the seeded subset of the all-correct test images. Default 1000.
    pub images: usize,
    /// Images per attack batch (the random starts are split by batch). Default 128.
    pub batch_size: usize,
}

impl Default for TransferSettings {
    fn default() -> Self {
        TransferSettings {
            eps: 0.03,
            steps: 50,
            step_fraction: 0.2,
            restarts: 5,
            images: 1000,
            batch_size: 128,
        }
    }
}

impl TransferSettings {
    /// Checks every field.
    ///
    /// # Errors
    /// [`TransferError::BadSetting`] naming the field, or [`TransferError::TooLarge`].
    pub fn validate(&self) -> Result<(), TransferError> {
        let bad =
            |field: &'static str, message: String| TransferError::BadSetting { field, message };
        if !(self.eps.is_finite() && (0.0..=1.0).contains(&self.eps)) {
            return Err(bad("eps", format!("{} is not in [0, 1]", self.eps)));
        }
        if !(self.step_fraction.is_finite() && self.step_fraction >= 0.0) {
            return Err(bad(
                "step_fraction",
                format!("{} is not a finite number >= 0", self.step_fraction),
            ));
        }
        if self.restarts == 0 {
            return Err(bad("restarts", "must be at least 1".into()));
        }
        if self.restarts > MAX_RESTARTS {
            return Err(TransferError::TooLarge {
                what: "restarts",
                got: self.restarts,
                max: MAX_RESTARTS,
            });
        }
        if self.images == 0 {
            return Err(bad("images", "must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be at least 1".into()));
        }
        Ok(())
    }

    /// The PGD run of every (source, restart): CE, ε, `steps` steps of ε·`step_fraction`,
    /// uniform random start; no momentum, input diversity or SGM.
    pub fn attack(&self) -> AttackSettings {
        AttackSettings {
            eps: self.eps,
            step_size: self.eps * self.step_fraction,
            steps: self.steps,
            random_start: true,
            loss: AttackLoss::Ce,
            // Not read by cross-entropy.
            cw_kappa: 0.0,
            momentum: None,
            input_diversity: None,
            skip_gradient: None,
        }
    }

    /// The image batches of `images` images: `(batch index, first image, image count)`.
    pub fn batches(&self, images: usize) -> Vec<(usize, usize, usize)> {
        let size = self.batch_size.max(1);
        (0..images.div_ceil(size))
            .map(|b| (b, b * size, size.min(images - b * size)))
            .collect()
    }
}

/// Per image: correct for every source (`per_source[i][k]`: source i classifies image k
/// correctly). Sources of different lengths are compared over the shortest.
pub fn all_correct(per_source: &[Vec<bool>]) -> Vec<bool> {
    let n = per_source.iter().map(Vec::len).min().unwrap_or(0);
    (0..n).map(|k| per_source.iter().all(|c| c[k])).collect()
}

/// The test images of the matrix: `n` of the indices where `all_correct` is true, drawn from
/// `Stream::EvalSubset` split [`SUBSET_STREAM_INDEX`] (the same partial Fisher-Yates as the
/// evaluation subset, over the all-correct indices), ascending; all of them when there are no
/// more than `n`.
pub fn choose_subset(all_correct: &[bool], n: usize, seeds: &Seeds) -> Vec<usize> {
    let pool: Vec<usize> = all_correct
        .iter()
        .enumerate()
        .filter_map(|(k, &c)| c.then_some(k))
        .collect();
    if n >= pool.len() {
        return pool;
    }
    let mut rng = seeds.stream(Stream::EvalSubset, SUBSET_STREAM_INDEX);
    let mut chosen: Vec<usize> = sample(pool.len(), n, &mut rng)
        .into_iter()
        .map(|i| pool[i])
        .collect();
    chosen.sort_unstable();
    chosen
}

/// `k` distinct paths of `space`, in draw order: Eq. 1 draws from `Stream::Gates` split
/// [`PATHS_STREAM_INDEX`], a path already drawn skipped.
///
/// # Errors
/// [`TransferError::TooManyPaths`] when the RGN has fewer than `k` paths.
pub fn random_paths(
    space: &PathSpace,
    k: usize,
    seeds: &Seeds,
) -> Result<Vec<Path>, TransferError> {
    let available = space.count().unwrap_or(u128::MAX);
    if k as u128 > available {
        return Err(TransferError::TooManyPaths {
            asked: k,
            available,
        });
    }
    let mut rng = seeds.stream(Stream::Gates, PATHS_STREAM_INDEX);
    let mut paths: Vec<Path> = Vec::with_capacity(k);
    while paths.len() < k {
        let path = space.sample(&mut rng);
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    Ok(paths)
}

/// A column of the matrix: one member, or the whole ensemble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Column {
    /// Member j (the same numbering as the sources).
    Member(usize),
    /// The ensemble of every member (log of the mean softmax).
    Ensemble,
}

impl fmt::Display for Column {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Column::Member(j) => write!(f, "target member {j}"),
            Column::Ensemble => write!(f, "target ensemble"),
        }
    }
}

/// Collects, per (source, column, restart), which images stayed correctly classified, and
/// then applies the all-or-nothing rule. Every cell must be recorded exactly once.
#[derive(Debug, Clone)]
pub struct TransferRecorder {
    sources: usize,
    images: usize,
    restarts: usize,
    /// `[source][column][restart][image]`, flattened.
    cells: Vec<Option<bool>>,
}

impl TransferRecorder {
    /// A recorder for `sources` sources (N x (N + 1) cells), `images` images and `restarts`
    /// restarts of `batch_size` images per batch.
    ///
    /// # Errors
    /// Fewer than 2 sources, no images, no restarts, or more sources, restarts or batches than
    /// [`start_stream_index`] can split.
    pub fn new(
        sources: usize,
        images: usize,
        restarts: usize,
        batch_size: usize,
    ) -> Result<Self, TransferError> {
        if sources < 2 {
            return Err(TransferError::TooFewSources { got: sources });
        }
        let too_large = |what, got, max| TransferError::TooLarge { what, got, max };
        if sources > MAX_SOURCES {
            return Err(too_large("sources", sources, MAX_SOURCES));
        }
        if restarts > MAX_RESTARTS {
            return Err(too_large("restarts", restarts, MAX_RESTARTS));
        }
        if restarts == 0 {
            return Err(TransferError::BadSetting {
                field: "restarts",
                message: "must be at least 1".into(),
            });
        }
        if images == 0 {
            return Err(TransferError::NoCandidates { pool: 0 });
        }
        let batches = images.div_ceil(batch_size.max(1));
        if batches > MAX_BATCHES {
            return Err(too_large("image batches", batches, MAX_BATCHES));
        }
        Ok(TransferRecorder {
            sources,
            images,
            restarts,
            cells: vec![None; sources * (sources + 1) * restarts * images],
        })
    }

    fn column_index(&self, column: Column) -> Result<usize, TransferError> {
        match column {
            Column::Member(j) if j < self.sources => Ok(j),
            Column::Member(j) => Err(TransferError::OutOfRange {
                what: "target member",
                got: j,
                count: self.sources,
            }),
            Column::Ensemble => Ok(self.sources),
        }
    }

    fn offset(&self, source: usize, column: usize, restart: usize) -> usize {
        ((source * (self.sources + 1) + column) * self.restarts + restart) * self.images
    }

    /// Records that under restart `restart` of source `source`'s attack, `column` classified
    /// images `first_image ..` correctly where `correct` is true.
    ///
    /// # Errors
    /// A source, member, restart or image out of range, or a cell recorded before.
    pub fn record(
        &mut self,
        source: usize,
        column: Column,
        restart: usize,
        first_image: usize,
        correct: &[bool],
    ) -> Result<(), TransferError> {
        let out = |what, got, count| TransferError::OutOfRange { what, got, count };
        if source >= self.sources {
            return Err(out("source", source, self.sources));
        }
        if restart >= self.restarts {
            return Err(out("restart", restart, self.restarts));
        }
        if first_image + correct.len() > self.images {
            return Err(out("image", first_image + correct.len() - 1, self.images));
        }
        let c = self.column_index(column)?;
        let base = self.offset(source, c, restart) + first_image;
        for (k, &ok) in correct.iter().enumerate() {
            let cell = &mut self.cells[base + k];
            if cell.is_some() {
                return Err(TransferError::Duplicate {
                    source_index: source,
                    column,
                    restart,
                    image: first_image + k,
                });
            }
            *cell = Some(ok);
        }
        Ok(())
    }

    /// The matrix, all-or-nothing over restarts (sources labelled `0`, `1`, …, as DVERGE
    /// prints them; see [`TransferMatrix::with_labels`]).
    ///
    /// # Errors
    /// [`TransferError::Missing`] for the first cell never recorded.
    pub fn finish(&self) -> Result<TransferMatrix, TransferError> {
        let versions: Vec<String> = (0..self.restarts).map(restart_version).collect();
        let n = self.sources;
        let mut fooled = vec![vec![0; n + 1]; n];
        let mut success = vec![vec![0.0; n + 1]; n];
        let mut per_restart = vec![vec![Vec::new(); n + 1]; n];
        let mut robust = vec![vec![Vec::new(); n + 1]; n];
        for s in 0..n {
            for c in 0..=n {
                let column = if c == n {
                    Column::Ensemble
                } else {
                    Column::Member(c)
                };
                let mut verdict = Verdict::new(self.images, &versions)?;
                for (r, version) in versions.iter().enumerate() {
                    let base = self.offset(s, c, r);
                    let correct = self.cells[base..base + self.images]
                        .iter()
                        .enumerate()
                        .map(|(image, cell)| {
                            cell.ok_or(TransferError::Missing {
                                source_index: s,
                                column,
                                restart: r,
                                image,
                            })
                        })
                        .collect::<Result<Vec<bool>, _>>()?;
                    let wrong = correct.iter().filter(|&&ok| !ok).count();
                    per_restart[s][c].push(wrong as f64 / self.images as f64);
                    verdict.record(version, &correct)?;
                }
                let result = verdict.finish()?;
                fooled[s][c] = self.images - result.robust_count;
                success[s][c] = fooled[s][c] as f64 / self.images as f64;
                robust[s][c] = result.robust;
            }
        }
        let sources: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let mut targets = sources.clone();
        targets.push(ENSEMBLE_COLUMN.into());
        Ok(TransferMatrix {
            sources,
            targets,
            images: self.images,
            restarts: self.restarts,
            fooled,
            success,
            per_restart,
            robust,
        })
    }
}

/// The version name of restart `r` in the matrix's verdicts: `r<r>`.
fn restart_version(r: usize) -> String {
    format!("r{r}")
}

/// The N x (N + 1) transferability matrix: rows are sources (the member attacked), columns the
/// members classifying the result and, last, the ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferMatrix {
    /// Row labels, one per source.
    pub sources: Vec<String>,
    /// Column labels: the sources' labels, then [`ENSEMBLE_COLUMN`].
    pub targets: Vec<String>,
    /// Images attacked (the subset).
    pub images: usize,
    /// Restarts per source.
    pub restarts: usize,
    /// `[source][column]`: images misclassified under at least one restart.
    pub fooled: Vec<Vec<usize>>,
    /// `[source][column]`: the attack success rate, `fooled / images`.
    pub success: Vec<Vec<f64>>,
    /// `[source][column][restart]`: the success rate of that restart alone.
    pub per_restart: Vec<Vec<Vec<f64>>>,
    /// `[source][column][image]`: correct under every restart (not written to JSON).
    #[serde(skip)]
    pub robust: Vec<Vec<Vec<bool>>>,
}

impl TransferMatrix {
    /// The same matrix with row labels `labels` (columns follow, then the ensemble).
    ///
    /// # Errors
    /// [`TransferError::Labels`] when there is not one label per source.
    pub fn with_labels(mut self, labels: Vec<String>) -> Result<Self, TransferError> {
        if labels.len() != self.sources.len() {
            return Err(TransferError::Labels {
                got: labels.len(),
                expected: self.sources.len(),
            });
        }
        self.targets = labels.clone();
        self.targets.push(ENSEMBLE_COLUMN.into());
        self.sources = labels;
        Ok(self)
    }

    /// CSV: a header `source,<target labels…>,ensemble`, then one row per source with its
    /// success rates as fractions (4 decimals).
    pub fn csv(&self) -> String {
        let mut out = String::from("source");
        for t in &self.targets {
            out.push(',');
            out.push_str(&csv_field(t));
        }
        out.push('\n');
        for (label, row) in self.sources.iter().zip(&self.success) {
            out.push_str(&csv_field(label));
            for v in row {
                out.push_str(&format!(",{v:.4}"));
            }
            out.push('\n');
        }
        out
    }
}

/// A Markdown table: rows sources, columns targets and the ensemble, success rates in percent.
impl fmt::Display for TransferMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "| source \\ target |")?;
        for t in &self.targets {
            write!(f, " {t} |")?;
        }
        write!(f, "\n|---|{}", "---|".repeat(self.targets.len()))?;
        for (label, row) in self.sources.iter().zip(&self.success) {
            write!(f, "\n| {label} |")?;
            for v in row {
                write!(f, " {:.1} % |", 100.0 * v)?;
            }
        }
        Ok(())
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_dverges() {
        let s = TransferSettings::default();
        assert_eq!((s.eps, s.steps, s.restarts, s.images), (0.03, 50, 5, 1000));
        let a = s.attack();
        assert!((a.step_size - 0.006).abs() < 1e-15);
        assert!(a.random_start && a.loss == AttackLoss::Ce && a.momentum.is_none());
        assert!(s.validate().is_ok());
        for (bad, field) in [
            (
                TransferSettings {
                    eps: -0.1,
                    ..s.clone()
                },
                "eps",
            ),
            (
                TransferSettings {
                    restarts: 0,
                    ..s.clone()
                },
                "restarts",
            ),
            (
                TransferSettings {
                    images: 0,
                    ..s.clone()
                },
                "images",
            ),
            (
                TransferSettings {
                    batch_size: 0,
                    ..s.clone()
                },
                "batch_size",
            ),
        ] {
            match bad.validate() {
                Err(TransferError::BadSetting { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let settings: TransferSettings = serde_json::from_str(r#"{"eps": 0.05}"#).unwrap();
        assert_eq!(settings.eps, 0.05);
        assert_eq!(settings.steps, 50);
    }

    #[test]
    fn batches_cover_the_images_once() {
        let s = TransferSettings {
            batch_size: 4,
            ..TransferSettings::default()
        };
        assert_eq!(s.batches(10), vec![(0, 0, 4), (1, 4, 4), (2, 8, 2)]);
        assert_eq!(s.batches(8), vec![(0, 0, 4), (1, 4, 4)]);
        assert!(s.batches(0).is_empty());
    }

    #[test]
    fn start_splits_are_distinct_and_apart_from_white_box() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..3 {
            for i in 0..3 {
                for r in 0..3 {
                    let index = start_stream_index(i, r, b);
                    assert!(seen.insert(index));
                    assert_eq!(index >> 62, 0b10);
                    // The white-box splits (small e, k, r, b) never set bit 63.
                    assert_ne!(
                        index,
                        crate::attack::stream_index(b, i, r) | ((b as u64) << 48)
                    );
                }
            }
        }
        assert_eq!(start_stream_index(0, 0, 0), 1 << 63);
        assert_eq!(
            start_stream_index(MAX_SOURCES - 1, MAX_RESTARTS - 1, MAX_BATCHES - 1),
            u64::MAX >> 2 | (1 << 63)
        );
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn start_split_refuses_overflow() {
        start_stream_index(MAX_SOURCES, 0, 0);
    }

    #[test]
    fn subset_is_drawn_from_the_all_correct_images_only() {
        let seeds = Seeds::new(4);
        let correct = all_correct(&[
            (0..100).map(|k| k % 2 == 0).collect(),
            (0..100).map(|k| k % 3 != 1).collect(),
        ]);
        assert_eq!(correct.len(), 100);
        let pool: Vec<usize> = (0..100).filter(|k| k % 2 == 0 && k % 3 != 1).collect();
        let subset = choose_subset(&correct, 10, &seeds);
        assert_eq!(subset.len(), 10);
        assert!(
            subset.windows(2).all(|w| w[0] < w[1]),
            "ascending, distinct"
        );
        assert!(subset.iter().all(|k| pool.contains(k)));
        assert_eq!(subset, choose_subset(&correct, 10, &seeds), "seeded");
        assert_ne!(subset, choose_subset(&correct, 10, &Seeds::new(5)));
        // Not the evaluation subset's split: the same pool with split 0 draws other images.
        let mut rng0 = seeds.stream(Stream::EvalSubset, 0);
        let mut split0: Vec<usize> = sample(pool.len(), 10, &mut rng0)
            .into_iter()
            .map(|i| pool[i])
            .collect();
        split0.sort_unstable();
        assert_ne!(subset, split0);
        // Asking for more than there are: all of them, in order.
        assert_eq!(choose_subset(&correct, 1000, &seeds), pool);
        assert!(choose_subset(&[false, false], 3, &seeds).is_empty());
    }

    #[test]
    fn random_paths_are_distinct_and_seeded() {
        let space = PathSpace::new(2, 3).unwrap();
        let seeds = Seeds::new(0);
        let paths = random_paths(&space, 8, &seeds).unwrap();
        let mut unique = paths.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 8, "all 2^3 paths, each once");
        assert_eq!(random_paths(&space, 3, &seeds).unwrap(), paths[..3]);
        assert_eq!(
            random_paths(&space, 9, &seeds).unwrap_err(),
            TransferError::TooManyPaths {
                asked: 9,
                available: 8
            }
        );
    }

    /// A 2-source, 3-image, 2-restart matrix recorded by hand.
    fn hand_recorded() -> TransferRecorder {
        let mut rec = TransferRecorder::new(2, 3, 2, 2).unwrap();
        let columns = [Column::Member(0), Column::Member(1), Column::Ensemble];
        for s in 0..2 {
            for column in columns {
                for r in 0..2 {
                    // Source 0 fools member 1 on image 2 in restart 1 only, and the
                    // ensemble on image 0 in both restarts; source 1 fools nothing.
                    let mut c = [true, true, true];
                    if s == 0 && column == Column::Member(1) && r == 1 {
                        c[2] = false;
                    }
                    if s == 0 && column == Column::Ensemble {
                        c[0] = false;
                    }
                    // In two batches, as an engine records them.
                    rec.record(s, column, r, 0, &c[..2]).unwrap();
                    rec.record(s, column, r, 2, &c[2..]).unwrap();
                }
            }
        }
        rec
    }

    #[test]
    fn an_image_counts_as_resisted_only_under_every_restart() {
        let m = hand_recorded().finish().unwrap();
        assert_eq!(m.fooled, vec![vec![0, 1, 1], vec![0, 0, 0]]);
        assert_eq!(m.success[0][1], 1.0 / 3.0);
        assert_eq!(m.per_restart[0][1], vec![0.0, 1.0 / 3.0]);
        assert_eq!(m.per_restart[0][2], vec![1.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(m.robust[0][1], vec![true, true, false]);
        assert_eq!(m.targets, ["0", "1", "ensemble"]);
        // Restarts only add: the all-or-nothing rate is at least every restart's own.
        for (row, restarts) in m.success.iter().zip(&m.per_restart) {
            for (v, per) in row.iter().zip(restarts) {
                assert!(per.iter().all(|p| p <= v));
            }
        }
    }

    #[test]
    fn recorder_refuses_missing_duplicate_and_stray_records() {
        let mut rec = TransferRecorder::new(2, 3, 1, 3).unwrap();
        rec.record(0, Column::Member(0), 0, 0, &[true, true, true])
            .unwrap();
        assert!(matches!(
            rec.record(0, Column::Member(0), 0, 2, &[true]),
            Err(TransferError::Duplicate { image: 2, .. })
        ));
        assert!(matches!(
            rec.record(0, Column::Member(2), 0, 0, &[true]),
            Err(TransferError::OutOfRange {
                what: "target member",
                ..
            })
        ));
        assert!(matches!(
            rec.record(2, Column::Ensemble, 0, 0, &[true]),
            Err(TransferError::OutOfRange { what: "source", .. })
        ));
        assert!(matches!(
            rec.record(0, Column::Ensemble, 1, 0, &[true]),
            Err(TransferError::OutOfRange {
                what: "restart",
                ..
            })
        ));
        assert!(matches!(
            rec.record(0, Column::Ensemble, 0, 2, &[true, true]),
            Err(TransferError::OutOfRange { what: "image", .. })
        ));
        assert_eq!(
            rec.finish().unwrap_err(),
            TransferError::Missing {
                source_index: 0,
                column: Column::Member(1),
                restart: 0,
                image: 0
            }
        );
        assert_eq!(
            TransferRecorder::new(1, 3, 1, 3).unwrap_err(),
            TransferError::TooFewSources { got: 1 }
        );
        assert!(matches!(
            TransferRecorder::new(2, 0, 1, 3),
            Err(TransferError::NoCandidates { .. })
        ));
        assert!(matches!(
            TransferRecorder::new(2, MAX_BATCHES + 1, 1, 1),
            Err(TransferError::TooLarge { .. })
        ));
    }

    #[test]
    fn table_csv_and_json() {
        let m = hand_recorded()
            .finish()
            .unwrap()
            .with_labels(vec!["a".into(), "b,c".into()])
            .unwrap();
        assert_eq!(m.targets, ["a", "b,c", "ensemble"]);
        assert_eq!(
            m.csv(),
            "source,a,\"b,c\",ensemble\na,0.0000,0.3333,0.3333\n\"b,c\",0.0000,0.0000,0.0000\n"
        );
        assert_eq!(
            m.to_string(),
            "| source \\ target | a | b,c | ensemble |\n|---|---|---|---|\n\
             | a | 0.0 % | 33.3 % | 33.3 % |\n| b,c | 0.0 % | 0.0 % | 0.0 % |"
        );
        let json = serde_json::to_string(&m).unwrap();
        assert!(!json.contains("robust"));
        let back: TransferMatrix = serde_json::from_str(&json).unwrap();
        assert_eq!(back.success, m.success);
        assert_eq!(back.fooled, m.fooled);
        assert!(matches!(
            m.with_labels(vec!["x".into()]),
            Err(TransferError::Labels {
                got: 1,
                expected: 2
            })
        ));
    }
}

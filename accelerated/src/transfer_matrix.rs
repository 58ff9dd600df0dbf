//! The transferability matrix of DVERGE's figure on the device: the protocol, defaults, random
//! streams and all-or-nothing rule of `eio_spec::transfer_matrix`, the same matrix as the
//! readable `eio_reference::transfer_matrix` (equal in f64: `tests/tests/f64_transfer_matrix.rs`).
//!
//! What is fast here: the restarts of one (source, batch) run as one stacked PGD pass
//! (`restarts x batch` images, at most [`MAX_STACKED_IMAGES`] at once), each restart's slice
//! starting from its own seeded draw (`Stream::AttackStart` split
//! `start_stream_index(source, restart, batch)`), so the result does not depend on the
//! grouping; every member's logits on an adversarial pass are computed once and serve both
//! its own column and the ensemble's (the log of the mean softmax); the clean pass that finds
//! the images every member gets right runs its batches concurrently on the kernels' pool.
//!
//! Stacking restarts changes one thing against the reference: the batch-mean cross-entropy
//! divides by `restarts x batch` instead of `batch`, which scales every input gradient by the
//! same positive factor and so leaves its sign (and the PGD step) unchanged, up to rounding of
//! components that are zero to within it.

use std::path::{Path as FsPath, PathBuf};

use candle_core::{DType, Device, Tensor};
use eio_data::Images;
use eio_spec::config::AttackLoss;
use eio_spec::rng::{uniform_start, Seeds, Stream};
use eio_spec::transfer_matrix::{
    all_correct, choose_subset, start_stream_index, Column, TransferRecorder,
};
use serde::Serialize;

use crate::attack::{first_argmax, Member, Target, ENSEMBLE_PROB_FLOOR};
use crate::checkpoint::write_atomically;
use crate::distill::project;
use crate::model::eval_logits;
use crate::ops;
use crate::EngineError;

pub use eio_spec::transfer_matrix::{TransferError, TransferMatrix, TransferSettings};

/// The most images one stacked PGD pass holds (`restarts x batch`): the default 5 restarts of
/// a 500-image batch run as one pass; larger products are split into groups of restarts.
pub const MAX_STACKED_IMAGES: usize = 2500;

/// The matrix file names, written beside `eval.json` ([`TransferReport::write`]).
pub const CSV_FILE: &str = "transfer-matrix.csv";
/// See [`CSV_FILE`].
pub const JSON_FILE: &str = "transfer-matrix.json";

/// Errors of the transfer matrix.
#[derive(Debug, thiserror::Error)]
pub enum TransferMatrixError {
    /// The protocol refused its inputs (too few sources, no all-correct image, settings).
    #[error(transparent)]
    Protocol(#[from] TransferError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serialise the transfer matrix: {0}")]
    Serialise(String),
}

impl From<candle_core::Error> for TransferMatrixError {
    fn from(e: candle_core::Error) -> Self {
        TransferMatrixError::Engine(EngineError::Candle(e))
    }
}

/// Which of `predicted` equal `truth`.
fn correct(predicted: &[usize], truth: &[usize]) -> Vec<bool> {
    predicted.iter().zip(truth).map(|(p, y)| p == y).collect()
}

/// `images` on the device in `dtype` (pixels in [0, 1], `byte / 255`), with u32 labels.
fn upload(images: &Images, device: &Device, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
    crate::train::range_tensors(images, 0..images.len(), device, dtype)
}

/// Per member: which images of `images` it classifies correctly, clean (eval-mode BN), in
/// batches of `batch_size`, as many at a time as rayon's pool has threads
/// ([`crate::train::batches_in_parallel`]).
///
/// # Errors
/// A device error.
pub fn member_correct(
    members: &[Member<'_>],
    images: &Images,
    batch_size: usize,
    device: &Device,
    dtype: DType,
) -> Result<Vec<Vec<bool>>, TransferMatrixError> {
    let n = images.len();
    let size = batch_size.max(1);
    let mut out: Vec<Vec<bool>> = vec![Vec::with_capacity(n); members.len()];
    crate::train::batches_in_parallel(
        n.div_ceil(size),
        rayon::current_num_threads(),
        |b| -> candle_core::Result<Vec<Vec<bool>>> {
            let range = b * size..((b + 1) * size).min(n);
            let (x, _) = crate::train::range_tensors(images, range.clone(), device, dtype)?;
            let truth: Vec<usize> = images.labels[range].iter().map(|&y| y as usize).collect();
            members
                .iter()
                .map(|m| {
                    let z = eval_logits(m.plan, m.state, m.path, &x)?;
                    Ok(correct(&first_argmax(&z)?, &truth))
                })
                .collect()
        },
        |_, per_member| {
            for (all, batch) in out.iter_mut().zip(per_member) {
                all.extend(batch);
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// The N x (N + 1) matrix of `members` on `x` (`[n, C, H, W]`, the chosen subset) with
/// `labels` (`[n]`, u32): `eio_reference::transfer_matrix::transfer_matrix` with restarts
/// stacked (module docs). `progress(done, total)` after each (batch, source).
///
/// # Errors
/// Invalid settings, fewer than 2 members, no images, a matrix too large for its splits, or a
/// device error.
pub fn transfer_matrix(
    members: &[Member<'_>],
    x: &Tensor,
    labels: &Tensor,
    settings: &TransferSettings,
    seeds: &Seeds,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TransferMatrix, TransferMatrixError> {
    settings.validate()?;
    let n = x.dim(0)?;
    let mut recorder =
        TransferRecorder::new(members.len(), n, settings.restarts, settings.batch_size)?;
    let attack = settings.attack();
    let truth: Vec<usize> = labels
        .to_vec1::<u32>()?
        .into_iter()
        .map(|y| y as usize)
        .collect();
    let batches = settings.batches(n);
    let total = batches.len() * members.len();
    let mut done = 0;
    for &(b, first, count) in &batches {
        let xb = x.narrow(0, first, count)?;
        let yb = labels.narrow(0, first, count)?;
        let tb = &truth[first..first + count];
        let group = (MAX_STACKED_IMAGES / count).clamp(1, settings.restarts);
        for (i, source) in members.iter().enumerate() {
            let target = Target::of_members(vec![*source]);
            let restarts: Vec<usize> = (0..settings.restarts).collect();
            for rs in restarts.chunks(group) {
                let g = rs.len();
                let x_rep = Tensor::cat(&vec![xb.clone(); g], 0)?;
                let y_rep = Tensor::cat(&vec![yb.clone(); g], 0)?;
                // Each restart's slice from its own stream, as the reference draws it.
                let mut noise = Vec::with_capacity(xb.elem_count() * g);
                for &r in rs {
                    let mut rng = seeds.stream(Stream::AttackStart, start_stream_index(i, r, b));
                    noise.extend(uniform_start(xb.elem_count(), attack.eps, &mut rng));
                }
                let noise = Tensor::from_vec(noise, x_rep.dims(), x_rep.device())?
                    .to_dtype(x_rep.dtype())?;
                let mut adv = (&x_rep + noise)?.clamp(0.0, 1.0)?;
                // A fixed-path target draws nothing from its generator.
                let mut unread = seeds.stream(Stream::Gates, 0);
                for _ in 0..attack.steps {
                    let (_, grad) = target.loss_and_input_grad(
                        &adv,
                        &y_rep,
                        AttackLoss::Ce,
                        attack.cw_kappa,
                        None,
                        &mut unread,
                    )?;
                    adv = project(
                        &(adv + (ops::sign(&grad)? * attack.step_size)?)?,
                        &x_rep,
                        attack.eps,
                    )?;
                }
                let zs = members
                    .iter()
                    .map(|m| eval_logits(m.plan, m.state, m.path, &adv))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let mut columns = Vec::with_capacity(members.len() + 1);
                for (j, z) in zs.iter().enumerate() {
                    columns.push((Column::Member(j), first_argmax(z)?));
                }
                let ensemble = ops::log_mean_softmax(&zs, ENSEMBLE_PROB_FLOOR)?;
                columns.push((Column::Ensemble, first_argmax(&ensemble)?));
                for (column, predicted) in columns {
                    for (k, &r) in rs.iter().enumerate() {
                        let slice = &predicted[k * count..(k + 1) * count];
                        recorder.record(i, column, r, first, &correct(slice, tb))?;
                    }
                }
            }
            done += 1;
            progress(done, total);
        }
    }
    Ok(recorder.finish()?)
}

/// One source of a matrix as the report names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceInfo {
    /// The row and column label.
    pub label: String,
    /// The model file it comes from.
    pub model: String,
    /// The member of that file (0 for an RGN path or a single network).
    pub member: usize,
    /// The gate vector it runs (all zeros for a plain network).
    pub path: String,
}

/// `transfer-matrix.json`: the protocol, where the images came from, and the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    pub settings: TransferSettings,
    /// The master seed of the subset and the random starts.
    pub seed: u64,
    pub sources: Vec<SourceInfo>,
    /// Test images examined for the all-correct pool.
    pub pool: usize,
    /// Of those, how many every source classifies correctly.
    pub all_correct: usize,
    /// Test-set indices of the images attacked, ascending.
    pub subset: Vec<usize>,
    pub matrix: TransferMatrix,
}

/// The whole protocol on the test set `test`: the images every source classifies correctly,
/// the seeded subset of `settings.images` of them
/// (`eio_spec::transfer_matrix::choose_subset`), and [`transfer_matrix`] on it, labelled by
/// `sources`. `progress` as [`transfer_matrix`]'s.
///
/// # Errors
/// As [`transfer_matrix`]; [`TransferError::NoCandidates`] when no test image is correct for
/// every source; [`TransferError::Labels`] unless there is one `SourceInfo` per member.
#[allow(clippy::too_many_arguments)]
pub fn run(
    members: &[Member<'_>],
    sources: Vec<SourceInfo>,
    test: &Images,
    settings: &TransferSettings,
    seeds: &Seeds,
    device: &Device,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TransferReport, TransferMatrixError> {
    settings.validate()?;
    if members.len() < 2 {
        return Err(TransferError::TooFewSources { got: members.len() }.into());
    }
    if sources.len() != members.len() {
        return Err(TransferError::Labels {
            got: sources.len(),
            expected: members.len(),
        }
        .into());
    }
    let everyone = all_correct(&member_correct(
        members,
        test,
        settings.batch_size,
        device,
        dtype,
    )?);
    let subset = choose_subset(&everyone, settings.images, seeds);
    if subset.is_empty() {
        return Err(TransferError::NoCandidates { pool: test.len() }.into());
    }
    let (x, y) = upload(&test.subset(&subset), device, dtype)?;
    let matrix = transfer_matrix(members, &x, &y, settings, seeds, progress)?
        .with_labels(sources.iter().map(|s| s.label.clone()).collect())?;
    Ok(TransferReport {
        settings: settings.clone(),
        seed: seeds.master(),
        sources,
        pool: test.len(),
        all_correct: everyone.iter().filter(|&&c| c).count(),
        subset,
        matrix,
    })
}

impl TransferReport {
    /// Writes [`JSON_FILE`] (this report) and [`CSV_FILE`] (the matrix) into `dir`, each
    /// atomically; returns their paths.
    ///
    /// # Errors
    /// [`TransferMatrixError::Write`] naming the file.
    pub fn write(&self, dir: &FsPath) -> Result<(PathBuf, PathBuf), TransferMatrixError> {
        let err = |path: &FsPath| {
            let path = path.to_path_buf();
            move |source| TransferMatrixError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let json = dir.join(JSON_FILE);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TransferMatrixError::Serialise(e.to_string()))?;
        write_atomically(&json, text.as_bytes()).map_err(err(&json))?;
        let csv = dir.join(CSV_FILE);
        write_atomically(&csv, self.matrix.csv().as_bytes()).map_err(err(&csv))?;
        Ok((json, csv))
    }
}

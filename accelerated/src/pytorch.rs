//! `eio import` / `eio export`: PyTorch checkpoints in and out, through `eio-interop`.
//!
//! Import reads the authors' released RGN or a DVERGE-style ResNet state dict
//! (`eio_interop::read_state_dict_file`), maps it onto the plan of a config
//! (`eio_interop::import_state_dict`: every shape checked, every missing and unexpected key
//! reported, shared conv copies verified identical) and stores an eio checkpoint of a finished
//! network. Export writes a checkpoint's model back under PyTorch names: one path as DVERGE's
//! ResNet, or the whole RGN under the authors' keys.

use std::collections::BTreeMap;
use std::path::Path as FsPath;

use candle_core::{DType, Device};
use eio_interop::{
    export_authors, export_dverge, import_state_dict, read_state_dict_file, ExportOptions,
    ImportOptions, Imported, NormalizerPolicy,
};
use eio_spec::config::Config;
use eio_spec::Path;

use crate::checkpoint::{Checkpoint, ModelKind, Phase, Progress};
use crate::state::ModelState;

/// Errors of import and export.
#[derive(Debug, thiserror::Error)]
pub enum PytorchError {
    #[error(transparent)]
    Interop(#[from] eio_interop::InteropError),
    #[error(transparent)]
    Engine(#[from] crate::EngineError),
    #[error("cannot build the model of the config")]
    Plan(#[from] eio_spec::plan::PlanError),
    #[error("{0}")]
    Usage(String),
}

/// What an import found.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub layout: String,
    pub tensors: usize,
    /// File keys deliberately skipped (the authors' gate parameters).
    pub ignored: Vec<String>,
    pub normalizer_from_file: bool,
}

/// Imports `file` as a finished network of `config`'s model (its sharing mode, n, depth and
/// normaliser; with `normalizer_from_file`, `model.mean` / `model.std` are taken from the
/// file instead of checked against it).
///
/// # Errors
/// Unreadable or malformed files, keys or shapes that do not fit, differing shared conv
/// copies, a normaliser mismatch: each named.
pub fn import(
    file: &FsPath,
    config: &Config,
    normalizer_from_file: bool,
    device: &Device,
    dtype: DType,
) -> Result<(Checkpoint, ImportSummary), PytorchError> {
    let dict = read_state_dict_file(file)?;
    let plan = config.plan()?;
    let options = ImportOptions {
        layout: None,
        normalizer: if normalizer_from_file {
            NormalizerPolicy::FromFile
        } else {
            NormalizerPolicy::Check
        },
    };
    let Imported {
        values,
        layout,
        normalizer,
        ignored,
        ..
    } = import_state_dict(&dict, &plan, &options)?;
    let mut config = config.clone();
    if normalizer_from_file {
        config.model.mean = normalizer.mean.clone();
        config.model.std = normalizer.std.clone();
        config.validate().map_err(|e| {
            PytorchError::Usage(format!("the file's normaliser is not a valid config: {e}"))
        })?;
    }
    let tensors = values.len();
    let state = ModelState::from_values(&plan, values.into_iter().collect(), device, dtype)?;
    let checkpoint = Checkpoint::new(
        &config,
        ModelKind::Network,
        vec![state],
        Vec::new(),
        Progress::start(Phase::Done),
        dtype,
    );
    Ok((
        checkpoint,
        ImportSummary {
            layout: layout.to_string(),
            tensors,
            ignored,
            normalizer_from_file,
        },
    ))
}

/// Safetensors bytes of `checkpoint`'s model under PyTorch names: with `path` (or for a plain
/// or derived network, whose only path is all zeros), that path as DVERGE's ResNet
/// (`eio_interop::export_dverge`); with `authors`, the whole RGN under the authors' keys.
///
/// # Errors
/// A checkpoint of several models, an RGN with neither `path` nor `authors`, or an export
/// error.
pub fn export(
    checkpoint: &Checkpoint,
    path: Option<&Path>,
    authors: bool,
) -> Result<Vec<u8>, PytorchError> {
    if checkpoint.members.len() != 1 {
        return Err(PytorchError::Usage(format!(
            "the checkpoint holds {} models; export one at a time",
            checkpoint.members.len()
        )));
    }
    let plan = checkpoint.plan()?;
    let values: BTreeMap<String, Vec<f64>> = checkpoint.members[0].to_values()?;
    let options = ExportOptions::default();
    if authors {
        return Ok(export_authors(&values, &plan, &options)?);
    }
    let gates = match path {
        Some(p) => p.clone(),
        None if checkpoint.meta.config.model.n == 1 => Checkpoint::plain_path(&plan),
        None => {
            return Err(PytorchError::Usage(
                "the checkpoint is an RGN: choose --path <gates> (DVERGE's ResNet holds one path) or --authors (the whole RGN)".into(),
            ))
        }
    };
    let choices: Vec<usize> = gates.choices().iter().map(|&c| c as usize).collect();
    Ok(export_dverge(&values, &plan, &choices, &options)?)
}

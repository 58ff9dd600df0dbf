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
    export_authors, export_dverge, import_members, read_state_dict_file, ExportOptions,
    ImportOptions, Imported, NormalizerPolicy, StateDict,
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
/// file instead of checked against it): [`import_models`] of its one state dict.
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
    import_models(&[dict], config, normalizer_from_file, device, dtype)
}

/// Imports state dicts as one finished checkpoint of `config`'s model with one member per
/// dict, in order (DVERGE's ensemble files hold `model_0`, `model_1`, ...; a config for
/// several members has `model.n = 1` and `train.ensemble_size` = their count). With
/// `normalizer_from_file` the members' normalisers must agree, since the config holds one.
///
/// # Errors
/// As [`import`], each error naming the member's key; members whose normalisers differ.
pub fn import_models(
    dicts: &[StateDict],
    config: &Config,
    normalizer_from_file: bool,
    device: &Device,
    dtype: DType,
) -> Result<(Checkpoint, ImportSummary), PytorchError> {
    let plan = config.plan()?;
    let options = ImportOptions {
        layout: None,
        normalizer: if normalizer_from_file {
            NormalizerPolicy::FromFile
        } else {
            NormalizerPolicy::Check
        },
    };
    let imported: Vec<Imported> = import_members(dicts, &plan, &options)?;
    let Some(first) = imported.first() else {
        return Err(PytorchError::Usage("no model to import".into()));
    };
    let mut config = config.clone();
    if normalizer_from_file {
        let key = |d: &StateDict| d.nesting.clone().unwrap_or_else(|| "the top level".into());
        if let Some((d, other)) = dicts
            .iter()
            .zip(&imported)
            .find(|(_, im)| im.normalizer != first.normalizer)
        {
            return Err(PytorchError::Usage(format!(
                "{}'s normaliser (mean {:?}, std {:?}) differs from {}'s (mean {:?}, std {:?}); the config holds one",
                key(d),
                other.normalizer.mean,
                other.normalizer.std,
                key(&dicts[0]),
                first.normalizer.mean,
                first.normalizer.std
            )));
        }
        config.model.mean = first.normalizer.mean.clone();
        config.model.std = first.normalizer.std.clone();
        config.validate().map_err(|e| {
            PytorchError::Usage(format!("the file's normaliser is not a valid config: {e}"))
        })?;
    }
    let layout = first.layout.to_string();
    let tensors = first.values.len();
    let mut ignored: Vec<String> = Vec::new();
    let mut states = Vec::with_capacity(imported.len());
    for im in imported {
        for key in im.ignored {
            if !ignored.contains(&key) {
                ignored.push(key);
            }
        }
        states.push(ModelState::from_values(
            &plan,
            im.values.into_iter().collect(),
            device,
            dtype,
        )?);
    }
    let checkpoint = Checkpoint::new(
        &config,
        ModelKind::Network,
        states,
        Vec::new(),
        Progress::start(Phase::Done),
        dtype,
    );
    Ok((
        checkpoint,
        ImportSummary {
            layout,
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

//! Mapping a PyTorch state dict onto an eio [`Plan`]'s canonical tensor names.
//!
//! See the crate docs for the two key layouts. The plan's names are the authors' checkpoint
//! keys (`eio_spec::plan`), so the authors' layout maps name for name, except that a
//! `shared-conv` plan stores each RGB's conv once (under candidate 0) where the file repeats it
//! per candidate (fact sheet, "Sharing between candidates").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use eio_spec::config::Sharing;
use eio_spec::plan::{Init, Plan};

use crate::torch::{StateDict, TorchTensor};
use crate::{InteropError, KeyMismatch};

/// The key layout of a state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceLayout {
    /// The authors' `EnsembleInOneNets`: `net.model.<m>.candidate_ops.<c>.{0,1}.*`.
    Authors,
    /// DVERGE's plain CIFAR ResNet: `conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ….
    Dverge,
}

impl std::fmt::Display for SourceLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceLayout::Authors => "authors'",
            SourceLayout::Dverge => "DVERGE",
        })
    }
}

/// What to do with a normaliser stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormalizerPolicy {
    /// The file's mean/std must equal the plan's (from `model.mean` / `model.std`) to within
    /// 1e-6 (float32 storage rounding), else [`InteropError::NormalizerMismatch`].
    #[default]
    Check,
    /// Take the file's values without checking; the caller sets `model.mean` / `model.std`
    /// from [`Imported::normalizer`].
    FromFile,
}

/// Import settings.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The key layout; `None` detects it (authors' when any key has `candidate_ops` or starts
    /// with `net.`, else DVERGE).
    pub layout: Option<SourceLayout>,
    pub normalizer: NormalizerPolicy,
}

/// A per-channel normaliser.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalizer {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// Where the imported normaliser came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormalizerSource {
    /// The file's buffers (checked against the config unless [`NormalizerPolicy::FromFile`]).
    File,
    /// The file has none (e.g. DVERGE's bare ResNet); the plan's config values were used.
    Config,
}

/// Whether a file tensor of shape `file` loads into a plan tensor of shape `plan` as PyTorch's
/// `Module.load_state_dict` allows: the same shape, or a 1-element 1-dimensional tensor into a
/// 0-dimensional one (its rule for checkpoints of PyTorch 0.3, and how safetensors conversions
/// store `num_batches_tracked`).
fn loads_into(file: &[usize], plan: &[usize]) -> bool {
    file == plan || (plan.is_empty() && file == [1])
}

/// A file tensor whose shape differs from the plan's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The key in the file.
    pub key: String,
    /// The plan tensor it maps to.
    pub param: String,
    pub file: Vec<usize>,
    pub plan: Vec<usize>,
}

/// A state dict mapped onto a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// Every plan tensor by its canonical name, row-major; a `num_batches_tracked` counter is
    /// one value. Feed to `ModelState::from_values` (accelerated) or build the reference's
    /// `ModelState` from it.
    pub values: BTreeMap<String, Vec<f64>>,
    pub layout: SourceLayout,
    /// The normaliser in `values` (`net.normalizer.{mean,std}`).
    pub normalizer: Normalizer,
    pub normalizer_source: NormalizerSource,
    /// For each plan tensor, the file key(s) it was read from: n keys for a shared conv (the
    /// checked copies), one key otherwise (with the DVERGE layout, the same key feeds every
    /// candidate).
    pub sources: BTreeMap<String, Vec<String>>,
    /// File keys deliberately skipped (the authors' gate parameters `AP_path_alpha`,
    /// `AP_path_wb`).
    pub ignored: Vec<String>,
}

const MEAN: &str = "net.normalizer.mean";
const STD: &str = "net.normalizer.std";
const SHARED_CONV_SUFFIX: &str = ".candidate_ops.0.0.weight";

/// Maps `dict` onto `plan` (see the crate docs for the layouts and checks).
///
/// `plan` is the target: build it with [`Plan::build`] from the `ModelConfig` whose
/// `sharing` (`shared-conv` or `independent`), `n`, `depth` and `mean`/`std` the import should
/// produce; `eio_spec::config::Config::plan` does the same from a whole config.
///
/// # Errors
/// * [`InteropError::Mismatch`]: every missing, unexpected and mis-shaped key, together;
/// * [`InteropError::SharedConvDiffers`]: a shared-conv plan, and the file's conv copies of
///   an RGB are not identical;
/// * [`InteropError::NormalizerMismatch`]: the file's normaliser differs from the plan's;
/// * [`InteropError::UnsupportedPlan`]: the DVERGE layout onto a plan that is not a ResNet
///   with ungated classifier.
pub fn import_state_dict(
    dict: &StateDict,
    plan: &Plan,
    options: &ImportOptions,
) -> Result<Imported, InteropError> {
    // Strip DataParallel prefixes; remember the file's own key for messages.
    let mut by_key: BTreeMap<String, (&str, &TorchTensor)> = BTreeMap::new();
    let mut unexpected: Vec<String> = Vec::new();
    for (name, tensor) in &dict.entries {
        let mut key = name.as_str();
        while let Some(rest) = key.strip_prefix("module.") {
            key = rest;
        }
        if by_key.insert(key.to_string(), (name, tensor)).is_some() {
            unexpected.push(format!("{name} (duplicate after removing \"module.\")"));
        }
    }
    let layout = options.layout.unwrap_or_else(|| {
        if by_key
            .keys()
            .any(|k| k.contains(".candidate_ops.") || k.starts_with("net."))
        {
            SourceLayout::Authors
        } else {
            SourceLayout::Dverge
        }
    });
    let mut ignored = Vec::new();
    // file key (layout-normalised) -> (original name, tensor)
    let mut file: BTreeMap<String, (&str, &TorchTensor)> = BTreeMap::new();
    for (key, entry) in by_key {
        let key = match layout {
            SourceLayout::Authors => {
                if key.contains("AP_path_alpha") || key.contains("AP_path_wb") {
                    ignored.push(entry.0.to_string());
                    continue;
                }
                if key.starts_with("net.") {
                    key
                } else {
                    format!("net.{key}")
                }
            }
            SourceLayout::Dverge => match key.strip_prefix("model.") {
                Some(rest) => rest.to_string(),
                None => key,
            },
        };
        file.insert(key, entry);
    }
    let (mean_key, std_key) = match layout {
        SourceLayout::Authors => (MEAN.to_string(), STD.to_string()),
        SourceLayout::Dverge => ("normalizer.mean".to_string(), "normalizer.std".to_string()),
    };

    // Which file keys feed which plan tensor.
    let mut wanted: Vec<(String, Vec<String>)> = Vec::new();
    for p in &plan.params {
        if p.name == MEAN || p.name == STD {
            continue;
        }
        let keys = match layout {
            SourceLayout::Authors => {
                if plan.sharing == Sharing::SharedConv
                    && p.candidate.is_none()
                    && p.name.ends_with(SHARED_CONV_SUFFIX)
                {
                    let stem = &p.name[..p.name.len() - SHARED_CONV_SUFFIX.len()];
                    (0..plan.n)
                        .map(|c| format!("{stem}.candidate_ops.{c}.0.weight"))
                        .collect()
                } else {
                    vec![p.name.clone()]
                }
            }
            SourceLayout::Dverge => match dverge_name(plan, &p.name) {
                Some(k) => vec![k],
                None => {
                    return Err(InteropError::UnsupportedPlan {
                        layout: layout.to_string(),
                        plan: plan.name.clone(),
                        reason: format!("no DVERGE ResNet tensor corresponds to {}", p.name),
                    })
                }
            },
        };
        wanted.push((p.name.clone(), keys));
    }

    let mut missing: Vec<String> = Vec::new();
    let mut shapes: Vec<ShapeMismatch> = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (param, keys) in &wanted {
        let spec = plan
            .param(param)
            .map(|s| s.shape.clone())
            .unwrap_or_default();
        for key in keys {
            match file.get(key) {
                None => {
                    if !missing.contains(key) {
                        missing.push(key.clone());
                    }
                }
                Some((name, t)) => {
                    used.insert(key.clone());
                    if !loads_into(&t.shape, &spec)
                        && !shapes.iter().any(|s| s.key == *name && s.param == *param)
                    {
                        shapes.push(ShapeMismatch {
                            key: name.to_string(),
                            param: param.clone(),
                            file: t.shape.clone(),
                            plan: spec.clone(),
                        });
                    }
                }
            }
        }
    }
    let channels = plan
        .param(MEAN)
        .map(|p| p.shape.clone())
        .unwrap_or_default();
    let file_mean = file.get(&mean_key).copied();
    let file_std = file.get(&std_key).copied();
    for (key, entry) in [(&mean_key, file_mean), (&std_key, file_std)] {
        if let Some((name, t)) = entry {
            used.insert(key.clone());
            if t.shape != channels {
                shapes.push(ShapeMismatch {
                    key: name.to_string(),
                    param: if key == &mean_key { MEAN } else { STD }.to_string(),
                    file: t.shape.clone(),
                    plan: channels.clone(),
                });
            }
        }
    }
    if file_mean.is_some() != file_std.is_some() {
        missing.push(if file_mean.is_some() {
            std_key.clone()
        } else {
            mean_key.clone()
        });
    }
    for (key, (name, _)) in &file {
        if !used.contains(key) {
            unexpected.push(name.to_string());
        }
    }
    if !missing.is_empty() || !unexpected.is_empty() || !shapes.is_empty() {
        return Err(InteropError::Mismatch(Box::new(KeyMismatch {
            plan: format!("{} (n = {}, {:?})", plan.name, plan.n, plan.sharing),
            layout: layout.to_string(),
            missing,
            unexpected,
            shapes,
        })));
    }

    let mut values = BTreeMap::new();
    let mut sources = BTreeMap::new();
    let mut cache: HashMap<String, Vec<f64>> = HashMap::new();
    for (param, keys) in wanted {
        let mut first: Option<Vec<f64>> = None;
        for key in &keys {
            let data = match cache.get(key) {
                Some(v) => v.clone(),
                None => {
                    let v = file[key].1.to_f64()?;
                    cache.insert(key.clone(), v.clone());
                    v
                }
            };
            match &first {
                None => first = Some(data),
                Some(reference) => {
                    if let Some((index, diff)) = first_difference(reference, &data) {
                        let max_abs_diff = reference
                            .iter()
                            .zip(&data)
                            .map(|(a, b)| (a - b).abs())
                            .fold(diff, f64::max);
                        return Err(InteropError::SharedConvDiffers {
                            first: file[&keys[0]].0.to_string(),
                            other: file[key].0.to_string(),
                            max_abs_diff,
                            index,
                        });
                    }
                }
            }
        }
        let originals = keys.iter().map(|k| file[k].0.to_string()).collect();
        values.insert(param.clone(), first.unwrap_or_default());
        sources.insert(param, originals);
    }

    let config = Normalizer {
        mean: init_values(plan, MEAN),
        std: init_values(plan, STD),
    };
    let (normalizer, normalizer_source) = match (file_mean, file_std) {
        (Some((mn, m)), Some((sn, s))) => {
            let found = Normalizer {
                mean: m.to_f64()?,
                std: s.to_f64()?,
            };
            let close = |a: &[f64], b: &[f64]| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6)
            };
            if options.normalizer == NormalizerPolicy::Check
                && !(close(&found.mean, &config.mean) && close(&found.std, &config.std))
            {
                return Err(InteropError::NormalizerMismatch {
                    file_mean: found.mean,
                    file_std: found.std,
                    config_mean: config.mean,
                    config_std: config.std,
                });
            }
            sources.insert(MEAN.to_string(), vec![mn.to_string()]);
            sources.insert(STD.to_string(), vec![sn.to_string()]);
            (found, NormalizerSource::File)
        }
        _ => (config, NormalizerSource::Config),
    };
    values.insert(MEAN.to_string(), normalizer.mean.clone());
    values.insert(STD.to_string(), normalizer.std.clone());
    Ok(Imported {
        values,
        layout,
        normalizer,
        normalizer_source,
        sources,
        ignored,
    })
}

/// Maps every member of an ensemble file ([`crate::read_models`]) onto `plan`, each exactly
/// as [`import_state_dict`] maps one state dict, in order.
///
/// # Errors
/// The first member that does not import, as [`InteropError::Member`] naming its key (the
/// dict's [`StateDict::nesting`], else `model_<i>`) around [`import_state_dict`]'s error.
pub fn import_members(
    dicts: &[StateDict],
    plan: &Plan,
    options: &ImportOptions,
) -> Result<Vec<Imported>, InteropError> {
    dicts
        .iter()
        .enumerate()
        .map(|(i, dict)| {
            import_state_dict(dict, plan, options).map_err(|error| InteropError::Member {
                key: dict.nesting.clone().unwrap_or_else(|| format!("model_{i}")),
                error: Box::new(error),
            })
        })
        .collect()
}

/// The first index where the two differ (bitwise, so a NaN equals itself), and |a - b| there.
fn first_difference(a: &[f64], b: &[f64]) -> Option<(usize, f64)> {
    if a.len() != b.len() {
        return Some((a.len().min(b.len()), f64::INFINITY));
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, (a[i] - b[i]).abs()))
}

fn init_values(plan: &Plan, name: &str) -> Vec<f64> {
    match plan.param(name).map(|p| &p.init) {
        Some(Init::Values(v)) => v.clone(),
        _ => Vec::new(),
    }
}

/// The DVERGE ResNet name of a plan tensor (any candidate maps to the same name), or `None`
/// for the normaliser and for tensors DVERGE's ResNet does not have.
///
/// `net.model.conv1.candidate_ops.<c>.0.weight` -> `conv1.weight`,
/// `net.model.conv1.candidate_ops.<c>.1.<x>` -> `bn1.<x>`,
/// `net.model.layerS.B.convK.candidate_ops.<c>.0.weight` -> `layerS.B.convK.weight`,
/// `net.model.layerS.B.convK.candidate_ops.<c>.1.<x>` -> `layerS.B.bnK.<x>`,
/// `net.model.layerS.B.downsample.*` -> `layerS.B.downsample.*`, `net.model.fc.*` -> `fc.*`.
pub(crate) fn dverge_name(plan: &Plan, name: &str) -> Option<String> {
    if !plan.name.starts_with("resnet") {
        return None;
    }
    let rest = name.strip_prefix("net.model.")?;
    match rest.split_once(".candidate_ops.") {
        None => {
            let ok = rest.starts_with("fc.") || rest.contains(".downsample.");
            ok.then(|| rest.to_string())
        }
        Some((module, tail)) => {
            let (_candidate, tail) = tail.split_once('.')?;
            let (part, field) = tail.split_once('.')?;
            let (prefix, conv) = match module.rsplit_once('.') {
                Some((p, c)) => (format!("{p}."), c),
                None => (String::new(), module),
            };
            let k = conv.strip_prefix("conv")?;
            match part {
                "0" if field == "weight" => Some(format!("{prefix}conv{k}.weight")),
                "1" => Some(format!("{prefix}bn{k}.{field}")),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eio_spec::config::ModelConfig;

    #[test]
    fn dverge_names_follow_models_resnet_py() {
        let plan = Plan::build(&ModelConfig::default()).unwrap();
        let cases = [
            ("net.model.conv1.candidate_ops.1.0.weight", "conv1.weight"),
            (
                "net.model.conv1.candidate_ops.0.1.running_var",
                "bn1.running_var",
            ),
            (
                "net.model.layer2.0.conv2.candidate_ops.1.0.weight",
                "layer2.0.conv2.weight",
            ),
            (
                "net.model.layer3.2.conv1.candidate_ops.0.1.num_batches_tracked",
                "layer3.2.bn1.num_batches_tracked",
            ),
            (
                "net.model.layer2.0.downsample.1.bias",
                "layer2.0.downsample.1.bias",
            ),
            ("net.model.fc.weight", "fc.weight"),
        ];
        for (from, to) in cases {
            assert_eq!(dverge_name(&plan, from).as_deref(), Some(to), "{from}");
        }
        assert_eq!(dverge_name(&plan, "net.normalizer.mean"), None);
        let names: BTreeSet<String> = plan
            .params
            .iter()
            .filter_map(|p| dverge_name(&plan, &p.name))
            .collect();
        // DVERGE's ResNet-20 state dict: 19 convs + 19 BNs x 5 + 2 downsample x 6 + fc x 2.
        assert_eq!(names.len(), 19 + 19 * 5 + 2 * 6 + 2);
    }
}

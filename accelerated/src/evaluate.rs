//! The all-or-nothing evaluation on the device: white-box, with the same versions and random
//! streams as `eio_reference::evaluate` (which documents them), and black-box transfer of
//! PGD examples made on other models; both over a whole image set in batches.

use candle_core::Tensor;
use eio_spec::config::EvalConfig;
use eio_spec::rng::{Seeds, Stream};
use eio_spec::verdict::{Robustness, Verdict};

use crate::attack::{pgd_versions, AttackSettings, Target};
use crate::path_batching::PathBatching;
use crate::EngineError;

/// Accuracy under attack at one ε.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EpsilonResult {
    pub eps: f64,
    pub robustness: Robustness,
}

/// Clean and all-or-nothing white-box accuracy.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WhiteBoxReport {
    pub clean_accuracy: f64,
    pub per_eps: Vec<EpsilonResult>,
}

pub use eio_spec::attack::{stream_index as attack_stream_index, version_name};

/// Runs the evaluation of `config` against `target` on `images` with `labels` (`[N]`, u32).
///
/// # Errors
/// A device error, or a verdict error (a configuration with no version).
pub fn white_box(
    target: &Target<'_>,
    images: &Tensor,
    labels: &Tensor,
    config: &EvalConfig,
    seeds: &Seeds,
) -> Result<WhiteBoxReport, EngineError> {
    adversarial_accuracy(target, target, images, labels, config, seeds, 0)
}

/// Black-box transfer: every version is a PGD attack on `source` (as in [`white_box`]), and
/// `victim` classifies the result; an image is robust only if the victim is right on all.
///
/// # Errors
/// As [`white_box`].
pub fn transfer(
    source: &Target<'_>,
    victim: &Target<'_>,
    images: &Tensor,
    labels: &Tensor,
    config: &EvalConfig,
    seeds: &Seeds,
) -> Result<WhiteBoxReport, EngineError> {
    adversarial_accuracy(source, victim, images, labels, config, seeds, 0)
}

/// The stream index of batch `batch` of an evaluation split into batches: batch 0 uses the
/// unbatched indices of [`attack_stream_index`] (so one batch equals the reference exactly),
/// batch b offsets them by b·2⁴⁸.
pub fn batch_stream_index(index: u64, batch: u64) -> u64 {
    index | (batch << 48)
}

fn adversarial_accuracy(
    source: &Target<'_>,
    victim: &Target<'_>,
    images: &Tensor,
    labels: &Tensor,
    config: &EvalConfig,
    seeds: &Seeds,
    batch: u64,
) -> Result<WhiteBoxReport, EngineError> {
    let truth: Vec<usize> = labels
        .to_vec1::<u32>()?
        .into_iter()
        .map(|y| y as usize)
        .collect();
    let correct = |predicted: Vec<usize>| -> Vec<bool> {
        predicted.iter().zip(&truth).map(|(p, y)| p == y).collect()
    };
    // The clean pass of a randomised target: index u64::MAX (the reference's) for batch 0,
    // u64::MAX − b for batch b.
    let clean_index = u64::MAX - batch;
    let clean = correct(victim.predict(images, &mut seeds.stream(Stream::Gates, clean_index))?);
    let clean_accuracy = clean.iter().filter(|&&c| c).count() as f64 / truth.len().max(1) as f64;
    let versions: Vec<String> = config
        .losses
        .iter()
        .flat_map(|&loss| (0..config.restarts).map(move |r| version_name(loss, r)))
        .collect();
    // Every attack version at every ε, with its random streams; they run in lock-step where
    // the device is faster that way (`PathBatching::for_device`), with the same results.
    let mut attacks = Vec::new();
    let mut runs_of = Vec::new();
    for (e, &eps) in config.eps.iter().enumerate() {
        for (k, &loss) in config.losses.iter().enumerate() {
            for r in 0..config.restarts {
                let index = batch_stream_index(attack_stream_index(e, k, r), batch);
                attacks.push((
                    AttackSettings::white_box(config, eps, loss),
                    seeds.stream(Stream::AttackStart, index),
                ));
                runs_of.push((e, version_name(loss, r), index));
            }
        }
    }
    let mut verdicts = config
        .eps
        .iter()
        .map(|_| Verdict::new(truth.len(), &versions))
        .collect::<Result<Vec<_>, _>>()?;
    let batching = PathBatching::for_device(images.device());
    pgd_versions(
        source,
        (images, labels),
        &mut attacks,
        batching,
        |v, run| -> Result<(), EngineError> {
            let (e, name, index) = &runs_of[v];
            let predicted =
                victim.predict(&run.images, &mut seeds.stream(Stream::Gates, *index))?;
            verdicts[*e].record(name, &correct(predicted))?;
            Ok(())
        },
    )?;
    let per_eps = config
        .eps
        .iter()
        .zip(verdicts)
        .map(|(&eps, verdict)| {
            Ok(EpsilonResult {
                eps,
                robustness: verdict.finish()?,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    Ok(WhiteBoxReport {
        clean_accuracy,
        per_eps,
    })
}

/// [`white_box`] (`source` = `victim`) or [`transfer`] over every image of `images`, in
/// batches of `config.batch_size` (batch b's attacks draw from [`batch_stream_index`]`(·, b)`), with
/// every figure combined over the batches in batch order. As many batches as rayon's pool has
/// threads run at a time ([`crate::train::batches_in_parallel`]), each converted to f32 only
/// when it runs; the figures do not depend on that. `progress` is called after each batch.
///
/// # Errors
/// As [`white_box`].
#[allow(clippy::too_many_arguments)]
pub fn evaluate_images(
    source: &Target<'_>,
    victim: &Target<'_>,
    images: &eio_data::Images,
    config: &EvalConfig,
    seeds: &Seeds,
    device: &candle_core::Device,
    dtype: candle_core::DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<WhiteBoxReport, EngineError> {
    let n = images.len();
    let size = config.batch_size.max(1);
    let batches = n.div_ceil(size);
    let mut clean_correct = 0.0;
    let mut robust: Vec<Vec<bool>> = vec![Vec::with_capacity(n); config.eps.len()];
    let mut per_version: Vec<std::collections::BTreeMap<String, f64>> =
        vec![Default::default(); config.eps.len()];
    let range = |b: usize| b * size..((b + 1) * size).min(n);
    crate::train::batches_in_parallel(
        batches,
        rayon::current_num_threads(),
        |b| {
            let (x, y) = crate::train::range_tensors(images, range(b), device, dtype)?;
            adversarial_accuracy(source, victim, &x, &y, config, seeds, b as u64)
        },
        |b, report| {
            let count = range(b).len() as f64;
            clean_correct += report.clean_accuracy * count;
            for (e, r) in report.per_eps.into_iter().enumerate() {
                robust[e].extend(r.robustness.robust);
                for (name, acc) in r.robustness.per_version {
                    *per_version[e].entry(name).or_default() += acc * count;
                }
            }
            progress(b + 1, batches);
            Ok::<(), EngineError>(())
        },
    )?;
    let total = n.max(1) as f64;
    let per_eps = config
        .eps
        .iter()
        .zip(robust.into_iter().zip(per_version))
        .map(|(&eps, (robust, versions))| {
            let robust_count = robust.iter().filter(|&&r| r).count();
            EpsilonResult {
                eps,
                robustness: Robustness {
                    accuracy: robust_count as f64 / total,
                    robust_count,
                    robust,
                    per_version: versions.into_iter().map(|(k, v)| (k, v / total)).collect(),
                },
            }
        })
        .collect();
    Ok(WhiteBoxReport {
        clean_accuracy: clean_correct / total,
        per_eps,
    })
}

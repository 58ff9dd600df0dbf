//! The white-box all-or-nothing evaluation on the device, with the same versions and random
//! streams as `eio_reference::evaluate` (which documents them).

use candle_core::Tensor;
use eio_spec::config::EvalConfig;
use eio_spec::rng::{Seeds, Stream};
use eio_spec::verdict::{Robustness, Verdict};

use crate::attack::{pgd, AttackSettings, Target};
use crate::EngineError;

/// Accuracy under attack at one ε.
#[derive(Debug, Clone, PartialEq)]
pub struct EpsilonResult {
    pub eps: f64,
    pub robustness: Robustness,
}

/// Clean and all-or-nothing white-box accuracy.
#[derive(Debug, Clone, PartialEq)]
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
    let truth: Vec<usize> = labels
        .to_vec1::<u32>()?
        .into_iter()
        .map(|y| y as usize)
        .collect();
    let correct = |predicted: Vec<usize>| -> Vec<bool> {
        predicted.iter().zip(&truth).map(|(p, y)| p == y).collect()
    };
    let clean = correct(target.predict(images, &mut seeds.stream(Stream::Gates, u64::MAX))?);
    let clean_accuracy = clean.iter().filter(|&&c| c).count() as f64 / truth.len().max(1) as f64;
    let versions: Vec<String> = config
        .losses
        .iter()
        .flat_map(|&loss| (0..config.restarts).map(move |r| version_name(loss, r)))
        .collect();
    let mut per_eps = Vec::with_capacity(config.eps.len());
    for (e, &eps) in config.eps.iter().enumerate() {
        let mut verdict = Verdict::new(truth.len(), &versions)?;
        for (k, &loss) in config.losses.iter().enumerate() {
            for r in 0..config.restarts {
                let settings = AttackSettings::white_box(config, eps, loss);
                let index = attack_stream_index(e, k, r);
                let adv = pgd(
                    target,
                    images,
                    labels,
                    &settings,
                    &mut seeds.stream(Stream::AttackStart, index),
                )?;
                let predicted = target.predict(&adv, &mut seeds.stream(Stream::Gates, index))?;
                verdict.record(&version_name(loss, r), &correct(predicted))?;
            }
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

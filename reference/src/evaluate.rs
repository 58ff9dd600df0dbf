//! The white-box all-or-nothing evaluation of Sec. 4.1.
//!
//! For each ε of `eval.eps`, each loss of `eval.losses` and each restart r < `eval.restarts`,
//! PGD (`eval.steps` steps of ε · `eval.step_fraction`) produces one adversarial version of
//! every image; `eio_spec::verdict::Verdict` counts an image as robust only if every version is
//! classified correctly. Version names are `pgd-<loss>-r<restart>`. The random start of
//! (ε index e, loss index k, restart r) comes from `Stream::AttackStart` split
//! `e·2^32 + k·2^16 + r`, so adding an ε never changes another ε's starts (a randomised
//! target's EOT paths are drawn from the same generator, after the start); the paths with
//! which a randomised target classifies the result come from `Stream::Gates`, split the same
//! way (clean predictions: split `u64::MAX`).

use eio_spec::config::EvalConfig;
use eio_spec::rng::{Seeds, Stream};
use eio_spec::verdict::{Robustness, Verdict, VerdictError};
use ndarray::Array4;

use crate::attack::{pgd, AttackSettings, Target};

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

/// Runs the evaluation of `config` against `target` on `images` (`[N, C, H, W]`) with labels.
///
/// # Errors
/// A [`VerdictError`] if the configuration asks for no version (validated configs never do).
pub fn white_box(
    target: &Target<'_>,
    images: &Array4<f64>,
    labels: &[usize],
    config: &EvalConfig,
    seeds: &Seeds,
) -> Result<WhiteBoxReport, VerdictError> {
    let correct = |predicted: Vec<usize>| -> Vec<bool> {
        predicted.iter().zip(labels).map(|(p, y)| p == y).collect()
    };
    let mut clean_rng = seeds.stream(Stream::Gates, u64::MAX);
    let clean = correct(target.predict(images, &mut clean_rng));
    let clean_accuracy = clean.iter().filter(|&&c| c).count() as f64 / labels.len().max(1) as f64;
    let mut versions = Vec::new();
    for &loss in &config.losses {
        for r in 0..config.restarts {
            versions.push(version_name(loss, r));
        }
    }
    let mut per_eps = Vec::with_capacity(config.eps.len());
    for (e, &eps) in config.eps.iter().enumerate() {
        let mut verdict = Verdict::new(labels.len(), &versions)?;
        for (k, &loss) in config.losses.iter().enumerate() {
            for r in 0..config.restarts {
                let settings = AttackSettings::white_box(config, eps, loss);
                let index = attack_stream_index(e, k, r);
                let mut start_rng = seeds.stream(Stream::AttackStart, index);
                let adv = pgd(target, images, labels, &settings, &mut start_rng);
                let mut gate_rng = seeds.stream(Stream::Gates, index);
                verdict.record(
                    &version_name(loss, r),
                    &correct(target.predict(&adv, &mut gate_rng)),
                )?;
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

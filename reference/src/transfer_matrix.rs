//! The transferability matrix of DVERGE's figure, readable: every source member attacked alone
//! by [`crate::attack::pgd`], restart by restart and batch by batch, and every adversarial
//! batch classified by every member and by the ensemble. The protocol, its defaults, its
//! random streams and the all-or-nothing rule are `eio_spec::transfer_matrix`'s:
//!
//! ```text
//! subset   = choose_subset(all_correct(members' clean predictions), images)
//! for each batch b of the subset, source i, restart r:
//!     x'   = PGD on member i alone (eval BN, CE, ε, steps of ε·step_fraction, random start
//!            from AttackStart split start_stream_index(i, r, b))
//!     record whether member j (every j) and the ensemble classify x' correctly
//! success(i, j) = share of images misclassified under at least one restart
//! ```

use eio_spec::config::BnMode;
use eio_spec::rng::{Seeds, Stream};
use eio_spec::transfer_matrix::{
    all_correct, choose_subset, start_stream_index, Column, TransferError, TransferRecorder,
};
use ndarray::{s, Array4, Axis};

use crate::attack::{pgd, Member, Target};

pub use eio_spec::transfer_matrix::{TransferMatrix, TransferSettings};

/// A member alone: its fixed path with eval-mode BatchNorm.
fn alone<'a>(member: &Member<'a>) -> Target<'a> {
    Target::Path {
        plan: member.plan,
        state: member.state,
        path: member.path,
        mode: BnMode::Eval,
    }
}

/// Whether each prediction equals its label.
fn correct(predicted: &[usize], labels: &[usize]) -> Vec<bool> {
    predicted.iter().zip(labels).map(|(p, y)| p == y).collect()
}

/// The generator handed to fixed targets' `predict`, which draws nothing from it.
fn unread(seeds: &Seeds) -> rand_chacha::ChaCha8Rng {
    seeds.stream(Stream::Gates, 0)
}

/// Per member: which of `images` (with `labels`) it classifies correctly, clean.
pub fn member_correct(
    members: &[Member<'_>],
    images: &Array4<f64>,
    labels: &[usize],
    seeds: &Seeds,
) -> Vec<Vec<bool>> {
    members
        .iter()
        .map(|m| correct(&alone(m).predict(images, &mut unread(seeds)), labels))
        .collect()
}

/// The N x (N + 1) matrix of `members` on `images` (`[n, C, H, W]`, the chosen subset) with
/// `labels`: see the module docs.
///
/// # Errors
/// Invalid settings, fewer than 2 members, no images, or a matrix too large for its splits.
pub fn transfer_matrix(
    members: &[Member<'_>],
    images: &Array4<f64>,
    labels: &[usize],
    settings: &TransferSettings,
    seeds: &Seeds,
) -> Result<TransferMatrix, TransferError> {
    settings.validate()?;
    let n = images.dim().0;
    let mut recorder =
        TransferRecorder::new(members.len(), n, settings.restarts, settings.batch_size)?;
    let attack = settings.attack();
    let targets: Vec<Target<'_>> = members.iter().map(alone).collect();
    let ensemble = Target::Ensemble(members.to_vec());
    for (b, first, count) in settings.batches(n) {
        let x = images
            .slice(s![first..first + count, .., .., ..])
            .to_owned();
        let y = &labels[first..first + count];
        for (i, source) in targets.iter().enumerate() {
            for r in 0..settings.restarts {
                let mut start = seeds.stream(Stream::AttackStart, start_stream_index(i, r, b));
                let adv = pgd(source, &x, y, &attack, &mut start);
                for (j, target) in targets.iter().enumerate() {
                    let predicted = target.predict(&adv, &mut unread(seeds));
                    recorder.record(i, Column::Member(j), r, first, &correct(&predicted, y))?;
                }
                let predicted = ensemble.predict(&adv, &mut unread(seeds));
                recorder.record(i, Column::Ensemble, r, first, &correct(&predicted, y))?;
            }
        }
    }
    recorder.finish()
}

/// The whole protocol on a pool of test images: the images every member classifies correctly,
/// the seeded subset of `settings.images` of them, and the matrix on it.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRun {
    /// Pool indices of the images attacked, ascending.
    pub subset: Vec<usize>,
    /// Pool images that every member classifies correctly.
    pub all_correct: usize,
    pub matrix: TransferMatrix,
}

/// [`transfer_matrix`] on the seeded subset of the images of `pool` (with `labels`) that every
/// member classifies correctly (`eio_spec::transfer_matrix::choose_subset`).
///
/// # Errors
/// As [`transfer_matrix`]; [`TransferError::NoCandidates`] when no image is correct for all.
pub fn transfer_protocol(
    members: &[Member<'_>],
    pool: &Array4<f64>,
    labels: &[usize],
    settings: &TransferSettings,
    seeds: &Seeds,
) -> Result<TransferRun, TransferError> {
    settings.validate()?;
    let everyone = all_correct(&member_correct(members, pool, labels, seeds));
    let subset = choose_subset(&everyone, settings.images, seeds);
    if subset.is_empty() {
        return Err(TransferError::NoCandidates { pool: labels.len() });
    }
    let images = pool.select(Axis(0), &subset);
    let chosen: Vec<usize> = subset.iter().map(|&k| labels[k]).collect();
    let matrix = transfer_matrix(members, &images, &chosen, settings, seeds)?;
    Ok(TransferRun {
        subset,
        all_correct: everyone.iter().filter(|&&c| c).count(),
        matrix,
    })
}

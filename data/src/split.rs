//! Seeded choices of images: the validation hold-out, the `data.train_limit` subset and the
//! fixed evaluation subset.
//!
//! Every choice is a Fisher-Yates shuffle driven by [`below`], whose integers are built from
//! the raw 64-bit output of the spec's ChaCha8 streams by a fixed algorithm (Lemire's
//! multiply-and-reject), so a (seed, data set) pair selects the same images on every platform
//! and with every `rand` release.

use eio_spec::rng::{Seeds, Stream};
use rand::RngCore;

use crate::images::Images;
use crate::DataError;

pub use eio_spec::rng::{below, sample};

/// A uniformly random permutation of `0..n` ([`sample`] of all n).
pub fn permutation<R: RngCore + ?Sized>(n: usize, rng: &mut R) -> Vec<usize> {
    sample(n, n, rng)
}

/// Which training images are held out and which are trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holdout {
    /// Indices of the images trained on, ascending.
    pub train: Vec<usize>,
    /// Indices of the held-out validation images, ascending.
    pub validation: Vec<usize>,
}

/// Splits `n` training images: one permutation from `Stream::Validation` (index 0); its first
/// `validation` entries are held out, and the next `limit` entries (all the rest when `limit`
/// is None or larger) are trained on. Both lists are returned in ascending order, so the
/// images keep their file order. Changing `limit` never changes the validation images.
///
/// # Errors
/// [`DataError::Config`] (`data.validation`) when the hold-out leaves no training image.
pub fn holdout(
    n: usize,
    validation: usize,
    limit: Option<usize>,
    seeds: &Seeds,
) -> Result<Holdout, DataError> {
    if validation >= n {
        return Err(DataError::Config {
            field: "validation",
            message: format!(
                "holding out {validation} of {n} training images leaves none to train on"
            ),
        });
    }
    let keep = limit.map_or(n - validation, |l| l.min(n - validation));
    let mut rng = seeds.stream(Stream::Validation, 0);
    let order = sample(n, validation + keep, &mut rng);
    let mut held = order[..validation].to_vec();
    let mut train = order[validation..].to_vec();
    held.sort_unstable();
    train.sort_unstable();
    Ok(Holdout {
        train,
        validation: held,
    })
}

/// The indices of the fixed evaluation subset: `n` of `len` test images drawn from
/// `Stream::EvalSubset` (index 0), ascending; all of them, in order, when `n >= len`.
pub fn eval_subset_indices(len: usize, n: usize, seeds: &Seeds) -> Vec<usize> {
    if n >= len {
        return (0..len).collect();
    }
    let mut rng = seeds.stream(Stream::EvalSubset, 0);
    let mut chosen = sample(len, n, &mut rng);
    chosen.sort_unstable();
    chosen
}

/// The fixed evaluation subset (paper Sec. 4.1: 1000 test images drawn at random with a fixed
/// seed): `n` images of `test` chosen by [`eval_subset_indices`], in test-file order. `n` comes
/// from `config.eval.images`; `n >= test.len()` means every test image.
pub fn eval_subset(test: &Images, n: usize, seeds: &Seeds) -> Images {
    test.subset(&eval_subset_indices(test.len(), n, seeds))
}

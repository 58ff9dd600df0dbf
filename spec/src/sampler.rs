//! Algorithm 1, line 12: the p paths of one EIO iteration.
//!
//! Paper, Sec. 3.3: "if the distilling layer is set to l, for any P_i, P_j in S, there must be
//! at least one different gate among the top l gates, i.e. ∃k ∈ [1, l], s.t. P_i[k] ≠ P_j[k]".
//! In eio the "top l gates" are the d(l) gates the layer-l feature depends on
//! ([`crate::plan::Layer::depth`]; for ResNet-20, d(l) = min(l, 19)).
//!
//! [`sample_paths`] draws p paths whose d-prefixes are pairwise distinct, uniformly over the
//! ordered p-tuples of distinct prefixes (hence uniformly over the sets of them), with the
//! K - d suffix gates independent and uniform as in Eq. 1. Prefixes are drawn without
//! replacement: the i-th prefix is the r-th prefix not yet taken, r uniform on 0..n^d - i. When
//! n^d does not fit in 128 bits (more than 3·10^38 prefixes), prefixes are drawn digit by digit
//! and a repeat is redrawn; a repeat there has probability below p / 2^128, so the loop cannot
//! spin. Cost: O(p·K + p²) for any n, K and p.
//!
//! When n^d < p there are not p distinct prefixes. [`Infeasible`] says what happens: the
//! authors' code lowers p to n^d for that batch ([`Infeasible::Clip`]; with n = 2 and l = 1 it
//! trains 2 paths), or the sampler refuses ([`Infeasible::Error`]).

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::gates::{index_to_digits, Path, PathSpace};

/// What to do when fewer than p distinct prefixes exist (n^d(l) < p).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Infeasible {
    /// Use all n^d(l) prefixes instead of p (the authors' code).
    Clip,
    /// Return [`SamplerError::TooFewPrefixes`].
    Error,
}

/// The sampler could not satisfy Algorithm 1's constraint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamplerError {
    /// p paths with pairwise distinct d-prefixes do not exist.
    #[error("cannot sample p = {p} paths with distinct prefixes over the first {depth} gates: only n^d = {n}^{depth} = {available} exist (set eio.infeasible = \"clip\" to use them all)")]
    TooFewPrefixes {
        p: usize,
        n: usize,
        depth: usize,
        available: u128,
    },
    /// A depth beyond the network's K gates.
    #[error("dependency depth {depth} exceeds the network's K = {k} gated blocks")]
    DepthBeyondGates { depth: usize, k: usize },
    /// p = 0 paths requested.
    #[error("p = 0 paths requested; an EIO iteration needs p >= 1")]
    NoPaths,
}

/// How many paths [`sample_paths`] returns for `p` requested paths at depth `depth`:
/// `p`, or n^d under [`Infeasible::Clip`] when n^d < p.
///
/// # Errors
/// As [`sample_paths`].
pub fn path_count(
    space: &PathSpace,
    depth: usize,
    p: usize,
    policy: Infeasible,
) -> Result<usize, SamplerError> {
    if p == 0 {
        return Err(SamplerError::NoPaths);
    }
    if depth > space.k() {
        return Err(SamplerError::DepthBeyondGates {
            depth,
            k: space.k(),
        });
    }
    match space.prefix_count(depth) {
        Some(available) if available < p as u128 => match policy {
            Infeasible::Clip => Ok(available as usize),
            Infeasible::Error => Err(SamplerError::TooFewPrefixes {
                p,
                n: space.n(),
                depth,
                available,
            }),
        },
        _ => Ok(p),
    }
}

/// Algorithm 1 line 12: p paths (or fewer, see [`Infeasible`]) with pairwise distinct
/// prefixes over the first `depth` gates.
///
/// # Errors
/// [`SamplerError::NoPaths`] for p = 0, [`SamplerError::DepthBeyondGates`] for depth > K, and
/// [`SamplerError::TooFewPrefixes`] when n^depth < p under [`Infeasible::Error`].
pub fn sample_paths<R: Rng + ?Sized>(
    space: &PathSpace,
    depth: usize,
    p: usize,
    policy: Infeasible,
    rng: &mut R,
) -> Result<Vec<Path>, SamplerError> {
    let count = path_count(space, depth, p, policy)?;
    let prefixes = match space.prefix_count(depth) {
        Some(available) => distinct_indices(available, count, rng)
            .into_iter()
            .map(|index| index_to_digits(index, space.n(), depth))
            .collect(),
        None => distinct_digit_strings(space, depth, count, rng),
    };
    Ok(prefixes
        .into_iter()
        .map(|mut gates: Vec<u8>| {
            gates.extend((depth..space.k()).map(|_| space.uniform_choice(rng)));
            Path::new(gates)
        })
        .collect())
}

/// `count` distinct integers from 0..`available`, in the order drawn; every ordered tuple of
/// distinct values is equally likely. The i-th draw is the r-th value not yet taken, with r
/// uniform on 0..available - i.
fn distinct_indices<R: Rng + ?Sized>(available: u128, count: usize, rng: &mut R) -> Vec<u128> {
    let mut drawn = Vec::with_capacity(count);
    let mut taken_sorted: Vec<u128> = Vec::with_capacity(count);
    for i in 0..count {
        let mut value = rng.random_range(0..available - i as u128);
        for &t in &taken_sorted {
            if t <= value {
                value += 1;
            }
        }
        let at = taken_sorted.partition_point(|&t| t < value);
        taken_sorted.insert(at, value);
        drawn.push(value);
    }
    drawn
}

/// `count` distinct digit strings of length `depth`, for spaces too large for `u128` indices.
/// A repeat (probability below count / 2^128) is redrawn, which keeps the draw exactly uniform.
fn distinct_digit_strings<R: Rng + ?Sized>(
    space: &PathSpace,
    depth: usize,
    count: usize,
    rng: &mut R,
) -> Vec<Vec<u8>> {
    let mut drawn: Vec<Vec<u8>> = Vec::with_capacity(count);
    while drawn.len() < count {
        let candidate: Vec<u8> = (0..depth).map(|_| space.uniform_choice(rng)).collect();
        if !drawn.contains(&candidate) {
            drawn.push(candidate);
        }
    }
    drawn
}

/// The random draws of one EIO iteration (Algorithm 1 lines 11-12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IterationDraw {
    /// The distillation layer l, 1-based.
    pub layer: usize,
    /// The sampled paths, pairwise distinct over the first d(l) gates.
    pub paths: Vec<Path>,
}

/// Algorithm 1 line 11 (and DVERGE's layer draw): l uniform on 1..=L from
/// [`crate::rng::Stream::Layer`], split by iteration (`per-batch`) or by epoch (`per-epoch`).
pub fn draw_layer(
    plan: &crate::plan::Plan,
    schedule: crate::config::LayerSchedule,
    seeds: &crate::rng::Seeds,
    epoch: u64,
    iteration: u64,
) -> usize {
    use crate::config::LayerSchedule;
    use crate::rng::Stream;
    let index = match schedule {
        LayerSchedule::PerBatch => iteration,
        LayerSchedule::PerEpoch => epoch,
    };
    seeds
        .stream(Stream::Layer, index)
        .random_range(1..=plan.l())
}

/// Algorithm 1 lines 11-12 for iteration `iteration` of epoch `epoch`: l from [`draw_layer`]
/// under `eio.layer_schedule`, then [`sample_paths`] at depth d(l) from
/// [`crate::rng::Stream::Paths`] split by iteration. `iteration` counts from the start of
/// training, so every iteration has its own draws.
///
/// # Errors
/// As [`sample_paths`].
pub fn draw_iteration(
    plan: &crate::plan::Plan,
    eio: &crate::config::EioConfig,
    seeds: &crate::rng::Seeds,
    epoch: u64,
    iteration: u64,
) -> Result<IterationDraw, SamplerError> {
    use crate::rng::Stream;
    let layer = draw_layer(plan, eio.layer_schedule, seeds, epoch, iteration);
    let depth = plan.layer(layer).depth;
    let mut rng = seeds.stream(Stream::Paths, iteration);
    let paths = sample_paths(&plan.path_space(), depth, eio.p, eio.infeasible, &mut rng)?;
    Ok(IterationDraw { layer, paths })
}

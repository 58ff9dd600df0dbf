//! The invariants of the Algorithm 1 path sampler, as one checker that the fuzzer
//! (`fuzz/fuzz_targets/path_sampler.rs`), the seeded smoke test and the property tests all run.
//!
//! For a case (n, K, depth d, p, policy, seed), [`check`] asserts:
//! 1. the call fails exactly when it must: p = 0, d > K, or n^d < p under
//!    [`Infeasible::Error`];
//! 2. otherwise it returns p paths, or n^d of them when n^d < p under [`Infeasible::Clip`];
//! 3. every path has K gates and every gate is below n;
//! 4. the d-prefixes are pairwise distinct (Sec. 3.3: "∃k ∈ [1, l], P_i[k] ≠ P_j[k]");
//! 5. the same seed gives the same paths.

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::gates::PathSpace;
use crate::sampler::{path_count, sample_paths, Infeasible, SamplerError};

/// One sampler call to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplerCase {
    /// Candidates per RGB, 1..=36.
    pub n: usize,
    /// Number of RGBs.
    pub k: usize,
    /// Dependency depth d(l) of the distillation layer (may exceed K to test the error).
    pub depth: usize,
    /// Paths requested (0 tests the error).
    pub p: usize,
    /// What to do when n^d < p.
    pub policy: Infeasible,
    /// Seed of the sampler's generator.
    pub seed: u64,
}

impl SamplerCase {
    /// A case decoded from fuzzer bytes: n in 1..=36, K in 0..=255, depth in 0..=K+1,
    /// p in 0..=63. `None` when fewer than 13 bytes are given.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (head, seed) = bytes.split_first_chunk::<5>()?;
        let seed = u64::from_le_bytes(*seed.first_chunk::<8>()?);
        let k = usize::from(head[1]);
        Some(SamplerCase {
            n: usize::from(head[0]) % 36 + 1,
            k,
            depth: usize::from(head[2]) % (k + 2),
            p: usize::from(head[3]) % 64,
            policy: if head[4] & 1 == 0 {
                Infeasible::Clip
            } else {
                Infeasible::Error
            },
            seed,
        })
    }

    /// A random case with n in 1..=8, K in 0..=32, d in 0..=K, p in 1..=16, either policy.
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Self {
        let k = rng.random_range(0..=32);
        SamplerCase {
            n: rng.random_range(1..=8),
            k,
            depth: rng.random_range(0..=k),
            p: rng.random_range(1..=16),
            policy: if rng.random() {
                Infeasible::Clip
            } else {
                Infeasible::Error
            },
            seed: rng.random(),
        }
    }
}

/// Checks every sampler invariant for `case`; the error names the broken one.
///
/// # Errors
/// A description of the first invariant that does not hold.
pub fn check(case: &SamplerCase) -> Result<(), String> {
    let space = PathSpace::new(case.n, case.k).map_err(|e| format!("{case:?}: {e}"))?;
    let draw = || {
        let mut rng = ChaCha8Rng::seed_from_u64(case.seed);
        sample_paths(&space, case.depth, case.p, case.policy, &mut rng)
    };
    let first = draw();
    if first != draw() {
        return Err(format!("{case:?}: the same seed gave different paths"));
    }
    let available = space.prefix_count(case.depth);
    let feasible = available.is_none_or(|a| a >= case.p as u128);
    let expected_count = match (case.p, case.depth > case.k, feasible, case.policy) {
        (0, _, _, _) => None,
        (_, true, _, _) => None,
        (_, false, true, _) => Some(case.p),
        (_, false, false, Infeasible::Clip) => available.map(|a| a as usize),
        (_, false, false, Infeasible::Error) => None,
    };
    let paths = match (first, expected_count) {
        (Ok(paths), Some(count)) if paths.len() == count => paths,
        (Ok(paths), Some(count)) => {
            return Err(format!(
                "{case:?}: {} paths returned, {count} expected",
                paths.len()
            ))
        }
        (Ok(_), None) => return Err(format!("{case:?}: succeeded but must fail")),
        (Err(e), Some(_)) => return Err(format!("{case:?}: failed but must succeed: {e}")),
        (Err(e), None) => return check_error(case, &e, available),
    };
    if path_count(&space, case.depth, case.p, case.policy) != Ok(paths.len()) {
        return Err(format!("{case:?}: path_count disagrees with sample_paths"));
    }
    for path in &paths {
        space
            .check(path)
            .map_err(|e| format!("{case:?}: invalid path: {e}"))?;
    }
    let mut prefixes = HashSet::new();
    for path in &paths {
        if !prefixes.insert(path.prefix(case.depth)) {
            return Err(format!(
                "{case:?}: two paths share the prefix {:?} over the first {} gates",
                path.prefix(case.depth),
                case.depth
            ));
        }
    }
    Ok(())
}

/// The failure must be the one the case calls for.
fn check_error(
    case: &SamplerCase,
    error: &SamplerError,
    available: Option<u128>,
) -> Result<(), String> {
    let right = match error {
        SamplerError::NoPaths => case.p == 0,
        SamplerError::DepthBeyondGates { depth, k } => {
            case.p > 0 && *depth == case.depth && *k == case.k && case.depth > case.k
        }
        SamplerError::TooFewPrefixes {
            p, available: a, ..
        } => {
            *p == case.p
                && Some(*a) == available
                && *a < case.p as u128
                && case.policy == Infeasible::Error
        }
    };
    if right {
        Ok(())
    } else {
        Err(format!("{case:?}: wrong error: {error}"))
    }
}

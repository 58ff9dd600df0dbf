//! Property tests for the Algorithm 1 path sampler (`eio_spec::sampler`): every invariant of
//! `eio_spec::sampler_check::check`, and the same invariants asserted directly here, against
//! expectations computed in this file (n^d by `checked_pow`, distinctness by pairwise
//! comparison as the paper states it).

use std::collections::HashSet;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use eio_spec::gates::{Path, PathSpace};
use eio_spec::sampler::{path_count, sample_paths, Infeasible, SamplerError};
use eio_spec::sampler_check::{check, SamplerCase};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A fixed number of cases, and failures saved next to this file as
/// `sampler_props.proptest-regressions` (committed, replayed first on every run).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

fn policy() -> impl Strategy<Value = Infeasible> {
    prop_oneof![Just(Infeasible::Clip), Just(Infeasible::Error)]
}

/// A valid call: n in 1..=8, K in 0..=32, d in 0..=K, p in 1..=16, either policy.
fn sampler_case() -> impl Strategy<Value = SamplerCase> {
    (1..=8usize, 0..=32usize)
        .prop_flat_map(|(n, k)| {
            (
                Just(n),
                Just(k),
                prop_oneof![0..=k, Just(0), Just(k)],
                1..=16usize,
                policy(),
                any::<u64>(),
            )
        })
        .prop_map(|(n, k, depth, p, policy, seed)| SamplerCase {
            n,
            k,
            depth,
            p,
            policy,
            seed,
        })
}

/// A call that must fail before sampling: p = 0 (any depth in 0..=K+1), or d = K + 1
/// (any p in 0..=16).
fn invalid_case() -> impl Strategy<Value = SamplerCase> {
    (1..=8usize, 0..=32usize, any::<bool>())
        .prop_flat_map(|(n, k, zero_p)| {
            let (depth, p) = if zero_p {
                ((0..=k + 1).boxed(), Just(0usize).boxed())
            } else {
                (Just(k + 1).boxed(), (0..=16usize).boxed())
            };
            (Just(n), Just(k), depth, p, policy(), any::<u64>())
        })
        .prop_map(|(n, k, depth, p, policy, seed)| SamplerCase {
            n,
            k,
            depth,
            p,
            policy,
            seed,
        })
}

/// A valid call with at least 2^40 distinct prefixes: n in 4..=8, d in 20..=K <= 32.
fn many_prefixes_case() -> impl Strategy<Value = SamplerCase> {
    (4..=8usize, 20..=32usize)
        .prop_flat_map(|(n, k)| {
            (
                Just(n),
                Just(k),
                20..=k,
                1..=16usize,
                policy(),
                any::<u64>(),
            )
        })
        .prop_map(|(n, k, depth, p, policy, seed)| SamplerCase {
            n,
            k,
            depth,
            p,
            policy,
            seed,
        })
}

/// Any call in the fuzzer's shape: valid or not, n in 1..=8, d in 0..=K+1, p in 0..=16.
fn any_case() -> impl Strategy<Value = SamplerCase> {
    prop_oneof![3 => sampler_case(), 1 => invalid_case()]
}

/// n^d, computed here.
fn available(n: usize, depth: usize) -> Option<u128> {
    (n as u128).checked_pow(u32::try_from(depth).ok()?)
}

fn draw(case: &SamplerCase) -> Result<Vec<Path>, SamplerError> {
    let space = PathSpace::new(case.n, case.k).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(case.seed);
    sample_paths(&space, case.depth, case.p, case.policy, &mut rng)
}

/// The paper's constraint, literally: for i != j, ∃k < d with P_i[k] != P_j[k].
fn pairwise_distinct_prefixes(paths: &[Path], depth: usize) -> bool {
    paths.iter().enumerate().all(|(i, a)| {
        paths[..i]
            .iter()
            .all(|b| (0..depth).any(|gate| a.choice(gate) != b.choice(gate)))
    })
}

/// Runs `work` on its own thread and returns how long it took; fails if `work` panics or is
/// still running after `limit`, so a sampler that never returns fails the test instead of
/// hanging it.
fn finishes_within(limit: Duration, work: impl FnOnce() + Send + 'static) -> Duration {
    let (done, finished) = mpsc::channel();
    let worker = thread::spawn(move || {
        let start = Instant::now();
        work();
        done.send(start.elapsed()).unwrap();
    });
    match finished.recv_timeout(limit) {
        Ok(elapsed) => elapsed,
        Err(RecvTimeoutError::Timeout) => panic!("did not finish in {limit:?}"),
        Err(RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
    }
}

/// Fuzzer bytes of any length, some shorter than the 13 that `from_bytes` needs.
#[derive(Debug)]
struct Bytes(Vec<u8>);

fn bytes() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=24).prop_map(Bytes)
}

proptest! {
    #![proptest_config(config(1024))]

    /// The shared checker accepts every valid call.
    #[test]
    fn check_holds_for_valid_cases(case in sampler_case()) {
        prop_assert_eq!(check(&case), Ok(()));
    }

    /// The shared checker accepts every call, valid or not (the errors are the right ones).
    #[test]
    fn check_holds_for_any_case(case in any_case()) {
        prop_assert_eq!(check(&case), Ok(()));
    }

    /// Algorithm 1 line 12, asserted directly: the count, length K, every gate below n, the
    /// d-prefixes pairwise distinct, the same paths from the same seed, `path_count` agreeing,
    /// and under `Error` a `TooFewPrefixes` exactly when n^d < p.
    #[test]
    fn paths_meet_algorithm_1(case in sampler_case()) {
        let available = available(case.n, case.depth).unwrap();
        let result = draw(&case);
        prop_assert_eq!(&result, &draw(&case), "same seed, different paths");
        let space = PathSpace::new(case.n, case.k).unwrap();
        let counted = path_count(&space, case.depth, case.p, case.policy);

        if available < case.p as u128 && case.policy == Infeasible::Error {
            let expected = SamplerError::TooFewPrefixes {
                p: case.p,
                n: case.n,
                depth: case.depth,
                available,
            };
            prop_assert_eq!(result, Err(expected.clone()));
            prop_assert_eq!(counted, Err(expected));
            return Ok(());
        }
        let paths = result.unwrap();
        let expected = if available < case.p as u128 { available as usize } else { case.p };
        prop_assert_eq!(paths.len(), expected);
        prop_assert_eq!(counted, Ok(expected));
        for path in &paths {
            prop_assert_eq!(path.len(), case.k);
            prop_assert!(path.choices().iter().all(|&c| usize::from(c) < case.n), "{}", path);
        }
        prop_assert!(pairwise_distinct_prefixes(&paths, case.depth), "{:?}", paths);
        let prefixes: HashSet<&[u8]> = paths.iter().map(|p| p.prefix(case.depth)).collect();
        prop_assert_eq!(prefixes.len(), paths.len());
        if available < case.p as u128 {
            // Clip: every one of the n^d prefixes, each exactly once.
            let all: HashSet<Vec<u8>> = (0..available)
                .map(|i| space_digits(i, case.n, case.depth))
                .collect();
            let got: HashSet<Vec<u8>> = prefixes.into_iter().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(got, all);
        }
    }

    /// The policy only matters when n^d < p: otherwise both give the very same paths.
    #[test]
    fn policy_is_irrelevant_when_feasible(case in sampler_case()) {
        let feasible = available(case.n, case.depth).unwrap() >= case.p as u128;
        let clip = draw(&SamplerCase { policy: Infeasible::Clip, ..case.clone() });
        let error = draw(&SamplerCase { policy: Infeasible::Error, ..case.clone() });
        prop_assert!(clip.is_ok(), "Clip never fails for p >= 1, d <= K: {:?}", clip);
        prop_assert_eq!(error.is_err(), !feasible);
        if feasible {
            prop_assert_eq!(clip, error);
        }
    }

    /// p = 0 is `NoPaths`; d > K (with p >= 1) is `DepthBeyondGates`; `path_count` agrees.
    #[test]
    fn invalid_calls_fail_with_the_right_error(case in invalid_case()) {
        let expected = if case.p == 0 {
            SamplerError::NoPaths
        } else {
            SamplerError::DepthBeyondGates { depth: case.depth, k: case.k }
        };
        prop_assert_eq!(draw(&case), Err(expected.clone()));
        let space = PathSpace::new(case.n, case.k).unwrap();
        prop_assert_eq!(path_count(&space, case.depth, case.p, case.policy), Err(expected));
    }

    /// When there are at least 4^20 = 2^40 prefixes, two different seeds give different paths
    /// (a chance collision has probability at most 2^-40 per case).
    #[test]
    fn different_seeds_give_different_paths(
        case in many_prefixes_case(),
        other_seed in any::<u64>(),
    ) {
        prop_assert!(available(case.n, case.depth).unwrap() >= 1 << 40);
        prop_assume!(other_seed != case.seed);
        let other = SamplerCase { seed: other_seed, ..case.clone() };
        prop_assert_ne!(draw(&case).unwrap(), draw(&other).unwrap());
    }

    /// `SamplerCase::from_bytes` decodes within its documented ranges, or gives `None` below
    /// 13 bytes.
    #[test]
    fn from_bytes_decodes_within_its_ranges(bytes in bytes()) {
        let bytes = bytes.0;
        let Some(case) = SamplerCase::from_bytes(&bytes) else {
            prop_assert!(bytes.len() < 13);
            return Ok(());
        };
        prop_assert!(bytes.len() >= 13);
        prop_assert!((1..=36).contains(&case.n));
        prop_assert_eq!(case.k, usize::from(bytes[1]));
        prop_assert!(case.depth <= case.k + 1);
        prop_assert!(case.p <= 63);
        prop_assert_eq!(case.seed, u64::from_le_bytes(bytes[5..13].try_into().unwrap()));
        prop_assert_eq!(check(&case), Ok(()));
    }
}

/// The base-`n` digits of `index`, `len` of them, most significant first.
fn space_digits(mut index: u128, n: usize, len: usize) -> Vec<u8> {
    let mut digits = vec![0; len];
    for d in digits.iter_mut().rev() {
        *d = (index % n as u128) as u8;
        index /= n as u128;
    }
    digits
}

/// Many paths exist (2^19 prefixes, p = 3): 20 seeds give 20 different draws.
#[test]
fn seeds_change_the_draw() {
    let draws: HashSet<Vec<Path>> = (0..20)
        .map(|seed| {
            draw(&SamplerCase {
                n: 2,
                k: 19,
                depth: 19,
                p: 3,
                policy: Infeasible::Error,
                seed,
            })
            .unwrap()
        })
        .collect();
    assert_eq!(draws.len(), 20, "20 seeds gave only {} draws", draws.len());

    // Few outputs (n = 2, K = 2, d = 1, p = 1: 4 paths): 64 seeds reach all of them, so both
    // the prefix gate and the suffix gate depend on the seed.
    let reached: HashSet<Vec<Path>> = (0..64)
        .map(|seed| {
            draw(&SamplerCase {
                n: 2,
                k: 2,
                depth: 1,
                p: 1,
                policy: Infeasible::Error,
                seed,
            })
            .unwrap()
        })
        .collect();
    assert_eq!(reached.len(), 4, "{reached:?}");
}

/// Seeded fuzz smoke: 10,000 `SamplerCase::random` cases and 10,000 cases decoded from random
/// bytes (n up to 36, K up to 255, p up to 63) all pass `check`; inputs too short to decode
/// give `None`. A sampler that never returns fails after 120 s. The decoded cases must
/// include every error kind and the digit-string fallback, so this test is not vacuous.
#[test]
fn seeded_fuzz_smoke() {
    finishes_within(Duration::from_secs(120), || {
        let mut rng = ChaCha8Rng::seed_from_u64(0xe10_f022);
        for _ in 0..10_000 {
            let case = SamplerCase::random(&mut rng);
            assert!((1..=8).contains(&case.n) && case.k <= 32 && case.depth <= case.k);
            assert!((1..=16).contains(&case.p));
            if let Err(violation) = check(&case) {
                panic!("{violation}");
            }
        }

        let (mut decoded, mut short) = (0, 0);
        let (mut no_paths, mut too_deep, mut too_few, mut fallback) = (0, 0, 0, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(0xb17e5);
        while decoded < 10_000 {
            // Mostly long enough; 1 in 8 shorter than the 13 bytes a case needs.
            let len = if rng.random_ratio(1, 8) {
                rng.random_range(0..13)
            } else {
                rng.random_range(13..=24)
            };
            let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let Some(case) = SamplerCase::from_bytes(&bytes) else {
                assert!(len < 13, "{len} bytes were not decoded");
                short += 1;
                continue;
            };
            assert!(len >= 13, "{len} bytes were decoded");
            decoded += 1;
            if let Err(violation) = check(&case) {
                panic!("{violation}");
            }
            match available(case.n, case.depth) {
                _ if case.p == 0 => no_paths += 1,
                _ if case.depth > case.k => too_deep += 1,
                None => fallback += 1,
                Some(a) if a < case.p as u128 && case.policy == Infeasible::Error => too_few += 1,
                Some(_) => {}
            }
        }
        assert!(short > 0, "no input was too short to decode");
        for (what, count) in [
            ("p = 0", no_paths),
            ("d > K", too_deep),
            ("n^d < p", too_few),
            ("n^d > u128::MAX", fallback),
        ] {
            assert!(count > 0, "no decoded case with {what}");
        }
    });
}

/// Spaces with more than 2^128 prefixes use the digit-string fallback; they still give valid,
/// distinct, reproducible paths, and quickly. At the boundary (2^127 fits, 2^128 does not)
/// both branches are exercised. The work runs on its own thread so that a sampler that
/// never terminates fails this test (after 60 s).
#[test]
fn huge_spaces_work_and_terminate_quickly() {
    const CASES: [(usize, usize, usize, usize); 8] = [
        (2, 200, 200, 16),
        (2, 200, 130, 63),
        (36, 40, 40, 16),
        (36, 255, 255, 63),
        (2, 128, 128, 16),
        (2, 128, 127, 16),
        (36, 40, 24, 16),
        (36, 40, 25, 16),
    ];
    assert!(
        available(2, 128).is_none() && available(36, 25).is_none(),
        "the fallback must be exercised"
    );
    let elapsed = finishes_within(Duration::from_secs(60), || {
        for (n, k, depth, p) in CASES {
            let space = PathSpace::new(n, k).unwrap();
            assert_eq!(space.prefix_count(depth), available(n, depth));
            for policy in [Infeasible::Clip, Infeasible::Error] {
                for seed in 0..20 {
                    let case = SamplerCase {
                        n,
                        k,
                        depth,
                        p,
                        policy,
                        seed,
                    };
                    if let Err(violation) = check(&case) {
                        panic!("{violation}");
                    }
                    let paths = draw(&case).unwrap();
                    assert_eq!(paths.len(), p);
                    assert!(pairwise_distinct_prefixes(&paths, depth));
                }
            }
        }
    });
    assert!(
        elapsed < Duration::from_secs(5),
        "{} huge-space draws took {elapsed:?}",
        CASES.len() * 2 * 20 * 3
    );
}

/// n = 1 has one prefix at every depth, also past `u32::MAX` gates, so p >= 2 is infeasible
/// there (asked of `path_count` only: such a network cannot be allocated).
#[test]
fn one_candidate_has_one_prefix_at_any_depth() {
    for depth in [0, 5, u32::MAX as usize, u32::MAX as usize + 1, usize::MAX] {
        let space = PathSpace::new(1, depth).unwrap();
        assert_eq!(space.prefix_count(depth), Some(1), "d = {depth}");
        assert_eq!(
            path_count(&space, depth, 2, Infeasible::Error),
            Err(SamplerError::TooFewPrefixes {
                p: 2,
                n: 1,
                depth,
                available: 1,
            }),
            "d = {depth}"
        );
        assert_eq!(path_count(&space, depth, 2, Infeasible::Clip), Ok(1));
        assert_eq!(path_count(&space, depth, 1, Infeasible::Error), Ok(1));
    }
}

/// Known answers at the edges: d = 0 has one (empty) prefix, so p = 1 always works and p > 1
/// clips to 1 or errors; K = 0 gives empty paths.
#[test]
fn depth_zero_has_a_single_prefix() {
    let space = PathSpace::new(4, 3).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let one = sample_paths(&space, 0, 5, Infeasible::Clip, &mut rng).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].len(), 3);
    assert_eq!(
        sample_paths(&space, 0, 5, Infeasible::Error, &mut rng),
        Err(SamplerError::TooFewPrefixes {
            p: 5,
            n: 4,
            depth: 0,
            available: 1
        })
    );
    let empty = PathSpace::new(3, 0).unwrap();
    assert_eq!(
        sample_paths(&empty, 0, 1, Infeasible::Error, &mut rng),
        Ok(vec![Path::new(vec![])])
    );
    assert_eq!(
        sample_paths(&empty, 1, 1, Infeasible::Error, &mut rng),
        Err(SamplerError::DepthBeyondGates { depth: 1, k: 0 })
    );
}

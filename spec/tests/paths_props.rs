//! Property tests for Eq. 1 paths ([`Path`]) and their space ([`PathSpace`]): the text form,
//! its error variants, the integer bijection, its order, the count and uniform sampling.
//!
//! Every expected value (n^K, digit strings, first bad gate) is computed here independently of
//! `eio_spec::gates`, so a wrong implementation cannot agree with itself.

use eio_spec::gates::{PathError, MAX_CANDIDATES};
use eio_spec::{Path, PathSpace};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A fixed number of cases, and failures saved next to this file as
/// `paths_props.proptest-regressions` (committed, replayed first on every run).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// The digit of candidate `c`, written independently of the crate: `0-9` then `a-z`.
fn digit(c: u8) -> char {
    b"0123456789abcdefghijklmnopqrstuvwxyz"[usize::from(c)] as char
}

/// The text form of a list of choices, one digit per gate.
fn text(choices: &[u8]) -> String {
    choices.iter().map(|&c| digit(c)).collect()
}

/// Base-n value of `choices`, RGB 1 most significant.
fn base_n(choices: &[u8], n: usize) -> u128 {
    choices
        .iter()
        .fold(0, |acc, &c| acc * n as u128 + u128::from(c))
}

/// n^K, or `None` above `u128::MAX`, for any K (1^K = 1 however large K is).
fn exact_count(n: usize, k: usize) -> Option<u128> {
    match u32::try_from(k) {
        Ok(k) => (n as u128).checked_pow(k),
        Err(_) if n <= 1 => Some(n as u128),
        Err(_) => None,
    }
}

/// The largest K for which n^K fits in a `u128` (n >= 2).
fn max_k(n: usize) -> usize {
    (0..)
        .take_while(|&k| exact_count(n, k).is_some())
        .last()
        .unwrap()
}

/// A path space with n in 1..=8 and K in 0..=12 (all n^K fit in a `u128`, up to 8^12).
#[derive(Debug, Clone, Copy)]
struct Space {
    n: usize,
    k: usize,
}

impl Space {
    fn space(self) -> PathSpace {
        PathSpace::new(self.n, self.k).unwrap()
    }
}

fn small_space() -> impl Strategy<Value = Space> {
    (1..=8usize, 0..=12usize).prop_map(|(n, k)| Space { n, k })
}

/// A space whose n^K fits in a `u128` but may be close to `u128::MAX`: n in 1..=36, K up to
/// the largest that fits (and up to 200 for n = 1).
fn wide_space() -> impl Strategy<Value = Space> {
    (1..=MAX_CANDIDATES).prop_flat_map(|n| {
        let top = if n == 1 { 200 } else { max_k(n) };
        (Just(n), prop_oneof![0..=top, Just(top)]).prop_map(|(n, k)| Space { n, k })
    })
}

/// A space and one of its paths, as choices.
#[derive(Debug, Clone)]
struct SpaceAndPath {
    space: Space,
    choices: Vec<u8>,
}

fn space_and_path(space: impl Strategy<Value = Space>) -> impl Strategy<Value = SpaceAndPath> {
    space.prop_flat_map(|space| {
        vec(0..space.n as u8, space.k).prop_map(move |choices| SpaceAndPath { space, choices })
    })
}

/// A space and two of its paths.
#[derive(Debug, Clone)]
struct SpaceAndTwoPaths {
    space: Space,
    a: Vec<u8>,
    b: Vec<u8>,
}

fn space_and_two_paths() -> impl Strategy<Value = SpaceAndTwoPaths> {
    small_space().prop_flat_map(|space| {
        let one = || vec(0..space.n as u8, space.k);
        // Half the time b shares a random-length prefix of a, so ties and near-ties occur.
        (one(), one(), 0..=space.k, any::<bool>()).prop_map(move |(a, mut b, shared, tie)| {
            if tie {
                b[..shared].copy_from_slice(&a[..shared]);
            }
            SpaceAndTwoPaths { space, a, b }
        })
    })
}

/// A space and an integer below its count (biased towards both ends).
#[derive(Debug, Clone)]
struct SpaceAndIndex {
    space: Space,
    index: u128,
}

fn space_and_index(space: impl Strategy<Value = Space>) -> impl Strategy<Value = SpaceAndIndex> {
    space.prop_flat_map(|space| {
        let count = exact_count(space.n, space.k).unwrap();
        prop_oneof![0..count, Just(0), Just(count - 1), Just(count / 2),]
            .prop_map(move |index| SpaceAndIndex { space, index })
    })
}

/// Text of valid digits for a space, with a length that differs from K.
#[derive(Debug, Clone)]
struct WrongLength {
    space: Space,
    choices: Vec<u8>,
}

fn wrong_length() -> impl Strategy<Value = WrongLength> {
    small_space().prop_flat_map(|space| {
        (0..=space.k + 3)
            .prop_filter("length must differ from K", move |&len| len != space.k)
            .prop_flat_map(move |len| vec(0..space.n as u8, len))
            .prop_map(move |choices| WrongLength { space, choices })
    })
}

/// A path of the right length with at least one gate at or above n, at `first_bad` and
/// possibly later ones.
#[derive(Debug, Clone)]
struct OutOfRange {
    space: Space,
    choices: Vec<u8>,
    first_bad: usize,
}

fn out_of_range() -> impl Strategy<Value = OutOfRange> {
    (1..=8usize, 1..=12usize)
        .prop_flat_map(|(n, k)| {
            (
                Just(Space { n, k }),
                vec(0..MAX_CANDIDATES as u8, k),
                0..k,
                n as u8..MAX_CANDIDATES as u8,
            )
        })
        .prop_map(|(space, mut choices, first_bad, bad)| {
            let n = space.n as u8;
            // Gates before `first_bad` are in range; `first_bad` is not; later ones are anything.
            for c in &mut choices[..first_bad] {
                *c %= n;
            }
            choices[first_bad] = bad;
            OutOfRange {
                space,
                choices,
                first_bad,
            }
        })
}

/// Text with one character that is not a candidate digit, at `position`.
#[derive(Debug, Clone)]
struct BadText {
    space: Space,
    text: String,
    position: usize,
    ch: char,
}

fn bad_text() -> impl Strategy<Value = BadText> {
    (
        small_space(),
        "[0-9a-z]{0,14}",
        "[0-9a-z]{0,14}",
        "[^0-9a-zA-Z]",
    )
        .prop_map(|(space, head, tail, bad)| {
            let ch = bad.chars().next().unwrap();
            BadText {
                space,
                text: format!("{head}{ch}{tail}"),
                position: head.chars().count(),
                ch,
            }
        })
}

proptest! {
    #![proptest_config(config(512))]

    /// Display writes one digit per gate; FromStr reads it back; serde goes through the text.
    #[test]
    fn text_form_round_trips(choices in vec(0..MAX_CANDIDATES as u8, 0..=40)) {
        let path = Path::new(choices.clone());
        let written = path.to_string();
        prop_assert_eq!(&written, &text(&choices));
        prop_assert_eq!(written.parse::<Path>(), Ok(path.clone()));
        prop_assert_eq!(written.to_uppercase().parse::<Path>(), Ok(path.clone()));
        let json = serde_json::to_string(&path).unwrap();
        prop_assert_eq!(&json, &format!("\"{written}\""));
        prop_assert_eq!(serde_json::from_str::<Path>(&json).unwrap(), path.clone());
        prop_assert_eq!(path.len(), choices.len());
        prop_assert_eq!(path.is_empty(), choices.is_empty());
        prop_assert_eq!(path.choices(), &choices[..]);
        for (gate, &c) in choices.iter().enumerate() {
            prop_assert_eq!(path.choice(gate), usize::from(c));
        }
    }

    /// Any lower-case digit string parses and prints back unchanged.
    #[test]
    fn digit_strings_round_trip(s in "[0-9a-z]{0,40}") {
        let path: Path = s.parse().unwrap();
        prop_assert_eq!(path.to_string(), s);
    }

    /// `prefix(d)` is the first min(d, K) choices.
    #[test]
    fn prefix_is_the_first_d_choices(
        choices in vec(0..MAX_CANDIDATES as u8, 0..=12),
        depth in 0..=14usize,
    ) {
        let path = Path::new(choices.clone());
        prop_assert_eq!(path.prefix(depth), &choices[..depth.min(choices.len())]);
    }

    /// A valid path parses in its space and passes `check`.
    #[test]
    fn parse_accepts_valid_paths(case in space_and_path(small_space())) {
        let space = case.space.space();
        let parsed = space.parse(&text(&case.choices));
        prop_assert_eq!(parsed, Ok(Path::new(case.choices.clone())));
        prop_assert_eq!(space.check(&Path::new(case.choices)), Ok(()));
    }

    /// Valid digits of the wrong length: `WrongLength`, naming the text and both lengths.
    #[test]
    fn parse_rejects_wrong_length(case in wrong_length()) {
        let space = case.space.space();
        let written = text(&case.choices);
        let expected = PathError::WrongLength {
            text: written.clone(),
            got: case.choices.len(),
            expected: case.space.k,
        };
        prop_assert_eq!(space.parse(&written), Err(expected.clone()));
        prop_assert_eq!(space.check(&Path::new(case.choices.clone())), Err(expected.clone()));
        prop_assert_eq!(space.index_of(&Path::new(case.choices)), Err(expected));
    }

    /// A gate at or above n: `CandidateOutOfRange` naming the first such gate.
    #[test]
    fn parse_rejects_out_of_range_digits(case in out_of_range()) {
        let space = case.space.space();
        let written = text(&case.choices);
        let expected = PathError::CandidateOutOfRange {
            text: written.clone(),
            gate: case.first_bad,
            candidate: usize::from(case.choices[case.first_bad]),
            n: case.space.n,
        };
        prop_assert_eq!(space.parse(&written), Err(expected.clone()));
        prop_assert_eq!(space.check(&Path::new(case.choices.clone())), Err(expected.clone()));
        prop_assert_eq!(space.index_of(&Path::new(case.choices)), Err(expected));
    }

    /// A character outside 0-9, a-z, A-Z: `BadDigit` with its position, whatever the length.
    #[test]
    fn parse_rejects_non_digits(case in bad_text()) {
        let expected = PathError::BadDigit {
            text: case.text.clone(),
            ch: case.ch,
            position: case.position,
        };
        prop_assert_eq!(case.text.parse::<Path>(), Err(expected.clone()));
        prop_assert_eq!(case.space.space().parse(&case.text), Err(expected));
    }

    /// path -> index -> path: the index is the base-n value and maps back to the same path.
    #[test]
    fn index_of_then_path_at_is_identity(case in space_and_path(small_space())) {
        let space = case.space.space();
        let path = Path::new(case.choices.clone());
        let index = space.index_of(&path).unwrap();
        prop_assert_eq!(index, base_n(&case.choices, case.space.n));
        prop_assert!(index < exact_count(case.space.n, case.space.k).unwrap());
        prop_assert_eq!(space.path_at(index), Ok(path));
    }

    /// index -> path -> index, and the path is valid; `count` is n^K and the first index past
    /// the end is `IndexOutOfRange`.
    #[test]
    fn path_at_then_index_of_is_identity(case in space_and_index(small_space())) {
        let space = case.space.space();
        let count = exact_count(case.space.n, case.space.k).unwrap();
        prop_assert_eq!(space.count(), Ok(count));
        let path = space.path_at(case.index).unwrap();
        prop_assert_eq!(space.check(&path), Ok(()));
        prop_assert_eq!(base_n(path.choices(), case.space.n), case.index);
        prop_assert_eq!(space.index_of(&path), Ok(case.index));
        for past in [count, count + 1 + case.index] {
            prop_assert_eq!(
                space.path_at(past),
                Err(PathError::IndexOutOfRange { index: past, count })
            );
        }
    }

    /// The bijection also holds next to `u128::MAX` (n up to 36, largest K that fits).
    #[test]
    fn bijection_holds_in_wide_spaces(
        case in space_and_index(wide_space()),
        other in space_and_path(wide_space()),
    ) {
        let space = case.space.space();
        let path = space.path_at(case.index).unwrap();
        prop_assert_eq!(path.len(), case.space.k);
        prop_assert_eq!(space.index_of(&path), Ok(case.index));
        prop_assert_eq!(base_n(path.choices(), case.space.n), case.index);

        let space = other.space.space();
        let path = Path::new(other.choices.clone());
        let index = space.index_of(&path).unwrap();
        prop_assert_eq!(index, base_n(&other.choices, other.space.n));
        prop_assert_eq!(space.path_at(index), Ok(path));
    }

    /// Lexicographic path order (as `Path`s and as text) is integer order.
    #[test]
    fn lexicographic_order_is_integer_order(case in space_and_two_paths()) {
        let space = case.space.space();
        let (a, b) = (Path::new(case.a.clone()), Path::new(case.b.clone()));
        let (ia, ib) = (space.index_of(&a).unwrap(), space.index_of(&b).unwrap());
        let lexicographic = case.a.cmp(&case.b);
        prop_assert_eq!(a.cmp(&b), lexicographic);
        prop_assert_eq!(a.to_string().cmp(&b.to_string()), lexicographic);
        prop_assert_eq!(ia.cmp(&ib), lexicographic);
        prop_assert_eq!(ia == ib, a == b);
    }

    /// `count` is n^K exactly when that fits in a `u128`, else `TooManyPaths`; `index_of`
    /// and `path_at` fail the same way. n = 0 and n > 36 are `BadCandidateCount`.
    #[test]
    fn count_errors_exactly_when_n_pow_k_overflows(
        n in 0..=40usize,
        k in prop_oneof![
            0..=300usize,
            Just(127usize),
            Just(128usize),
            (u32::MAX as usize - 1)..=(u32::MAX as usize + 2),
            Just(usize::MAX),
        ],
    ) {
        let Ok(space) = PathSpace::new(n, k) else {
            prop_assert!(n == 0 || n > MAX_CANDIDATES, "n = {} was rejected", n);
            prop_assert_eq!(PathSpace::new(n, k), Err(PathError::BadCandidateCount { n }));
            return Ok(());
        };
        prop_assert!((1..=MAX_CANDIDATES).contains(&n));
        prop_assert_eq!((space.n(), space.k()), (n, k));
        // Calls that would build a K-gate path only where K is small: a wrong answer with
        // K > u32::MAX would allocate gigabytes instead of failing.
        let small = k <= 300;
        match exact_count(n, k) {
            Some(count) => {
                prop_assert_eq!(space.count(), Ok(count));
                prop_assert_eq!(space.prefix_count(k), Some(count));
                if small {
                    prop_assert_eq!(
                        space.path_at(count),
                        Err(PathError::IndexOutOfRange { index: count, count })
                    );
                }
            }
            None => {
                let too_many = PathError::TooManyPaths { n, k };
                prop_assert_eq!(space.count(), Err(too_many.clone()));
                prop_assert_eq!(space.prefix_count(k), None);
                if small {
                    prop_assert_eq!(space.path_at(0), Err(too_many.clone()));
                    let zeros = Path::new(vec![0; k]);
                    prop_assert_eq!(space.index_of(&zeros), Err(too_many));
                }
            }
        }
    }

    /// `prefix_count(d)` is n^d for every depth, within K or not.
    #[test]
    fn prefix_count_is_n_pow_d(n in 1..=MAX_CANDIDATES, k in 0..=40usize, depth in 0..=140usize) {
        let space = PathSpace::new(n, k).unwrap();
        prop_assert_eq!(space.prefix_count(depth), exact_count(n, depth));
    }

    /// Eq. 1 sampling gives valid paths, and the same seed gives the same path.
    #[test]
    fn sample_gives_valid_paths(
        n in 1..=MAX_CANDIDATES,
        k in 0..=64usize,
        seed in any::<u64>(),
    ) {
        let space = PathSpace::new(n, k).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let first: Vec<Path> = (0..8).map(|_| space.sample(&mut rng)).collect();
        for path in &first {
            prop_assert_eq!(path.len(), k);
            prop_assert!(path.choices().iter().all(|&c| usize::from(c) < n), "{}", path);
            prop_assert_eq!(space.check(path), Ok(()));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let again: Vec<Path> = (0..8).map(|_| space.sample(&mut rng)).collect();
        prop_assert_eq!(first, again);
    }

    /// `PathSpace` survives a serde round trip.
    #[test]
    fn path_space_serde_round_trips(space in small_space()) {
        let space = space.space();
        let json = serde_json::to_string(&space).unwrap();
        prop_assert_eq!(serde_json::from_str::<PathSpace>(&json).unwrap(), space);
    }
}

/// Eq. 1 is uniform per gate: over 60,000 draws each candidate of each gate appears about
/// 1/n of the time (within 6 standard deviations), and every one of the n^K paths appears.
#[test]
fn sample_covers_every_path_about_equally() {
    let (n, k, draws) = (3usize, 4usize, 60_000usize);
    let space = PathSpace::new(n, k).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0e01);
    let mut per_path = vec![0u32; n.pow(k as u32)];
    let mut per_gate = vec![vec![0u32; n]; k];
    for _ in 0..draws {
        let path = space.sample(&mut rng);
        per_path[base_n(path.choices(), n) as usize] += 1;
        for (gate, &c) in path.choices().iter().enumerate() {
            per_gate[gate][usize::from(c)] += 1;
        }
    }
    assert!(per_path.iter().all(|&c| c > 0), "a path never drawn");
    let mean = draws as f64 / n as f64;
    let sd = (draws as f64 * (1.0 / n as f64) * (1.0 - 1.0 / n as f64)).sqrt();
    for (gate, counts) in per_gate.iter().enumerate() {
        for (c, &count) in counts.iter().enumerate() {
            assert!(
                (f64::from(count) - mean).abs() < 6.0 * sd,
                "gate {gate} chose candidate {c} {count} times; expected {mean} ± {sd}"
            );
        }
    }
}

/// Known answers of the text form and the order of the index.
#[test]
fn known_paths_and_indices() {
    let space = PathSpace::new(36, 2).unwrap();
    assert_eq!(space.parse("zz").unwrap().choices(), &[35, 35]);
    assert_eq!(space.index_of(&space.parse("zz").unwrap()), Ok(36 * 36 - 1));
    assert_eq!(space.index_of(&space.parse("10").unwrap()), Ok(36));
    assert_eq!(space.path_at(36 * 36 - 1).unwrap().to_string(), "zz");
    let empty = PathSpace::new(5, 0).unwrap();
    assert_eq!(empty.count(), Ok(1));
    assert_eq!(empty.path_at(0), Ok(Path::new(vec![])));
    assert_eq!(empty.parse(""), Ok(Path::new(vec![])));
    assert_eq!(
        PathSpace::new(2, 128).unwrap().count(),
        Err(PathError::TooManyPaths { n: 2, k: 128 })
    );
    assert_eq!(
        PathSpace::new(36, 24).unwrap().count(),
        Ok(36u128.pow(24)),
        "36^24 fits in a u128"
    );
    assert_eq!(
        PathSpace::new(36, 25).unwrap().count(),
        Err(PathError::TooManyPaths { n: 36, k: 25 })
    );
    assert_eq!(max_k(2), 127);
    assert_eq!(max_k(36), 24);
}

/// n = 1 has exactly one path however many gates there are, even past `u32::MAX` gates,
/// where the exponent no longer fits `checked_pow`.
#[test]
fn one_candidate_means_one_path_for_any_k() {
    for k in [
        0,
        1,
        1000,
        u32::MAX as usize,
        u32::MAX as usize + 1,
        usize::MAX,
    ] {
        let space = PathSpace::new(1, k).unwrap();
        assert_eq!(space.count(), Ok(1), "K = {k}");
        assert_eq!(space.prefix_count(k), Some(1), "K = {k}");
    }
}

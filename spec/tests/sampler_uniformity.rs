//! Seeded chi-square goodness-of-fit tests of the Algorithm 1 sampler's distribution.
//!
//! `sample_paths` promises: the d-prefixes are uniform over ordered p-tuples of distinct
//! prefixes (hence over sets of them), and the K - d suffix gates are independent and uniform
//! (Eq. 1), independent of the prefixes. Under [`Infeasible::Clip`] with n^d < p every prefix
//! is used exactly once, in uniformly random order.
//!
//! Each test draws a fixed, seeded sample, counts how often every possible outcome occurs,
//! and compares Pearson's statistic with the chi-square critical value at significance 1e-4.
//! The negative controls run deliberately biased samplers through the same check and require
//! it to fail, so the tests are known to have power.

use std::collections::HashMap;

use eio_spec::gates::{Path, PathSpace};
use eio_spec::sampler::{sample_paths, Infeasible};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Chi-square machinery
// ---------------------------------------------------------------------------------------------

/// z with P(Z > z) = 1e-4 for a standard normal Z (= sqrt(2) · erfinv(1 - 2e-4)).
const Z_UPPER_1E4: f64 = 3.719_016_485_455_68;

/// The upper 1e-4 quantile of the chi-square distribution with `df` degrees of freedom, by
/// the Wilson–Hilferty approximation: (X/df)^(1/3) is close to normal with mean
/// 1 - 2/(9 df) and variance 2/(9 df), so
///
/// ```text
/// q ≈ df · (1 - 2/(9 df) + z · sqrt(2/(9 df)))^3,   z = 3.7190 (upper 1e-4 normal quantile)
/// ```
///
/// At this tail it lies slightly *above* the exact quantile for every df (7% at df = 1, under
/// 0.3% from df = 35 on; see `wilson_hilferty_matches_the_table`), so a test using it rejects
/// a correct sampler with probability at most 1e-4.
fn chi_square_critical_1e4(df: usize) -> f64 {
    assert!(df > 0);
    let a = 2.0 / (9.0 * df as f64);
    df as f64 * (1.0 - a + Z_UPPER_1E4 * a.sqrt()).powi(3)
}

/// Pearson's statistic for one or more independent groups of counts, each expected uniform
/// over its cells, compared with the critical value at significance 1e-4.
#[derive(Debug)]
struct Verdict {
    statistic: f64,
    df: usize,
    critical: f64,
}

impl Verdict {
    fn uniform(&self) -> bool {
        self.statistic <= self.critical
    }
}

/// The sum over groups of Σ (observed - expected)^2 / expected, with Σ (cells - 1) degrees of
/// freedom (independent groups add). Every cell must expect at least 5 observations, the
/// usual condition for the chi-square approximation.
fn uniformity(groups: &[&[u64]]) -> Verdict {
    let (mut statistic, mut df) = (0.0, 0);
    for counts in groups {
        let total: u64 = counts.iter().sum();
        let expected = total as f64 / counts.len() as f64;
        assert!(
            expected >= 5.0,
            "{} draws over {} cells: too few for a chi-square test",
            total,
            counts.len()
        );
        statistic += counts
            .iter()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum::<f64>();
        df += counts.len() - 1;
    }
    Verdict {
        statistic,
        df,
        critical: chi_square_critical_1e4(df),
    }
}

fn assert_uniform(label: &str, groups: &[&[u64]]) {
    let verdict = uniformity(groups);
    eprintln!("{label}: {verdict:?}");
    assert!(
        verdict.uniform(),
        "{label}: not uniform at significance 1e-4: {verdict:?}"
    );
}

fn assert_not_uniform(label: &str, groups: &[&[u64]]) {
    let verdict = uniformity(groups);
    eprintln!("{label}: {verdict:?}");
    assert!(
        !verdict.uniform(),
        "{label}: a biased sampler passed the uniformity test: {verdict:?}"
    );
}

/// Every way to pick `p` distinct values from 0..`universe`, numbered 0.. : as sorted sets
/// (`ordered` false) or as ordered tuples (`ordered` true).
fn catalogue(universe: usize, p: usize, ordered: bool) -> HashMap<Vec<usize>, usize> {
    fn extend(
        universe: usize,
        p: usize,
        ordered: bool,
        current: &mut Vec<usize>,
        all: &mut HashMap<Vec<usize>, usize>,
    ) {
        if current.len() == p {
            let id = all.len();
            all.insert(current.clone(), id);
            return;
        }
        let start = if ordered {
            0
        } else {
            current.last().map_or(0, |&v| v + 1)
        };
        for v in start..universe {
            if !current.contains(&v) {
                current.push(v);
                extend(universe, p, ordered, current, all);
                current.pop();
            }
        }
    }
    let mut all = HashMap::new();
    extend(universe, p, ordered, &mut Vec::new(), &mut all);
    all
}

/// C(n, r) and n!/(n-r)!, to check the catalogues.
fn binomial(n: usize, r: usize) -> usize {
    (0..r).fold(1, |acc, i| acc * (n - i) / (i + 1))
}

fn falling(n: usize, r: usize) -> usize {
    (0..r).map(|i| n - i).product()
}

// ---------------------------------------------------------------------------------------------
// Samplers and what is counted
// ---------------------------------------------------------------------------------------------

/// One sampler configuration: n candidates, K gates, depth d, p paths, policy.
#[derive(Debug, Clone, Copy)]
struct Setup {
    n: usize,
    k: usize,
    depth: usize,
    p: usize,
    policy: Infeasible,
}

impl Setup {
    fn space(&self) -> PathSpace {
        PathSpace::new(self.n, self.k).unwrap()
    }

    /// n^d.
    fn prefixes(&self) -> usize {
        self.n.pow(self.depth as u32)
    }

    /// n^(K - d).
    fn suffixes(&self) -> usize {
        self.n.pow((self.k - self.depth) as u32)
    }

    /// The sampler under test.
    fn sample(&self, rng: &mut ChaCha8Rng) -> Vec<Path> {
        sample_paths(&self.space(), self.depth, self.p, self.policy, rng).unwrap()
    }

    /// `draws` seeded draws of `sampler`.
    fn draw(
        &self,
        draws: usize,
        seed: u64,
        mut sampler: impl FnMut(&Setup, &mut ChaCha8Rng) -> Vec<Path>,
    ) -> Vec<Vec<Path>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..draws).map(|_| sampler(self, &mut rng)).collect()
    }

    /// A path's prefix (first d gates) as a base-n number.
    fn prefix_index(&self, path: &Path) -> usize {
        base_n(&path.choices()[..self.depth], self.n)
    }

    /// A path's suffix (gates d..K) as a base-n number.
    fn suffix_index(&self, path: &Path) -> usize {
        base_n(&path.choices()[self.depth..], self.n)
    }

    /// The prefixes of one draw, in order.
    fn prefix_tuple(&self, paths: &[Path]) -> Vec<usize> {
        paths.iter().map(|p| self.prefix_index(p)).collect()
    }

    /// The set of prefixes of one draw, sorted.
    fn prefix_set(&self, paths: &[Path]) -> Vec<usize> {
        let mut set = self.prefix_tuple(paths);
        set.sort_unstable();
        set
    }

    /// How many draws fall on each set of prefixes.
    fn count_sets(&self, draws: &[Vec<Path>]) -> Vec<u64> {
        let sets = catalogue(self.prefixes(), self.p, false);
        assert_eq!(sets.len(), binomial(self.prefixes(), self.p));
        count(draws, sets.len(), |paths| sets[&self.prefix_set(paths)])
    }

    /// How many draws fall on each ordered tuple of prefixes.
    fn count_tuples(&self, draws: &[Vec<Path>]) -> Vec<u64> {
        let tuples = catalogue(self.prefixes(), draws[0].len(), true);
        assert_eq!(tuples.len(), falling(self.prefixes(), draws[0].len()));
        count(draws, tuples.len(), |paths| {
            tuples[&self.prefix_tuple(paths)]
        })
    }

    /// How many draws fall on each complete outcome: the ordered prefix tuple together with
    /// every path's suffix.
    fn count_outcomes(&self, draws: &[Vec<Path>]) -> Vec<u64> {
        let paths = draws[0].len();
        let tuples = catalogue(self.prefixes(), paths, true);
        let suffix_joint = self.suffixes().pow(paths as u32);
        count(draws, tuples.len() * suffix_joint, |draw| {
            let suffixes = draw
                .iter()
                .fold(0, |acc, p| acc * self.suffixes() + self.suffix_index(p));
            tuples[&self.prefix_tuple(draw)] * suffix_joint + suffixes
        })
    }
}

fn base_n(digits: &[u8], n: usize) -> usize {
    digits.iter().fold(0, |acc, &d| acc * n + usize::from(d))
}

/// Counts of `key` over `draws`, one cell per category 0..`categories`.
fn count(draws: &[Vec<Path>], categories: usize, key: impl Fn(&[Path]) -> usize) -> Vec<u64> {
    let mut counts = vec![0u64; categories];
    for draw in draws {
        counts[key(draw)] += 1;
    }
    counts
}

/// For each gate position, how often each candidate occurs over every path of every draw.
fn count_per_gate(draws: &[Vec<Path>], n: usize, gates: std::ops::Range<usize>) -> Vec<Vec<u64>> {
    let mut counts = vec![vec![0u64; n]; gates.len()];
    for path in draws.iter().flatten() {
        for (row, gate) in counts.iter_mut().zip(gates.clone()) {
            row[path.choice(gate)] += 1;
        }
    }
    counts
}

fn groups(rows: &[Vec<u64>]) -> Vec<&[u64]> {
    rows.iter().map(Vec::as_slice).collect()
}

// ---------------------------------------------------------------------------------------------
// The sampler is uniform
// ---------------------------------------------------------------------------------------------

/// n = 2, d = K = 3, p = 3: the C(8, 3) = 56 sets of prefixes and the 8·7·6 = 336 ordered
/// triples are equally likely (112,000 draws: 2,000 per set, 333 per triple).
#[test]
fn prefix_sets_and_tuples_are_uniform_n2_d3_p3() {
    let setup = Setup {
        n: 2,
        k: 3,
        depth: 3,
        p: 3,
        policy: Infeasible::Error,
    };
    let draws = setup.draw(112_000, 1, Setup::sample);
    let sets = setup.count_sets(&draws);
    assert_eq!(sets.len(), 56);
    assert_uniform("n=2 d=3 p=3 sets", &[&sets]);
    let tuples = setup.count_tuples(&draws);
    assert_eq!(tuples.len(), 336);
    assert_uniform("n=2 d=3 p=3 ordered triples", &[&tuples]);
}

/// n = 3, d = K = 2, p = 2: the C(9, 2) = 36 sets and 72 ordered pairs are equally likely.
#[test]
fn prefix_sets_and_tuples_are_uniform_n3_d2_p2() {
    let setup = Setup {
        n: 3,
        k: 2,
        depth: 2,
        p: 2,
        policy: Infeasible::Error,
    };
    let draws = setup.draw(72_000, 2, Setup::sample);
    let sets = setup.count_sets(&draws);
    assert_eq!(sets.len(), 36);
    assert_uniform("n=3 d=2 p=2 sets", &[&sets]);
    assert_uniform("n=3 d=2 p=2 ordered pairs", &[&setup.count_tuples(&draws)]);
}

/// Larger p: n = 2, d = K = 4, p = 4 (C(16, 4) = 1,820 sets, 100,000 draws), and n = 5,
/// d = K = 1, p = 4 (5 sets, 120 ordered tuples, 60,000 draws).
#[test]
fn prefix_sets_are_uniform_for_larger_p() {
    let setup = Setup {
        n: 2,
        k: 4,
        depth: 4,
        p: 4,
        policy: Infeasible::Error,
    };
    let draws = setup.draw(100_000, 3, Setup::sample);
    assert_uniform("n=2 d=4 p=4 sets", &[&setup.count_sets(&draws)]);

    let setup = Setup {
        n: 5,
        k: 1,
        depth: 1,
        p: 4,
        policy: Infeasible::Clip,
    };
    let draws = setup.draw(60_000, 4, Setup::sample);
    assert_uniform("n=5 d=1 p=4 sets", &[&setup.count_sets(&draws)]);
    assert_uniform("n=5 d=1 p=4 ordered", &[&setup.count_tuples(&draws)]);
}

/// Suffix gates (K > d) are uniform and independent of the prefixes and of each other: the
/// complete outcome (ordered prefixes, every suffix) is uniform over all of them.
/// n = 3, K = 3, d = 1, p = 2: 6 · 9 · 9 = 486 outcomes, 150,000 draws;
/// n = 2, K = 4, d = 2, p = 2: 12 · 4 · 4 = 192 outcomes, 100,000 draws.
#[test]
fn suffix_gates_are_uniform_and_independent_of_the_prefix() {
    for (setup, draws, seed) in [
        (
            Setup {
                n: 3,
                k: 3,
                depth: 1,
                p: 2,
                policy: Infeasible::Error,
            },
            150_000,
            5,
        ),
        (
            Setup {
                n: 2,
                k: 4,
                depth: 2,
                p: 2,
                policy: Infeasible::Error,
            },
            100_000,
            6,
        ),
    ] {
        let draws = setup.draw(draws, seed, Setup::sample);
        let outcomes = setup.count_outcomes(&draws);
        assert_eq!(
            outcomes.len(),
            falling(setup.prefixes(), setup.p) * setup.suffixes().pow(setup.p as u32)
        );
        assert_uniform(&format!("{setup:?} complete outcomes"), &[&outcomes]);
    }
}

/// Each suffix gate of each path slot, on its own, is uniform on 0..n: n = 3, K = 6, d = 2,
/// p = 4, 30,000 draws (16 independent groups of 3 cells).
#[test]
fn every_suffix_gate_is_uniform() {
    let setup = Setup {
        n: 3,
        k: 6,
        depth: 2,
        p: 4,
        policy: Infeasible::Error,
    };
    let draws = setup.draw(30_000, 7, Setup::sample);
    let mut rows = Vec::new();
    for slot in 0..setup.p {
        let slot_draws: Vec<Vec<Path>> = draws.iter().map(|d| vec![d[slot].clone()]).collect();
        rows.extend(count_per_gate(&slot_draws, setup.n, setup.depth..setup.k));
    }
    assert_eq!(rows.len(), 16);
    assert_uniform("n=3 K=6 d=2 p=4 suffix gates", &groups(&rows));
}

/// Clip with n^d < p: every draw holds each of the n^d prefixes exactly once, in a uniformly
/// random order, with uniform, independent suffixes.
/// n = 2, K = 3, d = 2, p = 5: 4 paths; 24 orders · 2^4 suffixes = 384 outcomes, 100,000 draws.
/// n = 3, K = 1, d = 1, p = 16: 3 paths; 6 orders, 30,000 draws.
#[test]
fn clip_uses_every_prefix_once_in_uniform_order() {
    for (setup, draws, seed) in [
        (
            Setup {
                n: 2,
                k: 3,
                depth: 2,
                p: 5,
                policy: Infeasible::Clip,
            },
            100_000,
            8,
        ),
        (
            Setup {
                n: 3,
                k: 1,
                depth: 1,
                p: 16,
                policy: Infeasible::Clip,
            },
            30_000,
            9,
        ),
    ] {
        let draws = setup.draw(draws, seed, Setup::sample);
        let all: Vec<usize> = (0..setup.prefixes()).collect();
        for draw in &draws {
            assert_eq!(setup.prefix_set(draw), all, "{setup:?}: {draw:?}");
        }
        let orders = setup.count_tuples(&draws);
        assert_eq!(orders.len(), falling(setup.prefixes(), setup.prefixes()));
        assert_uniform(&format!("{setup:?} orders"), &[&orders]);
        assert_uniform(
            &format!("{setup:?} complete outcomes"),
            &[&setup.count_outcomes(&draws)],
        );
    }
}

/// Spaces beyond 2^128 prefixes use the digit-string fallback; every gate there (prefix and
/// suffix) is still uniform. n = 2, K = 200, d = 130, p = 16 and n = 36, K = 40, d = 40,
/// p = 16, 400 draws each (6,400 paths; one group per gate).
#[test]
fn fallback_gates_are_uniform() {
    for (setup, seed) in [
        (
            Setup {
                n: 2,
                k: 200,
                depth: 130,
                p: 16,
                policy: Infeasible::Error,
            },
            10,
        ),
        (
            Setup {
                n: 36,
                k: 40,
                depth: 40,
                p: 16,
                policy: Infeasible::Error,
            },
            11,
        ),
    ] {
        assert_eq!(setup.space().prefix_count(setup.depth), None);
        let draws = setup.draw(400, seed, Setup::sample);
        let rows = count_per_gate(&draws, setup.n, 0..setup.k);
        assert_uniform(&format!("{setup:?} gates"), &groups(&rows));
    }
}

// ---------------------------------------------------------------------------------------------
// Negative controls: biased samplers must fail the same checks
// ---------------------------------------------------------------------------------------------

const N2_D3_P3: Setup = Setup {
    n: 2,
    k: 3,
    depth: 3,
    p: 3,
    policy: Infeasible::Error,
};

/// A sampler that redraws half the time it gives the set {000, 001, 010}: that set comes up
/// about half as often. The set test must catch it.
#[test]
fn negative_control_rejecting_one_set_is_caught() {
    let draws = N2_D3_P3.draw(112_000, 1, |setup, rng| loop {
        let paths = setup.sample(rng);
        if setup.prefix_set(&paths) != [0, 1, 2] || rng.random_bool(0.5) {
            break paths;
        }
    });
    assert_not_uniform("rejects {000, 001, 010}", &[&N2_D3_P3.count_sets(&draws)]);
}

/// A sampler that returns its paths sorted by prefix: sets stay uniform (and pass), but only
/// increasing tuples ever occur. The tuple test must catch it.
#[test]
fn negative_control_sorted_prefixes_are_caught() {
    let draws = N2_D3_P3.draw(112_000, 1, |setup, rng| {
        let mut paths = setup.sample(rng);
        paths.sort();
        paths
    });
    assert_uniform("sorted: sets", &[&N2_D3_P3.count_sets(&draws)]);
    assert_not_uniform("sorted: ordered triples", &[&N2_D3_P3.count_tuples(&draws)]);
}

/// The classic wrong way to draw without replacement: draw r uniformly and, if it is taken,
/// step to the next free value (linear probing). Every draw is valid (distinct prefixes), but
/// values right after a taken one are favoured. The set test must catch it.
#[test]
fn negative_control_linear_probing_is_caught() {
    let draws = N2_D3_P3.draw(112_000, 1, |setup, rng| {
        let available = setup.prefixes();
        let mut taken: Vec<usize> = Vec::new();
        while taken.len() < setup.p {
            let mut r = rng.random_range(0..available);
            while taken.contains(&r) {
                r = (r + 1) % available;
            }
            taken.push(r);
        }
        taken
            .into_iter()
            .map(|r| {
                let digits = (0..setup.depth)
                    .rev()
                    .map(|i| (r / setup.n.pow(i as u32) % setup.n) as u8);
                Path::new(digits.collect())
            })
            .collect()
    });
    for draw in &draws {
        let set = N2_D3_P3.prefix_set(draw);
        assert!(set.windows(2).all(|w| w[0] < w[1]), "distinct prefixes");
    }
    assert_not_uniform("linear probing: sets", &[&N2_D3_P3.count_sets(&draws)]);
}

/// A sampler whose first path copies its first prefix gate into its first suffix gate one
/// time in ten: every marginal of the prefixes is untouched, but the suffix now depends on
/// the prefix. The complete-outcome test must catch it.
#[test]
fn negative_control_suffix_tied_to_prefix_is_caught() {
    let setup = Setup {
        n: 3,
        k: 3,
        depth: 1,
        p: 2,
        policy: Infeasible::Error,
    };
    let draws = setup.draw(150_000, 5, |setup, rng| {
        let mut paths = setup.sample(rng);
        if rng.random_bool(0.1) {
            let mut gates = paths[0].choices().to_vec();
            gates[setup.depth] = gates[0];
            paths[0] = Path::new(gates);
        }
        paths
    });
    assert_uniform("tied suffix: prefix tuples", &[&setup.count_tuples(&draws)]);
    assert_not_uniform(
        "tied suffix: complete outcomes",
        &[&setup.count_outcomes(&draws)],
    );
}

/// A fallback-sized sampler whose gate 7 is forced to 0 three times in ten: the per-gate
/// test must catch it.
#[test]
fn negative_control_biased_gate_is_caught() {
    let setup = Setup {
        n: 2,
        k: 200,
        depth: 130,
        p: 16,
        policy: Infeasible::Error,
    };
    let draws = setup.draw(400, 10, |setup, rng| {
        setup
            .sample(rng)
            .into_iter()
            .map(|path| {
                let mut gates = path.choices().to_vec();
                if rng.random_bool(0.3) {
                    gates[7] = 0;
                }
                Path::new(gates)
            })
            .collect()
    });
    let rows = count_per_gate(&draws, setup.n, 0..setup.k);
    assert_not_uniform("gate 7 biased", &groups(&rows));
}

// ---------------------------------------------------------------------------------------------
// The machinery itself
// ---------------------------------------------------------------------------------------------

/// The Wilson–Hilferty critical values against exact upper-1e-4 chi-square quantiles
/// (computed with mpmath: the root of Q(df/2, x/2) = 1e-4 for the regularized upper
/// incomplete gamma Q): never below, and close from moderate df on.
#[test]
fn wilson_hilferty_matches_the_table() {
    let table = [
        (1, 15.136_705_226_623_4),
        (2, 18.420_680_743_952_4),
        (5, 25.744_831_959_055_9),
        (11, 37.366_986_437_997_0),
        (35, 74.926_221_893_704_9),
        (55, 102.775_799_374_522),
        (100, 161.318_656_959_047),
        (200, 283.060_253_824_242),
        (335, 439.918_228_815_565),
        (1000, 1_174.933_496_584_16),
    ];
    for (df, exact) in table {
        let approx = chi_square_critical_1e4(df);
        let relative = (approx - exact) / exact;
        assert!(
            relative >= 0.0,
            "df {df}: {approx} is below the exact {exact}"
        );
        let tolerance = if df >= 35 { 0.003 } else { 0.075 };
        assert!(relative < tolerance, "df {df}: {approx} vs exact {exact}");
    }
}

/// The catalogues hold every set / tuple once, and Pearson's statistic is right on a tiny
/// known case.
#[test]
fn catalogues_and_statistic_known_answers() {
    let sets = catalogue(4, 2, false);
    assert_eq!(sets.len(), 6);
    assert!(sets.contains_key(&vec![0, 3]) && !sets.contains_key(&vec![3, 0]));
    let tuples = catalogue(4, 2, true);
    assert_eq!(tuples.len(), 12);
    let mut ids: Vec<usize> = tuples.values().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..12).collect::<Vec<_>>());
    assert_eq!((binomial(8, 3), falling(8, 3)), (56, 336));
    // (10 - 20)^2/20 + (30 - 20)^2/20 + 0 = 10, df 2.
    let verdict = uniformity(&[&[10u64, 30, 20][..]]);
    assert!((verdict.statistic - 10.0).abs() < 1e-12);
    assert_eq!(verdict.df, 2);
    assert!(verdict.uniform());
    assert!(!uniformity(&[&[0u64, 40, 20][..]]).uniform());
}

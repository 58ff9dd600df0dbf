//! DVERGE's transferability matrix (`eio_spec::transfer_matrix`), f64 CPU against the
//! reference, exactly: the all-correct pool, the seeded subset, and every entry, every
//! per-restart rate and every per-image verdict of the N x (N + 1) matrix, for an ensemble of
//! plain networks and for paths of one RGN. Then what must hold on both engines whatever the
//! models: identical members give identical columns, more restarts never lower a success
//! rate, and ε = 0 fools nobody on the all-correct subset. (That the diagonal, a white-box
//! attack, beats the off-diagonal entries is typical but not guaranteed, so it is not
//! asserted.)

use candle_core::{DType, Device, Tensor};
use eio_accelerated::transfer_matrix as fast;
use eio_reference::transfer_matrix as slow;
use eio_spec::config::Sharing;
use eio_spec::plan::Role;
use eio_spec::rng::Seeds;
use eio_spec::transfer_matrix::{TransferMatrix, TransferSettings};
use eio_spec::{Path, Plan};
use eio_tests::cases::{images, perturbed_values, NetSpec};
use eio_tests::engine::{Images, Values};
use eio_tests::{reference, Accelerated};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Models, paths and a pool of images: `states` perturbed states of the tiny ResNet-8 (4
/// classes, 8x8) with `n` candidates, and `paths` (one per source: a source uses state
/// `source % states`), `pool` images with pixels rounded to byte / 255 in f32 (as
/// `eio_data::Images` gives them to an engine) and labels.
struct Case {
    plan: Plan,
    values: Vec<Values>,
    paths: Vec<Path>,
    pool: Images,
    labels: Vec<usize>,
}

impl Case {
    /// Labels: the reference's clean predictions of source 0 on all but every fifth image
    /// (whose label is random), so that the all-correct pool is neither empty nor everything.
    fn new(seed: u64, n: usize, states: usize, paths: Vec<Path>, pool: usize) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let spec = NetSpec {
            n,
            ..NetSpec::tiny(Sharing::Independent)
        };
        let plan = spec.plan();
        // Member 0 and jittered copies of it: related networks, as the members of a trained
        // ensemble are, so that some images are correct for all of them.
        let base = perturbed_values(&plan, rng.random());
        let values: Vec<Values> = (0..states)
            .map(|k| {
                if k == 0 {
                    base.clone()
                } else {
                    jittered(&plan, &base, rng.random())
                }
            })
            .collect();
        let mut pool = images(&mut rng, pool, &plan);
        for v in &mut pool.data {
            *v = f64::from(eio_data::unit((*v * 255.0).round() as u8));
        }
        let mut case = Case {
            plan,
            values,
            paths,
            pool,
            labels: Vec::new(),
        };
        let states = case.reference_states();
        let members = case.reference_members(&states);
        let x = reference::array(&case.pool);
        let target = eio_reference::attack::Target::Path {
            plan: members[0].plan,
            state: members[0].state,
            path: members[0].path,
            mode: eio_spec::config::BnMode::Eval,
        };
        let predicted = target.predict(&x, &mut ChaCha8Rng::seed_from_u64(0));
        case.labels = predicted
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                if k % 5 == 4 {
                    rng.random_range(0..case.plan.classes)
                } else {
                    p
                }
            })
            .collect();
        case
    }

    /// An ensemble of `members` plain networks (n = 1).
    fn ensemble(seed: u64, members: usize, pool: usize) -> Case {
        let plain = NetSpec {
            n: 1,
            ..NetSpec::tiny(Sharing::Independent)
        }
        .plan();
        let path = Path::new(vec![0; plain.k()]);
        Case::new(seed, 1, members, vec![path; members], pool)
    }

    /// `k` distinct paths of one RGN (n = 2), drawn as `eio eval --paths k` draws them.
    fn rgn_paths(seed: u64, k: usize, pool: usize) -> Case {
        let rgn = NetSpec::tiny(Sharing::Independent).plan();
        let paths =
            eio_spec::transfer_matrix::random_paths(&rgn.path_space(), k, &Seeds::new(seed))
                .expect("ResNet-8 has 2^7 paths");
        Case::new(seed, 2, 1, paths, pool)
    }

    fn sources(&self) -> usize {
        self.paths.len()
    }

    fn reference_states(&self) -> Vec<eio_reference::state::ModelState> {
        self.values
            .iter()
            .map(|v| reference::state(&self.plan, v))
            .collect()
    }

    fn reference_members<'a>(
        &'a self,
        states: &'a [eio_reference::state::ModelState],
    ) -> Vec<eio_reference::attack::Member<'a>> {
        (0..self.sources())
            .map(|i| eio_reference::attack::Member {
                plan: &self.plan,
                state: &states[i % states.len()],
                path: &self.paths[i],
            })
            .collect()
    }

    fn accelerated_states(&self) -> Vec<eio_accelerated::state::ModelState> {
        let engine = Accelerated::f64_cpu();
        self.values
            .iter()
            .map(|v| engine.state(&self.plan, v))
            .collect()
    }

    fn accelerated_members<'a>(
        &'a self,
        states: &'a [eio_accelerated::state::ModelState],
    ) -> Vec<eio_accelerated::attack::Member<'a>> {
        (0..self.sources())
            .map(|i| eio_accelerated::attack::Member {
                plan: &self.plan,
                state: &states[i % states.len()],
                path: &self.paths[i],
            })
            .collect()
    }

    /// The pool as the data crate holds a test set.
    fn data_images(&self) -> eio_data::Images {
        let [_, c, h, w] = self.pool.dims;
        let pixels: Vec<f32> = self.pool.data.iter().map(|&v| v as f32).collect();
        eio_data::Images::from_unit(
            eio_data::ImageShape::new(c, h, w),
            &pixels,
            self.labels.iter().map(|&y| y as u32).collect(),
            "pool",
        )
        .expect("pixels are bytes / 255 and fit the labels")
    }

    /// The reference's whole protocol.
    fn reference_run(&self, settings: &TransferSettings, seeds: &Seeds) -> slow::TransferRun {
        let states = self.reference_states();
        let members = self.reference_members(&states);
        slow::transfer_protocol(
            &members,
            &reference::array(&self.pool),
            &self.labels,
            settings,
            seeds,
        )
        .expect("reference transfer protocol")
    }

    /// The accelerated engine's whole protocol (f64 CPU).
    fn accelerated_run(&self, settings: &TransferSettings, seeds: &Seeds) -> fast::TransferReport {
        let states = self.accelerated_states();
        let members = self.accelerated_members(&states);
        let sources = (0..self.sources())
            .map(|i| fast::SourceInfo {
                label: i.to_string(),
                model: "case".into(),
                member: i % states.len(),
                path: self.paths[i].to_string(),
            })
            .collect();
        let mut calls = 0;
        let report = fast::run(
            &members,
            sources,
            &self.data_images(),
            settings,
            seeds,
            &Device::Cpu,
            DType::F64,
            &mut |done, total| {
                calls += 1;
                assert_eq!(done, calls);
                assert!(done <= total);
            },
        )
        .expect("accelerated transfer protocol");
        assert_eq!(
            calls,
            self.sources() * report.subset.len().div_ceil(settings.batch_size)
        );
        report
    }
}

/// `values` with every learnable tensor's entries multiplied by factors in [0.85, 1.15).
fn jittered(plan: &Plan, values: &Values, seed: u64) -> Values {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = values.clone();
    for spec in plan.params.iter().filter(|s| s.role == Role::Learnable) {
        for v in out.get_mut(&spec.name).expect("every tensor").iter_mut() {
            *v *= rng.random_range(0.85..1.15);
        }
    }
    out
}

/// Small settings: 3 steps, 2 restarts, batches of 3 (so a partial last batch), 7 images.
fn settings(eps: f64) -> TransferSettings {
    TransferSettings {
        eps,
        steps: 3,
        step_fraction: 0.2,
        restarts: 2,
        images: 7,
        batch_size: 3,
    }
}

fn assert_same(a: &TransferMatrix, b: &TransferMatrix, what: &str) {
    assert_eq!(a.images, b.images, "{what}: images");
    assert_eq!(a.restarts, b.restarts, "{what}: restarts");
    assert_eq!(a.fooled, b.fooled, "{what}: fooled counts");
    assert_eq!(a.success, b.success, "{what}: success rates");
    assert_eq!(a.per_restart, b.per_restart, "{what}: per-restart rates");
    assert_eq!(a.robust, b.robust, "{what}: per-image verdicts");
}

/// Both engines' protocol on `case`: the same pool, subset and matrix.
fn check_engines_agree(case: &Case, settings: &TransferSettings, seed: u64, what: &str) {
    let seeds = Seeds::new(seed);
    let slow = case.reference_run(settings, &seeds);
    let fast = case.accelerated_run(settings, &seeds);
    eprintln!(
        "{what}: {} of {} all-correct, subset {:?}\n{}",
        slow.all_correct,
        case.pool.batch(),
        slow.subset,
        slow.matrix
    );
    assert_eq!(
        slow.all_correct, fast.all_correct,
        "{what}: all-correct pool"
    );
    assert_eq!(slow.subset, fast.subset, "{what}: subset");
    assert_eq!(fast.pool, case.pool.batch());
    assert_same(&slow.matrix, &fast.matrix, what);
    assert_eq!(
        fast.matrix.targets.last().map(String::as_str),
        Some("ensemble")
    );
    assert_eq!(fast.matrix.success.len(), case.sources());
    assert!(fast
        .matrix
        .success
        .iter()
        .all(|row| row.len() == case.sources() + 1));
}

#[test]
fn ensemble_matrix_matches_reference() {
    for (seed, eps) in [(8, 0.1), (2, 0.1)] {
        let case = Case::ensemble(seed, 3, 20);
        check_engines_agree(
            &case,
            &settings(eps),
            seed,
            &format!("ensemble seed {seed}"),
        );
    }
}

#[test]
fn rgn_paths_matrix_matches_reference() {
    let case = Case::rgn_paths(3, 3, 20);
    check_engines_agree(&case, &settings(0.08), 3, "RGN paths");
}

/// The matrix alone, on images that are not all correctly classified, with more restarts
/// than one stacked pass of the fast engine would take were the batch large.
#[test]
fn matrix_on_any_images_matches_reference() {
    let case = Case::ensemble(4, 2, 9);
    let s = TransferSettings {
        restarts: 3,
        batch_size: 4,
        ..settings(0.1)
    };
    let seeds = Seeds::new(4);
    let ref_states = case.reference_states();
    let slow = slow::transfer_matrix(
        &case.reference_members(&ref_states),
        &reference::array(&case.pool),
        &case.labels,
        &s,
        &seeds,
    )
    .unwrap();
    let engine = Accelerated::f64_cpu();
    let states = case.accelerated_states();
    let labels: Vec<u32> = case.labels.iter().map(|&y| y as u32).collect();
    let y = Tensor::from_vec(labels, case.labels.len(), &Device::Cpu).unwrap();
    let fast = fast::transfer_matrix(
        &case.accelerated_members(&states),
        &engine.tensor(&case.pool),
        &y,
        &s,
        &seeds,
        &mut |_, _| {},
    )
    .unwrap();
    eprintln!("any images:\n{slow}");
    assert_same(&slow, &fast, "any images");
}

/// Both engines' matrices for `case` under `settings`.
fn both(case: &Case, settings: &TransferSettings, seed: u64) -> [TransferMatrix; 2] {
    let seeds = Seeds::new(seed);
    [
        case.reference_run(settings, &seeds).matrix,
        case.accelerated_run(settings, &seeds).matrix,
    ]
}

/// Sources 0 and 1 are the same network: their columns are equal in every row (their rows
/// differ, since each source has its own random starts).
#[test]
fn identical_members_give_identical_columns() {
    let mut case = Case::ensemble(5, 3, 20);
    case.values[1] = case.values[0].clone();
    for m in both(&case, &settings(0.1), 5) {
        for i in 0..case.sources() {
            assert_eq!(m.success[i][0], m.success[i][1], "row {i}");
            assert_eq!(m.robust[i][0], m.robust[i][1], "row {i}");
            assert_eq!(m.per_restart[i][0], m.per_restart[i][1], "row {i}");
        }
    }
}

/// Restart r's start does not depend on how many restarts run, so 3 restarts fool at least
/// every image 1 restart fools; and within one matrix, every restart's own rate is at most
/// the all-or-nothing rate.
#[test]
fn restarts_only_increase_success() {
    let case = Case::ensemble(6, 2, 20);
    let one = TransferSettings {
        restarts: 1,
        ..settings(0.06)
    };
    let three = TransferSettings {
        restarts: 3,
        ..settings(0.06)
    };
    for (m1, m3) in both(&case, &one, 6).into_iter().zip(both(&case, &three, 6)) {
        for i in 0..case.sources() {
            for j in 0..=case.sources() {
                assert!(m3.success[i][j] >= m1.success[i][j], "({i}, {j})");
                assert_eq!(
                    m3.per_restart[i][j][0], m1.per_restart[i][j][0],
                    "restart 0"
                );
                for (k, (&r1, &r3)) in m1.robust[i][j].iter().zip(&m3.robust[i][j]).enumerate() {
                    assert!(
                        r1 || !r3,
                        "({i}, {j}) image {k}: fooled by 1 restart, not by 3"
                    );
                }
                assert!(m3.per_restart[i][j].iter().all(|&p| p <= m3.success[i][j]));
            }
        }
    }
}

/// With ε = 0 the "adversarial" image is the clean one, which every member (and so the mean
/// softmax) classifies correctly on the all-correct subset.
#[test]
fn zero_eps_fools_nobody_on_the_all_correct_subset() {
    for case in [Case::ensemble(7, 3, 20), Case::rgn_paths(7, 3, 20)] {
        for m in both(&case, &settings(0.0), 7) {
            assert!(m.images > 0);
            assert!(m.success.iter().flatten().all(|&s| s == 0.0), "eps 0:\n{m}");
        }
    }
}

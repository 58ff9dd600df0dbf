//! Property tests for [`LrSchedule`]: PyTorch `MultiStepLR` semantics (per-epoch stepping,
//! lr(e) = base · gamma^#{m <= e}) with a linear warm-up of W epochs (lr(e) = that · (e+1)/W
//! for e < W). Expected values are computed here by counting and repeated multiplication,
//! not with the crate's formula.

use std::collections::BTreeSet;

use eio_spec::schedule::LrSchedule;
use eio_spec::Config;
use proptest::collection::btree_set;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// A fixed number of cases, and failures saved next to this file as
/// `schedule_props.proptest-regressions` (committed, replayed first on every run).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// Epochs examined: every epoch up to past the last possible milestone.
const EPOCHS: usize = 64;

/// A schedule with sorted, distinct milestones in 0..EPOCHS (0 to 6 of them), base in
/// (0, 1], warm-up of 0..=20 epochs, and gamma from `gamma`.
#[derive(Debug, Clone)]
struct Case {
    schedule: LrSchedule,
}

fn schedule(gamma: impl Strategy<Value = f64>) -> impl Strategy<Value = Case> {
    (
        prop_oneof![1e-4..=1.0f64, Just(1.0), Just(0.1)],
        btree_set(0..EPOCHS, 0..=6),
        gamma,
        prop_oneof![0..=20usize, Just(0), Just(1)],
    )
        .prop_map(|(base, milestones, gamma, warmup_epochs)| Case {
            schedule: LrSchedule {
                base,
                milestones: milestones.into_iter().collect(),
                gamma,
                warmup_epochs,
            },
        })
}

/// Any gamma in [0, 2], including 0, 1 and the paper's 0.1.
fn any_gamma() -> impl Strategy<Value = f64> {
    prop_oneof![0.0..=2.0f64, Just(0.0), Just(1.0), Just(0.1)]
}

/// A decaying gamma in [0, 1].
fn decaying_gamma() -> impl Strategy<Value = f64> {
    prop_oneof![0.0..=1.0f64, Just(0.0), Just(1.0), Just(0.1)]
}

/// base · gamma^(number of milestones <= e) · warm-up factor, by counting and multiplying.
fn expected_lr(s: &LrSchedule, epoch: usize) -> f64 {
    let mut lr = s.base;
    for &m in &s.milestones {
        if m <= epoch {
            lr *= s.gamma;
        }
    }
    if epoch < s.warmup_epochs {
        lr * (epoch + 1) as f64 / s.warmup_epochs as f64
    } else {
        lr
    }
}

/// Equal up to a few rounding errors (relative 1e-12), or both (sub)normal-tiny.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()) + 1e-300
}

proptest! {
    #![proptest_config(config(1024))]

    /// Every epoch's lr is base · gamma^#{m <= e} (times (e+1)/W inside the warm-up).
    #[test]
    fn lr_is_base_times_gamma_to_the_milestones_passed(case in schedule(any_gamma())) {
        let s = &case.schedule;
        for epoch in 0..EPOCHS + 8 {
            let (got, want) = (s.lr(epoch), expected_lr(s, epoch));
            prop_assert!(close(got, want), "epoch {}: lr {} but expected {}", epoch, got, want);
        }
    }

    /// After the warm-up, lr is exactly constant from one epoch to the next unless the next
    /// epoch is a milestone, where it is multiplied by gamma.
    #[test]
    fn lr_changes_only_at_milestones(case in schedule(any_gamma())) {
        let s = &case.schedule;
        let milestones: BTreeSet<usize> = s.milestones.iter().copied().collect();
        for epoch in s.warmup_epochs..EPOCHS + 8 {
            let (now, next) = (s.lr(epoch), s.lr(epoch + 1));
            if milestones.contains(&(epoch + 1)) {
                prop_assert!(
                    close(next, now * s.gamma),
                    "milestone {}: lr {} -> {}, gamma {}", epoch + 1, now, next, s.gamma
                );
            } else {
                prop_assert_eq!(next, now, "epoch {} -> {} is not a milestone", epoch, epoch + 1);
            }
        }
    }

    /// With gamma <= 1, lr never increases after the warm-up, and it never exceeds base.
    #[test]
    fn lr_is_non_increasing_after_warmup(case in schedule(decaying_gamma())) {
        let s = &case.schedule;
        for epoch in s.warmup_epochs..EPOCHS + 8 {
            prop_assert!(
                s.lr(epoch + 1) <= s.lr(epoch),
                "lr rose from {} to {} at epoch {}", s.lr(epoch), s.lr(epoch + 1), epoch + 1
            );
        }
        for epoch in 0..EPOCHS + 8 {
            prop_assert!(s.lr(epoch) <= s.base * (1.0 + 1e-12), "epoch {}", epoch);
            prop_assert!(s.lr(epoch) >= 0.0, "epoch {}", epoch);
        }
    }

    /// Without milestones, epoch e < W runs at base · (e+1)/W (rising strictly to base at
    /// e = W - 1), and every later epoch at exactly base.
    #[test]
    fn warmup_is_linear(
        base in prop_oneof![1e-4..=1.0f64, Just(1.0)],
        warmup_epochs in prop_oneof![0..=40usize, Just(0), Just(1)],
    ) {
        let s = LrSchedule { base, milestones: vec![], gamma: 0.1, warmup_epochs };
        for epoch in 0..warmup_epochs {
            let want = base * (epoch + 1) as f64 / warmup_epochs as f64;
            prop_assert!(close(s.lr(epoch), want), "epoch {}: {} vs {}", epoch, s.lr(epoch), want);
            prop_assert!(s.lr(epoch) > 0.0);
            if epoch + 1 < warmup_epochs {
                prop_assert!(s.lr(epoch) < s.lr(epoch + 1), "warm-up must rise at epoch {}", epoch);
            }
        }
        if warmup_epochs > 0 {
            prop_assert!(close(s.lr(warmup_epochs - 1), base));
        }
        for epoch in warmup_epochs..warmup_epochs + 50 {
            prop_assert_eq!(s.lr(epoch), base);
        }
    }
}

/// The paper's schedule: lr 0.1, times 0.1 at epochs 100 and 150 (per-epoch `MultiStepLR`),
/// which is also what the default (paper) config describes.
#[test]
fn paper_schedule_known_answers() {
    let s = LrSchedule {
        base: 0.1,
        milestones: vec![100, 150],
        gamma: 0.1,
        warmup_epochs: 0,
    };
    assert_eq!(Config::default().train.schedule(), s);
    assert_eq!(s.lr(0), 0.1);
    assert_eq!(s.lr(99), 0.1);
    for (epoch, want) in [(100, 0.01), (149, 0.01), (150, 0.001), (199, 0.001)] {
        assert!(
            (s.lr(epoch) - want).abs() < 1e-15,
            "epoch {epoch}: lr {} but the paper says {want}",
            s.lr(epoch)
        );
    }
    assert_eq!(s.lr(100), s.lr(149));
    assert_eq!(s.lr(150), s.lr(199));
    assert!(s.lr(99) > s.lr(100) && s.lr(149) > s.lr(150));
}

/// Known answers with a warm-up and a milestone inside it: W = 4, milestone 2, gamma 0.5.
#[test]
fn warmup_with_a_milestone_inside_known_answers() {
    let s = LrSchedule {
        base: 0.4,
        milestones: vec![2],
        gamma: 0.5,
        warmup_epochs: 4,
    };
    let want = [0.1, 0.2, 0.15, 0.2, 0.2, 0.2];
    for (epoch, want) in want.into_iter().enumerate() {
        assert!(
            (s.lr(epoch) - want).abs() < 1e-15,
            "epoch {epoch}: lr {} but expected {want}",
            s.lr(epoch)
        );
    }
}

//! The checks robustness reviewers apply to an evaluation (Carlini et al. 2019, "On
//! Evaluating Adversarial Robustness"; Athalye et al. 2018), as plain functions over the
//! measured numbers. Every evaluation report carries their results: a breach is printed as a
//! warning and recorded, never hidden.
//!
//! * accuracy does not rise with ε ([`non_increasing_in_eps`]);
//! * white-box accuracy is at most black-box accuracy at the same ε
//!   ([`white_box_at_most_black_box`]): a transfer attack that beats the white-box one means
//!   the white-box attack failed;
//! * an undefended model falls near 0 at large ε ([`undefended_near_zero`]);
//! * the share of images whose input gradient is exactly zero is small
//!   ([`gradient_masking`]): a zero gradient stalls a sign attack (gradient masking);
//! * more PGD steps never raise accuracy ([`converged`], DVERGE's 50 / 500 / 1000-step check);
//!   more restarts cannot raise an all-or-nothing accuracy by construction.

use serde::{Deserialize, Serialize};

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flag {
    /// Short name of the check, e.g. `non-increasing in eps`.
    pub check: String,
    /// What it was applied to, e.g. the model and attack.
    pub subject: String,
    pub passed: bool,
    /// The numbers behind the verdict.
    pub detail: String,
}

impl Flag {
    fn new(check: &str, subject: &str, passed: bool, detail: String) -> Flag {
        Flag {
            check: check.to_string(),
            subject: subject.to_string(),
            passed,
            detail,
        }
    }

    /// `ok` / `WARNING` line for a terminal.
    pub fn line(&self) -> String {
        format!(
            "{} {}: {}: {}",
            if self.passed { "ok:" } else { "WARNING:" },
            self.check,
            self.subject,
            self.detail
        )
    }
}

fn pct(a: f64) -> String {
    format!("{:.1} %", 100.0 * a)
}

/// Accuracy must not rise as ε grows: `points` are (ε, accuracy), any order.
pub fn non_increasing_in_eps(subject: &str, points: &[(f64, f64)]) -> Flag {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let rises: Vec<String> = sorted
        .windows(2)
        .filter(|w| w[1].1 > w[0].1)
        .map(|w| {
            format!(
                "{} at eps {} rises to {} at eps {}",
                pct(w[0].1),
                w[0].0,
                pct(w[1].1),
                w[1].0
            )
        })
        .collect();
    let passed = rises.is_empty();
    let detail = if passed {
        format!("{} radii, never rising", sorted.len())
    } else {
        rises.join("; ")
    };
    Flag::new("non-increasing in eps", subject, passed, detail)
}

/// White-box accuracy must be at most black-box accuracy at every ε both measured.
pub fn white_box_at_most_black_box(
    subject: &str,
    white: &[(f64, f64)],
    black: &[(f64, f64)],
) -> Flag {
    let mut compared = 0;
    let mut breaches = Vec::new();
    for &(eps, w) in white {
        if let Some(&(_, b)) = black.iter().find(|(e, _)| *e == eps) {
            compared += 1;
            if w > b {
                breaches.push(format!(
                    "eps {eps}: white-box {} > black-box {}",
                    pct(w),
                    pct(b)
                ));
            }
        }
    }
    let passed = breaches.is_empty();
    let detail = if compared == 0 {
        "no common radius".to_string()
    } else if passed {
        format!("{compared} common radii")
    } else {
        breaches.join("; ")
    };
    Flag::new("white-box <= black-box", subject, passed, detail)
}

/// Accuracy of an undefended (standard-trained) model at its largest ε must be at most
/// `threshold`.
pub fn undefended_near_zero(subject: &str, points: &[(f64, f64)], threshold: f64) -> Option<Flag> {
    let &(eps, acc) = points.iter().max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(Flag::new(
        "undefended model near 0 at large eps",
        subject,
        acc <= threshold,
        format!("{} at eps {eps} (bound {})", pct(acc), pct(threshold)),
    ))
}

/// The share of images whose whole input gradient is exactly zero must be at most
/// `threshold`; `zero_images` of `images` had one, and `zero_share` of all gradient entries
/// were zero.
pub fn gradient_masking(
    subject: &str,
    zero_images: usize,
    images: usize,
    zero_share: f64,
    threshold: f64,
) -> Flag {
    let share = zero_images as f64 / images.max(1) as f64;
    Flag::new(
        "zero input gradients (gradient masking)",
        subject,
        share <= threshold,
        format!(
            "{zero_images} of {images} images have an all-zero input gradient ({}, bound {}); {} of all entries are zero",
            pct(share),
            pct(threshold),
            pct(zero_share)
        ),
    )
}

/// Accuracy must not rise with more attack steps: `points` are (steps, accuracy).
pub fn converged(subject: &str, points: &[(usize, f64)]) -> Flag {
    let mut sorted = points.to_vec();
    sorted.sort_by_key(|p| p.0);
    let rises: Vec<String> = sorted
        .windows(2)
        .filter(|w| w[1].1 > w[0].1)
        .map(|w| {
            format!(
                "{} steps: {} rises to {} at {} steps",
                w[0].0,
                pct(w[0].1),
                pct(w[1].1),
                w[1].0
            )
        })
        .collect();
    let passed = rises.is_empty();
    let detail = if passed {
        sorted
            .iter()
            .map(|(s, a)| format!("{s} steps {}", pct(*a)))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        rises.join("; ")
    };
    Flag::new("more steps never raise accuracy", subject, passed, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_fails_on_the_breach_it_names() {
        assert!(non_increasing_in_eps("m", &[(0.01, 0.5), (0.03, 0.2), (0.02, 0.3)]).passed);
        let f = non_increasing_in_eps("m", &[(0.01, 0.5), (0.02, 0.6)]);
        assert!(!f.passed);
        assert!(f.detail.contains("rises"), "{}", f.detail);
        assert!(f.line().starts_with("WARNING:"));

        assert!(white_box_at_most_black_box("m", &[(0.01, 0.1)], &[(0.01, 0.1)]).passed);
        assert!(!white_box_at_most_black_box("m", &[(0.01, 0.2)], &[(0.01, 0.1)]).passed);
        assert!(white_box_at_most_black_box("m", &[(0.02, 0.9)], &[(0.01, 0.1)]).passed);

        assert!(
            undefended_near_zero("m", &[(0.01, 0.4), (0.07, 0.02)], 0.05)
                .unwrap()
                .passed
        );
        assert!(
            !undefended_near_zero("m", &[(0.07, 0.2), (0.01, 0.0)], 0.05)
                .unwrap()
                .passed
        );
        assert!(undefended_near_zero("m", &[], 0.05).is_none());

        assert!(gradient_masking("m", 0, 100, 0.0, 0.01).passed);
        assert!(!gradient_masking("m", 5, 100, 0.05, 0.01).passed);

        assert!(converged("m", &[(50, 0.3), (500, 0.2), (1000, 0.2)]).passed);
        assert!(!converged("m", &[(1000, 0.25), (50, 0.2)]).passed);
    }
}

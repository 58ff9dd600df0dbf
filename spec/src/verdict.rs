//! The all-or-nothing evaluation rule (paper Sec. 4.1, after DVERGE).
//!
//! "A sample is judged to be correctly classified only if its 30 (for black-box attack) or 5
//! (for white-box attack) adversarial versions are all correctly classified by the model."
//! An adversarial *version* is one (attack, restart, surrogate, loss) combination at one
//! epsilon. For each epsilon, a [`Verdict`] is told in advance which versions to expect,
//! records the per-image correctness of each, and only then gives the robust accuracy:
//!
//! ```text
//! robust(x) = ∧_{v ∈ versions} correct_v(x),     accuracy = #{x : robust(x)} / #images
//! ```
//!
//! A version that was expected but never recorded is an error, never counted as robust.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Mistakes in assembling a verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerdictError {
    /// An expected version has no result.
    #[error(
        "adversarial version {version:?} has no result; an image cannot count as robust without it"
    )]
    MissingVersion { version: String },
    /// A result for a version nobody asked for.
    #[error("adversarial version {version:?} was not among the expected versions {expected:?}")]
    UnexpectedVersion {
        version: String,
        expected: Vec<String>,
    },
    /// The same version recorded twice.
    #[error("adversarial version {version:?} was recorded twice")]
    DuplicateVersion { version: String },
    /// A result for the wrong number of images.
    #[error("adversarial version {version:?} has {got} results but the evaluation has {expected} images")]
    WrongImageCount {
        version: String,
        got: usize,
        expected: usize,
    },
    /// A verdict that expects no version would call every image robust.
    #[error("an all-or-nothing verdict needs at least one adversarial version")]
    NoVersions,
    /// Two versions with the same name.
    #[error("adversarial version {version:?} is listed twice")]
    RepeatedName { version: String },
}

/// Collects per-version results for one epsilon and applies the all-or-nothing rule.
#[derive(Debug, Clone)]
pub struct Verdict {
    images: usize,
    results: BTreeMap<String, Option<Vec<bool>>>,
}

/// The outcome of an all-or-nothing evaluation at one epsilon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Robustness {
    /// Per image: correctly classified under every version.
    pub robust: Vec<bool>,
    /// Number of robust images.
    pub robust_count: usize,
    /// `robust_count / images`.
    pub accuracy: f64,
    /// Per version: the accuracy under that version alone.
    pub per_version: BTreeMap<String, f64>,
}

impl Verdict {
    /// A verdict over `images` images that expects exactly `versions`.
    ///
    /// # Errors
    /// [`VerdictError::NoVersions`] or [`VerdictError::RepeatedName`].
    pub fn new<S: AsRef<str>>(images: usize, versions: &[S]) -> Result<Self, VerdictError> {
        if versions.is_empty() {
            return Err(VerdictError::NoVersions);
        }
        let mut results = BTreeMap::new();
        for version in versions {
            let name = version.as_ref().to_string();
            if results.insert(name.clone(), None).is_some() {
                return Err(VerdictError::RepeatedName { version: name });
            }
        }
        Ok(Verdict { images, results })
    }

    /// Records which images `version` left correctly classified.
    ///
    /// # Errors
    /// Unexpected or duplicate version, or the wrong number of images.
    pub fn record(&mut self, version: &str, correct: &[bool]) -> Result<(), VerdictError> {
        let expected: Vec<String> = self.results.keys().cloned().collect();
        let slot =
            self.results
                .get_mut(version)
                .ok_or_else(|| VerdictError::UnexpectedVersion {
                    version: version.to_string(),
                    expected,
                })?;
        if slot.is_some() {
            return Err(VerdictError::DuplicateVersion {
                version: version.to_string(),
            });
        }
        if correct.len() != self.images {
            return Err(VerdictError::WrongImageCount {
                version: version.to_string(),
                got: correct.len(),
                expected: self.images,
            });
        }
        *slot = Some(correct.to_vec());
        Ok(())
    }

    /// The all-or-nothing result.
    ///
    /// # Errors
    /// [`VerdictError::MissingVersion`] if any expected version was not recorded.
    pub fn finish(&self) -> Result<Robustness, VerdictError> {
        let mut robust = vec![true; self.images];
        let mut per_version = BTreeMap::new();
        for (version, result) in &self.results {
            let correct = result
                .as_ref()
                .ok_or_else(|| VerdictError::MissingVersion {
                    version: version.clone(),
                })?;
            for (r, &c) in robust.iter_mut().zip(correct) {
                *r &= c;
            }
            per_version.insert(version.clone(), fraction(correct));
        }
        let robust_count = robust.iter().filter(|&&r| r).count();
        Ok(Robustness {
            accuracy: fraction(&robust),
            robust,
            robust_count,
            per_version,
        })
    }
}

/// Share of `true` entries (0 for an empty slice).
fn fraction(flags: &[bool]) -> f64 {
    if flags.is_empty() {
        0.0
    } else {
        flags.iter().filter(|&&f| f).count() as f64 / flags.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_robust_only_if_every_version_failed() {
        let mut v = Verdict::new(4, &["restart-0", "restart-1"]).unwrap();
        v.record("restart-0", &[true, true, false, true]).unwrap();
        v.record("restart-1", &[true, false, true, true]).unwrap();
        let r = v.finish().unwrap();
        assert_eq!(r.robust, vec![true, false, false, true]);
        assert_eq!(r.robust_count, 2);
        assert_eq!(r.accuracy, 0.5);
        assert_eq!(r.per_version["restart-0"], 0.75);
    }

    #[test]
    fn missing_duplicate_and_unexpected_versions_are_errors() {
        let mut v = Verdict::new(2, &["a", "b"]).unwrap();
        v.record("a", &[true, true]).unwrap();
        assert_eq!(
            v.finish().unwrap_err(),
            VerdictError::MissingVersion {
                version: "b".into()
            }
        );
        assert!(matches!(
            v.record("a", &[true, true]),
            Err(VerdictError::DuplicateVersion { .. })
        ));
        assert!(matches!(
            v.record("c", &[true, true]),
            Err(VerdictError::UnexpectedVersion { .. })
        ));
        assert!(matches!(
            v.record("b", &[true]),
            Err(VerdictError::WrongImageCount {
                got: 1,
                expected: 2,
                ..
            })
        ));
        assert_eq!(
            Verdict::new::<&str>(2, &[]).unwrap_err(),
            VerdictError::NoVersions
        );
        assert!(matches!(
            Verdict::new(2, &["a", "a"]),
            Err(VerdictError::RepeatedName { .. })
        ));
    }
}

//! How close two engines' numbers must be, and the one comparison every test uses.
//!
//! A [`Tolerance`] accepts `actual[i]` for `expected[i]` of a compared vector when
//!
//! ```text
//! |a − e| <= rel · max(|a|, |e|)                  (the contract: relative error)
//!         or  <= abs + abs_of_max · s              (the floor),   s = max_j |expected[j]|
//! ```
//!
//! which is `approx::relative_eq!(a, e, epsilon = abs + abs_of_max · s, max_relative = rel)`.
//! The relative bound is the contract. The floor only covers elements that result from
//! cancellation (a gradient entry that is the small difference of large terms, a BatchNorm
//! output near its channel mean): their *absolute* error is set by the size of the terms they
//! were summed from, which is the size of the vector's large elements (`abs_of_max · s`), not
//! by their own size; `abs` covers vectors that are zero as a whole (every element cancels,
//! e.g. the weight gradient of a conv followed by train-mode BatchNorm whose cotangent is
//! constant over the batch), where s is itself round-off. Each preset states its numbers.

/// A relative bound with an absolute floor (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Largest accepted |a − e| / max(|a|, |e|).
    pub rel: f64,
    /// Differences up to `abs + abs_of_max · max_j |expected[j]|` are accepted whatever the
    /// element's own magnitude: the absolute part.
    pub abs: f64,
    /// The part of the absolute floor proportional to the compared vector's largest magnitude.
    pub abs_of_max: f64,
}

impl Tolerance {
    /// f64 engine against the f64 reference: 1e-9 relative.
    ///
    /// Floor 1e-12 of the vector's largest magnitude, plus 1e-13. Both engines compute in f64
    /// (u = 1.1e-16) but sum in different orders (candle's im2col + gemm against the
    /// reference's loops), so an element is off by about u · Σ|terms|, with up to ~10^3 terms
    /// no larger than the vector's large elements. Observed over the default cases plus 40 more
    /// of every f64 property (~56,000 compared vectors): the floor needed beyond the 1e-9
    /// relative bound was at most 7.5e-14 · s (6.1e-14 absolute), on conv weight gradients
    /// in train mode; entries that are zero in exact arithmetic (a conv followed by train-mode
    /// BatchNorm whose cotangent is constant over a one-image batch) came out as noise
    /// ≤ 1.2e-14. The floor is 12 times above what was observed and 1000 times below a
    /// 1e-9 relative error of the vector's large elements, so a wrong formula cannot hide
    /// under it.
    pub const F64_STRICT: Tolerance = Tolerance {
        rel: 1e-9,
        abs: 1e-13,
        abs_of_max: 1e-12,
    };

    /// An f32 engine against the f64 reference on one pass: 1e-4 relative.
    ///
    /// Floor 1e-4 of the vector's largest magnitude, plus 1e-7: every element is within 1e-4
    /// of itself or within 1e-4 of the vector's largest element (the norm-wise form of the
    /// same contract). The f32 engine starts from the reference's values rounded to f32
    /// (6e-8 relative each) and accumulates in f32 (u = 6e-8) through up to 14 layers;
    /// train-mode BatchNorm divides by the batch standard deviation, which carries the absolute
    /// error of a channel's large elements onto its small ones. Observed over 128 cases of
    /// batches of 2-3 images (~72,000 compared vectors): the floor needed beyond the 1e-4
    /// relative bound was at most 1.6e-5 · s (conv weight gradients in train mode), a factor 6
    /// below the floor; a wrong formula (a sign, a factor, a transposed index) moves the large
    /// elements by O(1) relative and fails. Vectors that are zero as a whole in exact
    /// arithmetic (s itself round-off) showed f32 noise up to 7.5e-9 (one ulp of their O(1)
    /// terms); 1e-7 covers that and is below 1e-4 of the smallest non-zero vector compared
    /// (scale 1.4e-3). (Batches of one image are ill-conditioned in train mode, see
    /// `cases::F32_BATCHES`, and are compared in f64 only.)
    pub const F32: Tolerance = Tolerance {
        rel: 1e-4,
        abs: 1e-7,
        abs_of_max: 1e-4,
    };

    /// Bit-for-bit (integers carried as f64: counters, labels, accuracies of whole images).
    pub const EXACT: Tolerance = Tolerance {
        rel: 0.0,
        abs: 0.0,
        abs_of_max: 0.0,
    };

    /// The absolute floor for a vector whose largest |expected| is `scale`.
    pub fn floor(&self, scale: f64) -> f64 {
        self.abs + self.abs_of_max * scale
    }

    /// Whether `actual` is accepted for `expected`, an element of a vector whose largest
    /// |expected| is `scale`. Two NaNs agree; a NaN never agrees with a number; infinities
    /// agree only with themselves.
    pub fn accepts(&self, expected: f64, actual: f64, scale: f64) -> bool {
        match (expected.is_nan(), actual.is_nan()) {
            (true, true) => true,
            (false, false) => {
                expected == actual
                    || approx::relative_eq!(
                        actual,
                        expected,
                        epsilon = self.floor(scale),
                        max_relative = self.rel
                    )
            }
            _ => false,
        }
    }
}

/// The largest finite |x| of a vector (0 for an empty or all-NaN one): the scale of its floor.
pub fn scale_of(v: &[f64]) -> f64 {
    v.iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()))
}

/// The error statistics of one comparison (returned so tests can print their margin).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Closeness {
    /// Largest |a − e|.
    pub worst_abs: f64,
    /// Largest |a − e| / max(|a|, |e|) (0 where both are 0).
    pub worst_rel: f64,
    /// The vector's largest |expected| (the scale of the floor).
    pub scale: f64,
    /// Number of elements compared.
    pub len: usize,
}

fn rel_err(e: f64, a: f64) -> f64 {
    let scale = e.abs().max(a.abs());
    if scale == 0.0 {
        0.0
    } else {
        (a - e).abs() / scale
    }
}

/// Compares two equally long vectors elementwise under `tol` and returns the error statistics;
/// `None` elements of `skip` (same length, `true` = skip) are left out.
fn compare(
    expected: &[f64],
    actual: &[f64],
    tol: Tolerance,
    skip: Option<&[bool]>,
    scale: f64,
) -> Report {
    let mut report = Report {
        scale,
        ..Report::default()
    };
    for (i, (&e, &a)) in expected.iter().zip(actual).enumerate() {
        if skip.is_some_and(|s| s[i]) {
            continue;
        }
        report.compared += 1;
        if e.is_nan() != a.is_nan() {
            report.nan_mismatch.get_or_insert(i);
        }
        if !e.is_nan() && !a.is_nan() {
            let abs = if e == a { 0.0 } else { (a - e).abs() };
            let rel = if e == a { 0.0 } else { rel_err(e, a) };
            let excess = abs - tol.rel * e.abs().max(a.abs());
            if excess > report.needed_floor {
                report.needed_floor = excess;
            }
            if abs > report.worst_abs {
                report.worst_abs = abs;
                report.worst_abs_at = i;
            }
            if rel > report.worst_rel {
                report.worst_rel = rel;
                report.worst_rel_at = i;
            }
        }
        if !tol.accepts(e, a, report.scale) {
            report.failing += 1;
            report.first_failing.get_or_insert(i);
        }
    }
    report
}

#[derive(Debug, Default)]
struct Report {
    scale: f64,
    /// The smallest floor under which every element passes (0 if the relative bound alone
    /// suffices).
    needed_floor: f64,
    compared: usize,
    failing: usize,
    first_failing: Option<usize>,
    nan_mismatch: Option<usize>,
    worst_abs: f64,
    worst_abs_at: usize,
    worst_rel: f64,
    worst_rel_at: usize,
}

/// Asserts that `actual` matches `expected` elementwise under `tol`.
///
/// Fails (panics) on a length mismatch, on a NaN in one vector where the other has a number,
/// and on any element outside the tolerance; the message names `what`, the worst absolute and
/// relative errors with their indices, the number of failing elements and the first failing
/// index with both values. Returns the error statistics otherwise.
#[track_caller]
pub fn assert_close(what: &str, expected: &[f64], actual: &[f64], tol: Tolerance) -> Closeness {
    assert_close_except(what, expected, actual, tol, None)
}

/// [`assert_close`] with the floor's scale given instead of taken from `expected`: for a value
/// computed from larger terms than itself (a loss from its logits or features).
#[track_caller]
pub fn assert_close_with_scale(
    what: &str,
    expected: &[f64],
    actual: &[f64],
    tol: Tolerance,
    scale: f64,
) -> Closeness {
    check(what, expected, actual, tol, None, scale)
}

/// [`assert_close`] that leaves out the elements where `skip[i]` is true (the caller states
/// why, e.g. a sign step taken on a gradient too small for f32 to resolve).
#[track_caller]
pub fn assert_close_except(
    what: &str,
    expected: &[f64],
    actual: &[f64],
    tol: Tolerance,
    skip: Option<&[bool]>,
) -> Closeness {
    check(what, expected, actual, tol, skip, scale_of(expected))
}

#[track_caller]
fn check(
    what: &str,
    expected: &[f64],
    actual: &[f64],
    tol: Tolerance,
    skip: Option<&[bool]>,
    scale: f64,
) -> Closeness {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{what}: length mismatch: expected {} elements, got {}",
        expected.len(),
        actual.len()
    );
    if let Some(s) = skip {
        assert_eq!(s.len(), expected.len(), "{what}: skip mask length");
    }
    let r = compare(expected, actual, tol, skip, scale);
    if let Some(i) = r.nan_mismatch {
        panic!(
            "{what}: NaN mismatch at index {i}: expected {}, got {}",
            expected[i], actual[i]
        );
    }
    if let Some(i) = r.first_failing {
        panic!(
            "{what}: {} of {} elements outside tolerance (rel {:e}, floor {:e} = {:e} + {:e} x scale {:e}); \
             first failing index {i}: expected {:e}, got {:e} (abs err {:e}, rel err {:e}); \
             worst abs err {:e} at {}, worst rel err {:e} at {}",
            r.failing,
            r.compared,
            tol.rel,
            tol.floor(r.scale),
            tol.abs,
            tol.abs_of_max,
            r.scale,
            expected[i],
            actual[i],
            (actual[i] - expected[i]).abs(),
            rel_err(expected[i], actual[i]),
            r.worst_abs,
            r.worst_abs_at,
            r.worst_rel,
            r.worst_rel_at,
        );
    }
    if std::env::var_os(MARGINS_ENV).is_some() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "margin: {what}: worst abs {:e} worst rel {:e} over {} scale {:e} needed floor {:e} (tolerance rel {:e} floor {:e})",
            r.worst_abs,
            r.worst_rel,
            r.compared,
            r.scale,
            r.needed_floor,
            tol.rel,
            tol.floor(r.scale)
        );
    }
    Closeness {
        worst_abs: r.worst_abs,
        worst_rel: r.worst_rel,
        scale: r.scale,
        len: r.compared,
    }
}

/// Set this environment variable to print every comparison's worst errors (to see the margin
/// below each tolerance).
pub const MARGINS_ENV: &str = "EIO_TESTS_MARGINS";

/// Asserts two scalars are close (a one-element [`assert_close`]).
#[track_caller]
pub fn assert_close_scalar(what: &str, expected: f64, actual: f64, tol: Tolerance) -> Closeness {
    assert_close(what, &[expected], &[actual], tol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_within_relative_or_absolute() {
        let t = Tolerance {
            rel: 1e-3,
            abs: 1e-6,
            abs_of_max: 1e-4,
        };
        assert!(t.accepts(1.0, 1.0005, 1.0));
        assert!(!t.accepts(1.0, 1.002, 1.0));
        assert!(t.accepts(0.0, 5e-7, 0.0));
        assert!(!t.accepts(0.0, 5e-6, 0.0));
        // The floor grows with the vector's scale: 1e-6 + 1e-4 * 100 = 1.0000001e-2.
        assert!(t.accepts(0.0, 9e-3, 100.0));
        assert!(!t.accepts(0.0, 2e-2, 100.0));
        assert!(t.accepts(f64::NAN, f64::NAN, 1.0));
        assert!(!t.accepts(f64::NAN, 0.0, 1.0));
        assert!(t.accepts(f64::INFINITY, f64::INFINITY, 1.0));
        assert!(!t.accepts(f64::INFINITY, f64::NEG_INFINITY, 1.0));
        assert!(Tolerance::EXACT.accepts(3.0, 3.0, 3.0));
        assert!(!Tolerance::EXACT.accepts(3.0, 3.0 + f64::EPSILON * 4.0, 3.0));
    }

    #[test]
    fn reports_worst_errors() {
        let c = assert_close(
            "v",
            &[1.0, 2.0, 0.0],
            &[1.0, 2.0 + 1e-12, 0.0],
            Tolerance::F64_STRICT,
        );
        assert!(c.worst_abs > 0.0 && c.worst_rel < 1e-9);
    }

    #[test]
    #[should_panic(expected = "first failing index 1")]
    fn names_first_failing_index() {
        assert_close("v", &[1.0, 2.0, 3.0], &[1.0, 2.1, 3.1], Tolerance::F32);
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn fails_on_length_mismatch() {
        assert_close("v", &[1.0, 2.0], &[1.0], Tolerance::F32);
    }

    #[test]
    #[should_panic(expected = "NaN mismatch at index 0")]
    fn fails_on_nan_mismatch() {
        assert_close("v", &[f64::NAN], &[1.0], Tolerance::F32);
    }

    #[test]
    fn skips_masked_elements() {
        let c = assert_close_except(
            "v",
            &[1.0, 2.0],
            &[1.0, 9.0],
            Tolerance::F64_STRICT,
            Some(&[false, true]),
        );
        assert_eq!(c.len, 1);
    }
}

//! Central finite-difference gradient checking.
//!
//! Every hand-written backward pass in this crate is proven against the
//! numerical derivative computed here, and later model-level tests use the
//! same helper.
//!
//! # Definitions
//!
//! For a scalar function `f: R^n -> R`, the central difference estimate of
//! the partial derivative along coordinate `i` is
//!
//! ```text
//! n_i = (f(x + h e_i) - f(x - h e_i)) / (2 h)
//! ```
//!
//! where `e_i` is the `i`-th unit vector and `h` the step ([`DEFAULT_STEP`] =
//! `1e-6` unless the caller picks another). Its truncation error is
//! `O(h^2)` (zero for functions that are at most quadratic along `e_i`,
//! e.g. conv and linear layers), and its round-off error is roughly
//! `eps_machine * |f| / h`, so keep the checked function's value small
//! (small tensors, a weighted sum with weights of order one).
//!
//! The error between an analytic derivative `a` and a numeric one `n` is
//!
//! ```text
//! rel(a, n) = |a - n| / max(floor, |a| + |n|)
//! ```
//!
//! with `floor` = [`DEFAULT_FLOOR`] = `1e-8` unless the caller picks another.
//! When both values are far above `floor` this is a true relative error
//! (at most 1, reached when the signs differ); when both are tiny it degrades
//! to an absolute error `|a - n| / floor`, so two values that are both
//! essentially zero compare as equal. A check reports the maximum of `rel`
//! over all coordinates.
//!
//! To check a tensor-valued function `y = g(x)` with a backward `g'`, reduce
//! it to a scalar with fixed random weights `w` of the output's shape:
//! `f(x) = sum(w * g(x))` (see [`weighted_sum`]); the analytic gradient of
//! `f` is then the backward pass applied to the upstream gradient `w`.
//!
//! A gradient that is not the derivative of the network itself, SGM's (Wu et al. 2020,
//! `model::backward_with`), is the derivative of a rescaled network, the "scaled graph"
//! [`sgm_scaled_logits`], whose finite differences check it.

use eio_spec::plan::{NodeId, Plan};
use eio_spec::Path;
use ndarray::{Array, Array2, Array4, ArrayD, Dimension, Zip};

use crate::model::{forward_node, to2, Trace};
use crate::state::ModelState;

/// The default finite-difference step `h`.
pub const DEFAULT_STEP: f64 = 1e-6;

/// The default floor of the relative-error denominator.
pub const DEFAULT_FLOOR: f64 = 1e-8;

/// The settings of one gradient check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradCheckConfig {
    /// The finite-difference step `h`.
    pub step: f64,
    /// The floor of the denominator of [`relative_error`].
    pub floor: f64,
}

impl Default for GradCheckConfig {
    /// `h = 1e-6`, `floor = 1e-8`.
    fn default() -> Self {
        Self {
            step: DEFAULT_STEP,
            floor: DEFAULT_FLOOR,
        }
    }
}

/// The relative error `|a - b| / max(floor, |a| + |b|)` (see the module
/// documentation). Symmetric in `a` and `b`; `NaN` if either is `NaN`.
pub fn relative_error(a: f64, b: f64, floor: f64) -> f64 {
    (a - b).abs() / floor.max(a.abs() + b.abs())
}

/// `sum_i w_i * y_i`: reduces a tensor to a scalar so that its gradient with
/// respect to `y` is exactly `w`.
///
/// # Panics
///
/// If `y` and `w` have different shapes.
pub fn weighted_sum<D: Dimension>(y: &Array<f64, D>, w: &Array<f64, D>) -> f64 {
    assert_eq!(
        y.shape(),
        w.shape(),
        "weighted_sum: value shape {:?} != weight shape {:?}",
        y.shape(),
        w.shape()
    );
    let mut total = 0.0;
    Zip::from(y).and(w).for_each(|&a, &b| total += a * b);
    total
}

/// The central finite-difference gradient of the scalar function `f` at `x`
/// with step `h`: element `i` is `(f(x + h e_i) - f(x - h e_i)) / (2 h)`.
///
/// `f` is evaluated `2 * x.len()` times, each time on a copy of `x` with one
/// element perturbed.
pub fn numerical_gradient<D, F>(mut f: F, x: &Array<f64, D>, h: f64) -> Array<f64, D>
where
    D: Dimension,
    F: FnMut(&Array<f64, D>) -> f64,
{
    // A row-major (standard layout) copy, so that flat position `i` of the
    // slice is the `i`-th element in logical order.
    let mut probe = x.as_standard_layout().into_owned();
    let mut grad = Array::<f64, D>::zeros(x.raw_dim());
    let n = probe.len();
    for i in 0..n {
        let original = slice_of(&mut probe)[i];
        slice_of(&mut probe)[i] = original + h;
        let plus = f(&probe);
        slice_of(&mut probe)[i] = original - h;
        let minus = f(&probe);
        slice_of(&mut probe)[i] = original;
        slice_of(&mut grad)[i] = (plus - minus) / (2.0 * h);
    }
    grad
}

/// The elements of a freshly created standard-layout array as a slice.
fn slice_of<D: Dimension>(a: &mut Array<f64, D>) -> &mut [f64] {
    a.as_slice_mut()
        .expect("grad_check: internal arrays are created in standard layout")
}

/// The outcome of comparing an analytic gradient with a numerical one.
#[derive(Debug, Clone)]
pub struct GradCheckReport<D: Dimension> {
    /// The maximum [`relative_error`] over all elements (0 for empty tensors).
    pub max_relative_error: f64,
    /// The flat row-major position of the worst element (0 for empty tensors).
    pub worst_flat_index: usize,
    /// The analytic gradient that was checked.
    pub analytic: Array<f64, D>,
    /// The central finite-difference gradient.
    pub numeric: Array<f64, D>,
}

impl<D: Dimension> GradCheckReport<D> {
    /// Panics with a descriptive message unless
    /// `max_relative_error < tolerance` (a `NaN` error fails).
    pub fn assert_below(&self, tolerance: f64, what: &str) {
        let ok = self.max_relative_error < tolerance;
        if !ok {
            let a = self.analytic.iter().nth(self.worst_flat_index);
            let n = self.numeric.iter().nth(self.worst_flat_index);
            panic!(
                "gradient check failed for {what}: max relative error {:e} >= {:e} \
                 at flat index {} (analytic {:?}, numeric {:?})",
                self.max_relative_error, tolerance, self.worst_flat_index, a, n
            );
        }
    }
}

/// Compares `analytic` (the claimed gradient of `f` at `x`) with the central
/// finite-difference gradient of `f` at `x`.
///
/// # Panics
///
/// If `analytic` and `x` have different shapes.
pub fn check_gradient<D, F>(
    f: F,
    x: &Array<f64, D>,
    analytic: &Array<f64, D>,
    config: GradCheckConfig,
) -> GradCheckReport<D>
where
    D: Dimension,
    F: FnMut(&Array<f64, D>) -> f64,
{
    assert_eq!(
        x.shape(),
        analytic.shape(),
        "check_gradient: input shape {:?} != analytic gradient shape {:?}",
        x.shape(),
        analytic.shape()
    );
    let numeric = numerical_gradient(f, x, config.step);
    let mut max_relative_error = 0.0;
    let mut worst_flat_index = 0;
    for (i, (&a, &n)) in analytic.iter().zip(numeric.iter()).enumerate() {
        let e = relative_error(a, n, config.floor);
        // The first NaN is reported as the worst element and is kept.
        let worse = e > max_relative_error || (e.is_nan() && !max_relative_error.is_nan());
        if worse {
            max_relative_error = e;
            worst_flat_index = i;
        }
    }
    GradCheckReport {
        max_relative_error,
        worst_flat_index,
        analytic: analytic.clone(),
        numeric,
    }
}

/// One residual add of SGM's scaled graph ([`sgm_scaled_logits`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaledAdd {
    /// The [`Op::Add`](eio_spec::plan::Op::Add) node.
    pub add: NodeId,
    /// f, the factor on the residual branch (`SkipGradient::branch_factor`).
    pub branch: f64,
    /// c, the factor on the whole block: 1/std(g) under SGM's normalisation, else 1.
    pub block: f64,
}

/// SGM's "scaled graph" around the pass `at` (a trace of `plan`, `state` and `path` at an
/// input x, in `at.mode`), evaluated at `x_prime`: the network's logits, except that every add
/// of `adds` computes
///
/// ```text
/// y = y₀ + c·(f·(r(x') − r₀) + (s(x') − s₀))
/// ```
///
/// with r₀ = r(x), s₀ = s(x), y₀ = y(x) read from `at` (r the add's `inputs[0]`, the residual
/// branch; s its `inputs[1]`, the skip path). At x' = x every add returns y₀, so G(x) is the
/// network's output, and G's gradient at x is the plain one except that each listed add passes
/// c·f·g into its branch and c·g into its skip: the SGM gradient of `model::backward_with`
/// (Wu et al. 2020), which central finite differences of G then check.
///
/// # Panics
/// If `at` is not a full pass of this plan, or `x_prime` does not fit it.
pub fn sgm_scaled_logits(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    at: &Trace,
    x_prime: &Array4<f64>,
    adds: &[ScaledAdd],
) -> Array2<f64> {
    let end = plan.logits();
    let mut outputs: Vec<ArrayD<f64>> = Vec::with_capacity(end + 1);
    for id in 0..=end {
        let out = sgm_scaled_node(plan, state, path, at, id, &outputs, x_prime, adds);
        outputs.push(out);
    }
    to2(&outputs[end])
}

/// Node `id` of [`sgm_scaled_logits`]'s graph, given the outputs of the nodes before it
/// (`outputs[k]`, k < `id`): the scaled add if `id` is in `adds`, else the plain node. A test
/// can run the graph on from an inner node with this (to differentiate with respect to that
/// node's output).
///
/// # Panics
/// As [`sgm_scaled_logits`], or if `outputs` lacks an input of the node.
#[allow(clippy::too_many_arguments)] // the scaled graph's arguments plus the node and its inputs
pub fn sgm_scaled_node(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    at: &Trace,
    id: NodeId,
    outputs: &[ArrayD<f64>],
    x_prime: &Array4<f64>,
    adds: &[ScaledAdd],
) -> ArrayD<f64> {
    match adds.iter().find(|a| a.add == id) {
        Some(scaled) => {
            let node = &plan.nodes[id];
            let (r, s) = (&outputs[node.inputs[0]], &outputs[node.inputs[1]]);
            let (r0, s0) = (at.output(node.inputs[0]), at.output(node.inputs[1]));
            let change = (r - r0) * scaled.branch + (s - s0);
            at.output(id) + &(change * scaled.block)
        }
        None => forward_node(plan, state, path, id, outputs, x_prime, at.mode).0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1};

    #[test]
    fn relative_error_definition() {
        assert_eq!(relative_error(1.0, 1.0, 1e-8), 0.0);
        assert!((relative_error(1.0, 3.0, 1e-8) - 0.5).abs() < 1e-15);
        assert!((relative_error(1.0, -1.0, 1e-8) - 1.0).abs() < 1e-15);
        // Both tiny: the floor takes over.
        assert!((relative_error(1e-12, 3e-12, 1e-8) - 2e-4).abs() < 1e-15);
        assert!(relative_error(f64::NAN, 1.0, 1e-8).is_nan());
    }

    #[test]
    fn numerical_gradient_of_cubic() {
        // f(x) = sum x_i^3, gradient 3 x_i^2.
        let x: Array1<f64> = array![0.5, -1.25, 2.0];
        let g = numerical_gradient(|v| v.iter().map(|a| a * a * a).sum(), &x, 1e-5);
        for (gi, xi) in g.iter().zip(x.iter()) {
            assert!(
                (gi - 3.0 * xi * xi).abs() < 1e-8,
                "{gi} vs {}",
                3.0 * xi * xi
            );
        }
    }

    #[test]
    fn check_gradient_detects_a_wrong_gradient() {
        let x: Array1<f64> = array![0.5, -1.25, 2.0];
        let f = |v: &Array1<f64>| v.iter().map(|a| a * a).sum::<f64>();
        let good = x.mapv(|a| 2.0 * a);
        check_gradient(f, &x, &good, GradCheckConfig::default()).assert_below(1e-8, "x^2");
        let mut bad = good.clone();
        bad[1] *= 1.001;
        let report = check_gradient(f, &x, &bad, GradCheckConfig::default());
        assert_eq!(report.worst_flat_index, 1);
        assert!(report.max_relative_error > 1e-4);
    }

    #[test]
    fn check_gradient_reports_nan_as_failure() {
        let x: Array1<f64> = array![1.0, 2.0, 3.0];
        let analytic = array![2.0, f64::NAN, 6.0];
        let report = check_gradient(
            |v| v.iter().map(|a| a * a).sum(),
            &x,
            &analytic,
            GradCheckConfig::default(),
        );
        assert!(report.max_relative_error.is_nan());
        assert_eq!(report.worst_flat_index, 1);
        let caught = std::panic::catch_unwind(|| report.assert_below(1e-6, "nan"));
        assert!(caught.is_err(), "a NaN error must fail the check");
    }

    #[test]
    fn numerical_gradient_walks_non_standard_layouts_in_logical_order() {
        // A transposed (column-major) view: element (i, j) must get the
        // derivative with respect to element (i, j).
        let base = array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let x = base.t().to_owned();
        let weights = array![[1.0, 10.0], [100.0, 1000.0], [1e4, 1e5]];
        let g = numerical_gradient(|v| (v * &weights).sum(), &x, 1e-3);
        for (a, b) in g.iter().zip(weights.iter()) {
            assert!((a - b).abs() < 1e-6 * b, "{a} vs {b}");
        }
    }

    #[test]
    #[should_panic(expected = "gradient check failed")]
    fn assert_below_panics_on_failure() {
        let x: Array1<f64> = array![1.0];
        let wrong = array![0.0];
        check_gradient(|v| v[0] * v[0], &x, &wrong, GradCheckConfig::default())
            .assert_below(1e-6, "wrong");
    }
}

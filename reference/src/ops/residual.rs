//! The residual (skip) connection's addition.

use ndarray::{Array, Dimension};

/// `y = a + b` elementwise (the ResNet shortcut sum, before its ReLU).
///
/// # Panics
///
/// If `a` and `b` shapes differ (no broadcasting).
pub fn residual_add<D: Dimension>(a: &Array<f64, D>, b: &Array<f64, D>) -> Array<f64, D> {
    assert_eq!(
        a.shape(),
        b.shape(),
        "residual_add: shapes {:?} and {:?} differ",
        a.shape(),
        b.shape()
    );
    a + b
}

/// The gradients of a loss `L` through [`residual_add`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResidualAddGrads<D: Dimension> {
    /// `dL/da`.
    pub lhs: Array<f64, D>,
    /// `dL/db`.
    pub rhs: Array<f64, D>,
}

/// Backward of [`residual_add`]: `dL/da = dL/db = g` with `g = dL/dy`
/// (`grad_output`); both are copies of the upstream gradient.
pub fn residual_add_backward<D: Dimension>(grad_output: &Array<f64, D>) -> ResidualAddGrads<D> {
    ResidualAddGrads {
        lhs: grad_output.clone(),
        rhs: grad_output.clone(),
    }
}

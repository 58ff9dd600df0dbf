//! Tensor operations with hand-written forward and backward passes.
//!
//! Conventions shared by every op:
//!
//! - Feature maps are `Array4<f64>` in NCHW order (`[batch, channels,
//!   height, width]`); vectors are `Array2<f64>` in `[batch, features]`.
//! - Each op has a forward function and a `*_backward` function. A backward
//!   takes the upstream gradient `dL/d(output)` (called `grad_output`, same
//!   shape as the forward output) together with what it needs from the
//!   forward inputs, and returns `dL/d(input)` and `dL/d(parameter)` for each
//!   parameter (in a small named struct when there is more than one).
//! - Shapes come from a validated plan, so a shape mismatch is a bug: the ops
//!   `assert!` with a message naming the op and the shapes (see each
//!   function's `# Panics`).
//! - Clarity over speed: plain nested loops over f64.

pub mod activation;
pub mod batch_norm;
pub mod conv;
pub mod linear;
pub mod normalize;
pub mod pool;
pub mod residual;

pub use activation::{leaky_relu, leaky_relu_backward, relu, relu_backward};
pub use batch_norm::{
    batch_norm2d, batch_norm2d_backward, BatchNorm2dGrads, BatchNorm2dOutput, BnMode,
    BnRunningStats, BN_EPS, BN_MOMENTUM,
};
pub use conv::{conv2d, conv2d_backward, conv2d_output_size, Conv2dGrads};
pub use linear::{linear, linear_backward, LinearGrads};
pub use normalize::{normalize, normalize_backward};
pub use pool::{global_avg_pool, global_avg_pool_backward, max_pool2x2, max_pool2x2_backward};
pub use residual::{residual_add, residual_add_backward, ResidualAddGrads};

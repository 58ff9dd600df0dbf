//! Tensor operations with hand-written forward and backward passes.

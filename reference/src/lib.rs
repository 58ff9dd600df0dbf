//! `eio-reference`: the slow, readable f64 oracle of Ensemble-in-One.
pub mod ops;

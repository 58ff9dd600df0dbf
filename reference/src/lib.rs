//! `eio-reference`: the slow, readable f64 oracle of Ensemble-in-One.
pub mod grad_check;
pub mod loss;
pub mod ops;
pub mod optim;

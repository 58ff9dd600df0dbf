//! `eio-reference`: the slow, readable f64 oracle of Ensemble-in-One.
//!
//! Read it in the paper's order: [`model`] is the RGN of Sec. 3.2 along one path (Eq. 1),
//! [`distill`] is Eq. 2, [`eio`] is Eq. 3-4 and Algorithm 1, [`attack`] and [`evaluate`] are
//! the all-or-nothing evaluation of Sec. 4.1 (with the black-box suite's transfer attacks:
//! [`momentum`] for MI-FGSM, [`input_diversity`] for DI²-FGSM, SGM in
//! [`model::backward_with`]). Everything the paper decides (architecture, gates,
//! paths, layers, random draws, the verdict rule) comes from `eio-spec`; this crate does the
//! tensor math, in f64 with plain loops and hand-written gradients.
pub mod adp;
pub mod alignment;
pub mod attack;
pub mod distill;
pub mod dverge;
pub mod eio;
pub mod ensemble;
pub mod evaluate;
pub mod gal;
pub mod grad_check;
pub mod input_diversity;
pub mod loss;
pub mod model;
pub mod momentum;
pub mod ops;
pub mod optim;
pub mod second_order;
pub mod state;
pub mod transfer_matrix;
pub mod trs;

//! `eio-spec`: Ensemble-in-One (EIO) as plain Rust, with no tensor math.
//!
//! What the paper says is written once, here, and both engines read it: the slow
//! `eio-reference` oracle and the fast `eio-accelerated` implementation. `spec/SPEC.md` maps
//! every equation, Algorithm 1 line and evaluation rule to the item below that implements it.
//!
//! | module | paper |
//! |---|---|
//! | [`config`] | every setting, with the paper's values as defaults and the authors' code as presets |
//! | [`plan`] | Sec. 3.2: the network as data, its RGBs, distillation layers and parameter names |
//! | [`gates`] | Eq. 1: paths and uniform gate sampling |
//! | [`sampler`] | Algorithm 1 line 12: p paths with distinct prefixes |
//! | [`sampler_check`] | the sampler's invariants, shared by tests and the fuzzer |
//! | [`schedule`] | the learning-rate schedule |
//! | [`verdict`] | Sec. 4.1: all-or-nothing accuracy |
//! | [`rng`] | every random choice, from one seed |
//! | [`attack`] | Sec. 4.1: PGD settings (momentum, input diversity, SGM), white-box versions and their seeds |
//! | [`blackbox`] | Sec. 4.1: the black-box transfer suite's versions, jobs, seeds and shards |
//! | [`sanity`] | the checks every evaluation report carries |
//! | [`rivals`] | the rival methods' settings (DVERGE, ADP, GAL, TRS), `eio run`'s rivals |
//! | [`noise`] | GAL's seeded Gaussian-noise augmentation |
//! | [`transfer_matrix`] | DVERGE's transferability matrix: settings, image subset, verdicts |

pub mod attack;
pub mod blackbox;
pub mod config;
pub mod figure;
pub mod gates;
pub mod noise;
pub mod plan;
pub mod rivals;
pub mod rng;
pub mod sampler;
pub mod sampler_check;
pub mod sanity;
pub mod schedule;
pub mod transfer_matrix;
pub mod verdict;

pub use config::{Config, Preset};
pub use gates::{Path, PathSpace};
pub use plan::Plan;

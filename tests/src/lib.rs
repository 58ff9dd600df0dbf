//! `eio-tests`: the conformance suite of eio.
//!
//! The accelerated engine (candle, f32/f64, CPU/CUDA) must compute what the f64 reference
//! computes. Both are driven through one narrow trait, [`engine::Engine`], by thin adapters
//! ([`reference::Reference`], [`accelerated::Accelerated`]); the checks in [`checks`] are
//! written once against that trait and compare under a [`tolerance::Tolerance`]; [`cases`]
//! holds the proptest strategies and the seeded host data. The integration tests in
//! `tests/tests/` pick engines, tolerances and cases:
//!
//! | file | what |
//! |---|---|
//! | `f64_passes.rs` | f64 CPU vs reference at 1e-9: forward (every layer, BN train/eval), parameter and input gradients, both sharing modes, VGG-16 |
//! | `f64_optim.rs` | SGD (Nesterov, weight decay, `None` gradients) and Adam over 3 steps |
//! | `f64_distill.rs` | whole Eq. 2 runs step by step, with the sign-tie rule |
//! | `f64_eio.rs` | one Eq. 4 iteration (path losses, distillation losses, final state) and clean pre-training |
//! | `f64_attack.rs` | PGD (CE, C&W; path, ensemble of 2, randomised with EOT 2) and the white-box report |
//! | `f64_transfer_attacks.rs` | momentum PGD, M-DI²-FGSM and SGM (CE, C&W, DVERGE's C&W; every target kind), the input-diversity transform and its adjoint, known answers of both |
//! | `f64_second_order.rs` | ∂⟨∇ₓL, v⟩/∂θ and /∂x (GAL's and TRS's second order) at 1e-9 in f64 and 1e-4 in f32, both BN modes, ReLU/LeakyReLU, ResNet and VGG |
//! | `f64_rivals.rs` | two iterations of ADP, DVERGE (plus-adv, its coeff), GAL and TRS (with and without the smoothness PGD) over 2 and 3 members, SGD and Adam: losses, terms, every member's state |
//! | `f64_transfer_matrix.rs` | the transferability matrix: all-correct pool, subset, per-restart counts and verdicts, ensembles and RGN paths |
//! | `checkpoint.rs` | safetensors checkpoints written by one engine and read by another, bit for bit |
//! | `f32_cpu.rs` | f32 CPU: single passes at 1e-4; multi-step sign attacks (PGD and the transfer attacks) by their first step and a bound |
//! | `cuda.rs` | the f32 single passes on CUDA (`--features cuda` and `EIO_DEVICE=cuda`), else a visible skip |
//! | `snapshot.rs` | one insta snapshot that the reference and the f64 engine must both produce |

pub mod accelerated;
pub mod cases;
pub mod checks;
pub mod engine;
pub mod reference;
pub mod tolerance;

pub use accelerated::Accelerated;
pub use engine::{Engine, Outcome, Skip};
pub use reference::Reference;
pub use tolerance::{assert_close, Tolerance};

//! `eio-accelerated`: the fast Ensemble-in-One engine, on candle.
//!
//! The same system as `eio-reference`, organised the same way: [`model`] interprets the
//! `eio-spec` plan with explicit forward and backward passes, every tensor operation goes
//! through the one seam in [`ops`], and every decision (architecture, gates, paths, layers,
//! random draws, the verdict rule) comes from `eio-spec`. Host-side seeded draws are uploaded
//! with `Tensor::from_vec`; candle's own random number generators are never used.
//!
//! f32 and f64 on the CPU; CUDA with the `cuda` feature, chosen at run time ([`device`]).

pub mod adp;
pub mod attack;
pub mod blackbox;
pub mod checkpoint;
pub mod derive;
pub mod device;
pub mod distill;
pub mod dverge;
pub mod eio;
pub mod ensemble;
pub mod evaluate;
pub mod experiment;
pub mod gal;
pub mod integrity;
pub mod method;
pub mod model;
pub mod ops;
pub mod optim;
pub mod path_batching;
pub mod plot;
pub mod pytorch;
pub mod safe_write;
pub mod sanity;
pub mod second_order;
pub mod state;
pub mod sweep;
pub mod train;
pub mod transfer_matrix;
pub mod trs;
pub mod verify;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A tensor operation failed on the device.
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
    #[error("tensor {name:?} is missing")]
    MissingTensor { name: String },
    #[error("tensor {name:?} is not part of the plan")]
    UnexpectedTensor { name: String },
    #[error("tensor {name:?} has shape {got:?}, the plan says {expected:?}")]
    BadShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("cannot write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// An all-or-nothing verdict could not be formed.
    #[error(transparent)]
    Verdict(#[from] eio_spec::verdict::VerdictError),
    #[error("device {requested:?} is not available: {reason}")]
    Device { requested: String, reason: String },
}

/// An error and its causes as one line, `error: cause: cause ...` (for errors flattened into a
/// message or a report).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

//! What the rival ensemble methods share on the device (`eio_reference::ensemble` documents
//! it): each member's plain path, the report of one training iteration, and the optimiser step
//! over a member's learnable tensors.

use candle_core::{Result, Tensor};
use eio_spec::plan::Role;
use eio_spec::{Path, Plan};

use crate::model::Gradients;
use crate::optim::Optimiser;
use crate::state::ModelState;

/// What one training iteration of an ensemble method did
/// (`eio_reference::ensemble::MethodReport`).
#[derive(Debug, Clone, PartialEq)]
pub struct MethodReport {
    /// The method's total training loss of the batch, before the update (the sum of every
    /// member's loss where members are updated one after another, as DVERGE).
    pub loss: f64,
    /// The named terms the loss is built from, each as the method defines it (for example
    /// ADP's `("ce", Σ_m CE_m)`, `("entropy", H(p̄))`, `("log_det", mean_b log det)`); their
    /// signs and weights are the method's, documented where it builds the report.
    pub terms: Vec<(&'static str, f64)>,
    /// For methods that distil (DVERGE): the mean over members of each member's
    /// feature-matching loss before its last distillation step.
    pub distill_loss: Option<f64>,
    /// Sign ties over every sign step of the iteration (distillations).
    pub sign_ties: usize,
}

/// The path of a plain member: gate 0 at every one of the plan's K gates.
pub fn member_path(plan: &Plan) -> Path {
    Path::new(vec![0; plan.k()])
}

/// One optimiser step over every learnable tensor of `plan` in `state`; a tensor without a
/// gradient in `grads` gets a zero one (weight decay and momentum still act).
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If `state` lacks a learnable tensor of the plan.
pub fn optimiser_step(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Optimiser,
    grads: &Gradients,
) -> Result<()> {
    for spec in plan.params.iter().filter(|p| p.role == Role::Learnable) {
        let param = state.tensor(&spec.name).clone();
        let zero: Tensor;
        let grad = match grads.params.get(&spec.name) {
            Some(g) => g,
            None => {
                zero = param.zeros_like()?;
                &zero
            }
        };
        let updated = optimiser.step_param(&spec.name, &param, Some(grad))?;
        state.tensors.insert(spec.name.clone(), updated);
    }
    Ok(())
}

/// A scalar tensor as f64.
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

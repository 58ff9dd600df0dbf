//! What the rival ensemble methods share (`train.method` = `dverge`, `adp`, and the methods
//! that follow them): the member's path, the report of one training iteration, and the
//! optimiser step over a member's learnable tensors.
//!
//! A member of an ensemble method is a plain network (`model.n = 1`), i.e. the RGN along its
//! one path, all gates 0 ([`member_path`]). Each member has its own [`ModelState`] and its own
//! [`Optimiser`] (DVERGE's `get_optimizers`: one SGD per member; one Adam over all members, as
//! ADP's and GAL's ports build it, is exactly one Adam per member, see [`Optimiser`]).

use eio_spec::plan::Role;
use eio_spec::{Path, Plan};
use ndarray::ArrayD;

use crate::model::Gradients;
use crate::optim::Optimiser;
use crate::state::ModelState;

/// What one training iteration of an ensemble method did.
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
    /// Sign ties over every sign step of the iteration (distillations), as Eq. 2 counts them.
    pub sign_ties: usize,
}

/// The path of a plain member: gate 0 at every one of the plan's K gates (with `model.n = 1`
/// the only path).
pub fn member_path(plan: &Plan) -> Path {
    Path::new(vec![0; plan.k()])
}

/// One optimiser step over every learnable tensor of `plan` in `state`: a tensor without a
/// gradient in `grads` gets a zero one (weight decay and momentum still act, as on a PyTorch
/// parameter whose `.grad` was zeroed), so every member parameter moves at every step.
///
/// # Panics
/// If `state` lacks a learnable tensor of the plan, or as [`Optimiser::step_param`].
pub fn optimiser_step(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Optimiser,
    grads: &Gradients,
) {
    for spec in plan.params.iter().filter(|p| p.role == Role::Learnable) {
        let zero;
        let grad = match grads.params.get(&spec.name) {
            Some(g) => g,
            None => {
                zero = ArrayD::zeros(spec.shape.as_slice());
                &zero
            }
        };
        let param = state
            .tensors
            .get_mut(&spec.name)
            .unwrap_or_else(|| panic!("model state has no tensor {:?}", spec.name));
        optimiser.step_param(&spec.name, param, Some(grad));
    }
}

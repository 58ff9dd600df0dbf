//! Eq. 3-4 and Algorithm 1 on the device: one EIO iteration and the clean pre-training
//! iteration (semantics in `eio_reference::eio`).

use candle_core::{Result, Tensor};
use eio_spec::config::{BnMode, Config, LossScale, UnusedParams};
use eio_spec::plan::Role;
use eio_spec::sampler::IterationDraw;
use eio_spec::{Path, Plan};
use rand::Rng;

use crate::attack::{first_argmax, pgd_train_mode, AttackSettings};
use crate::distill::eq2_distill_paths;
use crate::model::{backward, backward_groups, forward_groups, logits, Gradients};
use crate::ops;
use crate::optim::Sgd;
use crate::path_batching::PathBatching;
use crate::state::ModelState;

/// Source images with labels (`[N]`, u32) and the target images they are distilled towards.
#[derive(Debug, Clone)]
pub struct EioBatch {
    pub source: Tensor,
    pub labels: Tensor,
    pub target: Tensor,
}

/// What one EIO iteration did.
#[derive(Debug, Clone)]
pub struct IterationReport {
    pub layer: usize,
    pub paths: Vec<Path>,
    /// L_i for each path (after the loss scale).
    pub path_losses: Vec<f64>,
    /// Each path's feature-matching loss before its last distillation step.
    pub distill_losses: Vec<f64>,
    /// Sign ties over all distillations.
    pub sign_ties: usize,
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
}

/// Algorithm 1 lines 13-24 for the layer and paths of `draw`, the paths scheduled as is
/// fastest on the batch's device ([`PathBatching::for_device`]).
///
/// # Errors
/// On a device error.
pub fn eq4_iteration<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    config: &Config,
    batch: &EioBatch,
    draw: &IterationDraw,
    rng: &mut R,
) -> Result<IterationReport> {
    let batching = PathBatching::for_device(batch.source.device());
    eq4_iteration_with(plan, state, optimiser, config, batch, draw, batching, rng)
}

/// [`eq4_iteration`] with the paths scheduled by `batching` (the same results either way).
///
/// # Errors
/// On a device error.
#[allow(clippy::too_many_arguments)] // eq4_iteration's arguments and the schedule
pub fn eq4_iteration_with<R: Rng + ?Sized>(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    config: &Config,
    batch: &EioBatch,
    draw: &IterationDraw,
    batching: PathBatching,
    rng: &mut R,
) -> Result<IterationReport> {
    let (layer, paths) = (draw.layer, draw.paths.as_slice());
    let p = paths.len();
    let mut distilled = Vec::with_capacity(p);
    let mut distill_losses = Vec::with_capacity(p);
    let mut sign_ties = 0;
    for d in eq2_distill_paths(
        plan,
        state,
        paths,
        layer,
        (&batch.target, &batch.source),
        &config.distill,
        batching,
        rng,
    )? {
        distill_losses.push(d.losses.last().copied().unwrap_or(f64::NAN));
        sign_ties += d.sign_ties;
        distilled.push(d.images);
    }
    let mut adversarial = Vec::new();
    if config.eio.adversarial_term {
        let settings = AttackSettings::training(&config.train.adv, config.eval.cw_kappa);
        for path in paths {
            adversarial.push(pgd_train_mode(
                plan,
                state,
                path,
                &batch.source,
                &batch.labels,
                &settings,
                rng,
            )?);
        }
    }
    let scale = match config.eio.loss_scale {
        LossScale::Sum => 1.0,
        LossScale::DivideByP => 1.0 / p as f64,
    };
    let mut total = Gradients::default();
    let mut path_losses = Vec::with_capacity(p);
    for (i, path) in paths.iter().enumerate() {
        let mut inputs: Vec<&Tensor> = distilled
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, x)| x)
            .collect();
        if let Some(adv) = adversarial.get(i) {
            inputs.push(adv);
        }
        path_losses.push(cross_train(
            plan,
            state,
            (path, batching),
            &inputs,
            &batch.labels,
            scale,
            &mut total,
        )?);
    }
    sgd_step(plan, state, optimiser, &total, config.eio.unused_params)?;
    Ok(IterationReport {
        layer,
        paths: paths.to_vec(),
        path_losses,
        distill_losses,
        sign_ties,
    })
}

/// Line 20 for one path (DVERGE's cross-training for one member), as
/// `eio_reference::eio::cross_train`: for each batch of `inputs` in order, a train-mode
/// forward along `path` whose running statistics are committed, then `scale`·CE(f_P(x),
/// `labels`). Returns the sum of those terms and adds their gradients into `total`, batch
/// after batch.
///
/// [`PathBatching::Batched`] runs the inputs as one path-batched pass ([`forward_groups`],
/// one group per input): each group has its own batch statistics, the running statistics are
/// updated group after group, and each group's gradients are added to `total` in turn, so
/// every value is the one the passes one after the other give.
///
/// # Errors
/// If an input does not have one image per label; on a device error.
pub(crate) fn cross_train(
    plan: &Plan,
    state: &mut ModelState,
    (path, batching): (&Path, PathBatching),
    inputs: &[&Tensor],
    labels: &Tensor,
    scale: f64,
    total: &mut Gradients,
) -> Result<f64> {
    let n = labels.dim(0)?;
    let sizes: Vec<usize> = inputs.iter().map(|x| x.dim(0)).collect::<Result<_>>()?;
    if sizes.iter().any(|&size| size != n) {
        candle_core::bail!("cross-training batches of {sizes:?} images for {n} labels");
    }
    let passes: Vec<Vec<&Tensor>> = match batching {
        PathBatching::Batched if !inputs.is_empty() => vec![inputs.to_vec()],
        _ => inputs.iter().map(|&x| vec![x]).collect(),
    };
    let mut loss = 0.0;
    for batches in passes {
        let paths = vec![path.clone(); batches.len()];
        let input = Tensor::cat(&batches, 0)?;
        let trace = forward_groups(plan, state, &paths, &input, BnMode::Train, plan.logits())?;
        state.commit(&trace);
        let mut seeds = Vec::with_capacity(batches.len());
        for g in 0..batches.len() {
            let (ce, grad) = ops::cross_entropy(&trace.last().narrow(0, g * n, n)?, labels)?;
            loss += scale * scalar(&ce)?;
            seeds.push((grad * scale)?);
        }
        let seed = Tensor::cat(&seeds, 0)?;
        for grads in backward_groups(plan, state, &trace, &[(plan.logits(), seed)])? {
            total.add(grads)?;
        }
    }
    Ok(loss)
}

/// What one clean training step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean cross-entropy over the batch, before the update.
    pub loss: f64,
    /// Images the path classified correctly, before the update.
    pub correct: usize,
}

/// Algorithm 1 lines 4-5: train one path on a clean batch, one SGD step; returns the loss.
///
/// # Errors
/// On a device error.
pub fn pretrain_iteration(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    path: &Path,
    images: &Tensor,
    labels: &Tensor,
    unused: UnusedParams,
) -> Result<f64> {
    Ok(clean_step(plan, state, optimiser, path, images, labels, unused)?.loss)
}

/// One SGD step of `path` on `images` with cross-entropy (Algorithm 1 lines 4-5, and every
/// clean training step of baseline, AdvT and fine-tuning), reporting loss and accuracy.
///
/// # Errors
/// On a device error.
pub fn clean_step(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    path: &Path,
    images: &Tensor,
    labels: &Tensor,
    unused: UnusedParams,
) -> Result<StepReport> {
    let (out, trace) = logits(plan, state, path, images, BnMode::Train)?;
    state.commit(&trace);
    let (ce, grad) = ops::cross_entropy(&out, labels)?;
    let predicted = first_argmax(&out)?;
    let truth = labels.to_vec1::<u32>()?;
    let correct = predicted
        .iter()
        .zip(&truth)
        .filter(|(p, &y)| **p == y as usize)
        .count();
    let grads = backward(plan, state, &trace, &[(plan.logits(), grad)])?;
    sgd_step(plan, state, optimiser, &grads, unused)?;
    Ok(StepReport {
        loss: scalar(&ce)?,
        correct,
    })
}

/// Algorithm 1 line 24 over every learnable tensor: a missing gradient is zero under
/// [`UnusedParams::Step`] and skipped under [`UnusedParams::Skip`].
///
/// # Errors
/// On a device error.
pub fn sgd_step(
    plan: &Plan,
    state: &mut ModelState,
    optimiser: &mut Sgd,
    grads: &Gradients,
    unused: UnusedParams,
) -> Result<()> {
    for spec in plan.params.iter().filter(|p| p.role == Role::Learnable) {
        let param = state.tensor(&spec.name).clone();
        let zero;
        let grad = match (grads.params.get(&spec.name), unused) {
            (Some(g), _) => Some(g),
            (None, UnusedParams::Step) => {
                zero = param.zeros_like()?;
                Some(&zero)
            }
            (None, UnusedParams::Skip) => None,
        };
        let updated = optimiser.step_param(&spec.name, &param, grad)?;
        state.tensors.insert(spec.name.clone(), updated);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use eio_spec::config::{Config, Preset};
    use eio_spec::rng::Seeds;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random(n: usize, rng: &mut ChaCha8Rng) -> Tensor {
        let values: Vec<f64> = (0..n * 3 * 8 * 8)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        Tensor::from_vec(values, (n, 3, 8, 8), &Device::Cpu).expect("images")
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        let values = t.flatten_all().and_then(|t| t.to_vec1::<f64>());
        values.expect("f64").into_iter().map(f64::to_bits).collect()
    }

    /// Cross-training on several batches as one path-batched pass gives, bit for bit, the
    /// loss, the running total of gradients and the running statistics of one pass per batch.
    #[test]
    fn batched_cross_training_is_one_pass_per_batch() {
        let config: Config = Preset::Official
            .config()
            .and_then(|c| {
                c.with_overrides(&[
                    "model.depth=8",
                    "model.width=0.25",
                    "model.input_size=8",
                    "model.classes=5",
                ])
            })
            .expect("small config");
        let plan = Plan::build(&config.model).expect("plan");
        let state =
            ModelState::init(&plan, &Seeds::new(4), 0, &Device::Cpu, DType::F64).expect("state");
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let path = plan.path_space().sample(&mut rng);
        let labels = Tensor::new(&[0u32, 3, 4], &Device::Cpu).expect("labels");
        let first = random(3, &mut rng);
        let batches = [
            random(3, &mut rng),
            random(3, &mut rng),
            random(3, &mut rng),
        ];
        let inputs: Vec<&Tensor> = batches.iter().collect();
        let run = |batching: PathBatching| {
            let mut state = state.clone();
            let mut total = Gradients::default();
            // A total that already holds a pass's gradients, as for the second path of an
            // iteration.
            let losses = [
                cross_train(
                    &plan,
                    &mut state,
                    (&path, batching),
                    &[&first],
                    &labels,
                    0.5,
                    &mut total,
                )
                .expect("first"),
                cross_train(
                    &plan,
                    &mut state,
                    (&path, batching),
                    &inputs,
                    &labels,
                    0.5,
                    &mut total,
                )
                .expect("three batches"),
            ];
            (state, total, losses)
        };
        let (batched_state, batched, batched_losses) = run(PathBatching::Batched);
        let (own_state, own, own_losses) = run(PathBatching::Sequential);
        assert_eq!(
            batched_losses.map(f64::to_bits),
            own_losses.map(f64::to_bits),
            "losses"
        );
        assert_eq!(batched.params.len(), own.params.len(), "parameters");
        for (name, g) in &own.params {
            assert!(bits(&batched.params[name]) == bits(g), "d/d{name}");
        }
        assert_eq!(batched_state.counters, own_state.counters, "counters");
        for (name, t) in &own_state.tensors {
            assert!(bits(&batched_state.tensors[name]) == bits(t), "{name}");
        }
        // Every batch needs one label per image.
        let mut state = state.clone();
        let small = random(2, &mut rng);
        let err = cross_train(
            &plan,
            &mut state,
            (&path, PathBatching::Batched),
            &[&first, &small],
            &labels,
            1.0,
            &mut Gradients::default(),
        )
        .expect_err("a batch of 2 for 3 labels");
        assert!(
            err.to_string().contains("[3, 2] images for 3 labels"),
            "{err}"
        );
    }
}

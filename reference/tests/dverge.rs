//! DVERGE's iteration against a line-by-line transcription of the public code's training loop
//! (`train/train_dverge.py`, `DVERGE_Trainer.train`), and the number of running-statistics
//! updates each BatchNorm of each member receives in one iteration.

#[path = "common/tiny.rs"]
mod tiny;

use eio_reference::attack::{pgd_train_mode, AttackSettings};
use eio_reference::distill::eq2_distill;
use eio_reference::dverge::dverge_iteration;
use eio_reference::loss::cross_entropy;
use eio_reference::model::{backward, logits, Gradients};
use eio_reference::optim::Optimiser;
use eio_reference::state::ModelState;
use eio_spec::config::{Activation, BnMode, Config, Optimizer, Sharing};
use eio_spec::plan::Role;
use eio_spec::{Path, Plan};
use ndarray::{Array4, ArrayD};

fn setup(members: usize, plus_adv: bool) -> (Plan, Config, Vec<ModelState>) {
    let mut config = Config {
        model: tiny::resnet8(1, Sharing::Independent, Activation::Relu, 3, 4),
        ..Config::default()
    };
    config.train.optimizer = Optimizer::Sgd;
    config.distill.steps = 3;
    config.distill.random_start = true;
    config.train.adv.steps = 2;
    config.dverge.plus_adv = plus_adv;
    let plan = tiny::plan(&config.model);
    let states = (0..members)
        .map(|m| tiny::perturbed_state(&plan, 100 + m as u64))
        .collect();
    (plan, config, states)
}

fn batches(plan: &Plan) -> (Array4<f64>, Vec<usize>, Array4<f64>) {
    let mut r = tiny::rng(7);
    let source = tiny::images(&mut r, 3, plan);
    let labels = tiny::labels(&mut r, 3, plan.classes);
    let target = tiny::images(&mut r, 3, plan);
    (source, labels, target)
}

/// `train_dverge.py`'s loop body, transcribed: for each member m, `Linf_distillation` then
/// (with `--plus-adv`) `Linf_PGD`; then for each member i, the summed CE over the other
/// members' distilled batches in order and the PGD batch, `zero_grad`, `backward`, `step`.
/// Every gradient the backward leaves in `.grad` is stepped, the others are zero (a freshly
/// zeroed `.grad` in PyTorch ≥ 2 is None, but every parameter of a plain member is reached
/// by the loss).
fn transcription(
    plan: &Plan,
    models: &mut [ModelState],
    optimizers: &mut [Optimiser],
    config: &Config,
    (si, sl, ti): (&Array4<f64>, &[usize], &Array4<f64>),
    layer: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<f64> {
    let path = Path::new(vec![0; plan.k()]);
    let attack_cfg = AttackSettings::training(&config.train.adv, config.eval.cw_kappa);
    let mut distilled_data_list = Vec::new();
    let mut adv_inputs_list = Vec::new();
    for m in models.iter_mut() {
        let temp = eq2_distill(plan, m, &path, layer, ti, si, &config.distill, rng);
        distilled_data_list.push(temp.images);
        if config.dverge.plus_adv {
            adv_inputs_list.push(pgd_train_mode(plan, m, &path, si, sl, &attack_cfg, rng));
        }
    }
    let mut losses = Vec::new();
    for (i, m) in models.iter_mut().enumerate() {
        let mut loss = 0.0;
        let mut grad = Gradients::default();
        for (j, distilled_data) in distilled_data_list.iter().enumerate() {
            if i == j {
                continue;
            }
            let (outputs, trace) = logits(plan, m, &path, distilled_data, BnMode::Train);
            m.commit(&trace);
            let ce = cross_entropy(&outputs, sl);
            loss += ce.value;
            grad.add(backward(
                plan,
                m,
                &trace,
                &[(plan.logits(), ce.grad.into_dyn())],
            ));
        }
        if config.dverge.plus_adv {
            let (outputs, trace) = logits(plan, m, &path, &adv_inputs_list[i], BnMode::Train);
            m.commit(&trace);
            let ce = cross_entropy(&outputs, sl);
            loss += ce.value;
            grad.add(backward(
                plan,
                m,
                &trace,
                &[(plan.logits(), ce.grad.into_dyn())],
            ));
        }
        losses.push(loss);
        for spec in plan.params.iter().filter(|p| p.role == Role::Learnable) {
            let g = grad
                .params
                .get(&spec.name)
                .cloned()
                .unwrap_or_else(|| ArrayD::zeros(spec.shape.as_slice()));
            let p = m.tensors.get_mut(&spec.name).expect("a learnable tensor");
            optimizers[i].step_param(&spec.name, p, Some(&g));
        }
    }
    losses
}

#[test]
fn iteration_is_the_public_training_loop() {
    for (members, plus_adv, layers) in [(2, false, &[1, 0][..]), (3, true, &[3][..])] {
        let (plan, config, start) = setup(members, plus_adv);
        let (source, labels, target) = batches(&plan);
        // 0 stands for the logits, layer L.
        for layer in layers.iter().map(|&l| if l == 0 { plan.l() } else { l }) {
            let mut ours = start.clone();
            let mut ours_opt: Vec<_> = start
                .iter()
                .map(|_| Optimiser::for_config(&config, 0.1))
                .collect();
            let mut theirs = start.clone();
            let mut theirs_opt = ours_opt.clone();
            // Two iterations, so that momentum buffers carry over.
            for it in 0..2u64 {
                let report = dverge_iteration(
                    &plan,
                    &mut ours,
                    &mut ours_opt,
                    &config,
                    &source,
                    &labels,
                    &target,
                    layer,
                    &mut tiny::rng(50 + it),
                );
                let losses = transcription(
                    &plan,
                    &mut theirs,
                    &mut theirs_opt,
                    &config,
                    (&source, &labels, &target),
                    layer,
                    &mut tiny::rng(50 + it),
                );
                let total: f64 = losses.iter().sum();
                let what = format!("{members} members, plus_adv {plus_adv}, layer {layer}");
                assert!(
                    (report.loss - total).abs() <= 1e-12 * total.abs(),
                    "{what}: loss {} against {total}",
                    report.loss
                );
                assert_eq!(report.terms[0].0, "cross_ce", "{what}");
                assert_eq!(report.terms.len(), 1 + usize::from(plus_adv), "{what}");
                assert!(report.distill_loss.is_some_and(f64::is_finite), "{what}");
                assert_eq!(ours, theirs, "{what}: iteration {it}: member states");
            }
        }
    }
}

/// Running-statistics updates per BatchNorm in one iteration (models in `train()` mode):
/// 2 per distillation step for the BatchNorms up to the distillation layer (source and
/// target forwards, which stop at the layer), 1 per PGD step with `plus_adv`, then one per
/// cross-training forward (N − 1 distilled batches, plus the PGD batch).
#[test]
fn running_statistics_updates_per_batch_norm() {
    for (members, plus_adv) in [(2, false), (3, true)] {
        let (plan, config, start) = setup(members, plus_adv);
        let (source, labels, target) = batches(&plan);
        let path = Path::new(vec![0; plan.k()]);
        let layer = 3;
        let feature = plan.feature_node(
            layer,
            config.distill.feature,
            config.distill.first_layer_before_relu,
        );
        let reached: Vec<String> = tiny::bns_reached(&plan, &path, feature)
            .into_iter()
            .map(|b| b.num_batches_tracked)
            .collect();
        let mut states = start.clone();
        let mut optimisers: Vec<_> = start
            .iter()
            .map(|_| Optimiser::for_config(&config, 0.1))
            .collect();
        dverge_iteration(
            &plan,
            &mut states,
            &mut optimisers,
            &config,
            &source,
            &labels,
            &target,
            layer,
            &mut tiny::rng(1),
        );
        let adv = if plus_adv {
            config.train.adv.steps + 1
        } else {
            0
        };
        for (m, (after, before)) in states.iter().zip(&start).enumerate() {
            assert!(!after.counters.is_empty());
            for (name, &count) in &after.counters {
                let distill = if reached.contains(name) {
                    2 * config.distill.steps
                } else {
                    0
                };
                let expected = before.counters[name] + (distill + adv + members - 1) as i64;
                assert_eq!(
                    count, expected,
                    "{members} members, plus_adv {plus_adv}: member {m}: {name}"
                );
            }
        }
    }
}

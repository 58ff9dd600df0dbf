//! [`Engine`] over `eio-reference`, the f64 ndarray oracle.

use std::collections::BTreeMap;

use eio_reference::attack::{pgd_run, AttackSettings, Member, Target};
use eio_reference::distill::eq2_distill;
use eio_reference::eio::{eq4_iteration, pretrain_iteration, EioBatch};
use eio_reference::input_diversity::{input_diversity, input_diversity_backward};
use eio_reference::loss::{cross_entropy, cw_loss, mse_loss};
use eio_reference::model::{backward, forward, logits};
use eio_reference::optim::{Adam, AdamConfig, Sgd, SgdConfig};
use eio_reference::second_order::{input_gradient, input_gradient_vjp};
use eio_reference::state::ModelState;
use eio_spec::attack::{DiversityDraw, Interpolation, SkipGradient};
use eio_spec::config::{AttackLoss, BnMode, Config, DistillConfig, EvalConfig};
use eio_spec::plan::{NodeId, Role};
use eio_spec::rng::Seeds;
use eio_spec::{Path, Plan};
use ndarray::{Array4, ArrayD, IxDyn};
use rand_chacha::ChaCha8Rng;

use crate::engine::{
    AttackRun, DistillRun, EioIteration, EioRun, Engine, Forward, Grads, Images, IterationReport,
    Objective, Optimiser, Outcome, SecondOrder, StepGrads, TargetSpec, Values, WhiteBox,
};

/// The reference engine (f64, CPU).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

/// The reference's state for `values` (every plan tensor must be present).
pub fn state(plan: &Plan, values: &Values) -> ModelState {
    let mut s = ModelState {
        tensors: BTreeMap::new(),
        counters: BTreeMap::new(),
    };
    for spec in &plan.params {
        let v = values
            .get(&spec.name)
            .unwrap_or_else(|| panic!("values lack tensor {:?}", spec.name));
        if spec.role == Role::Counter {
            s.counters.insert(spec.name.clone(), v[0] as i64);
        } else {
            let a = ArrayD::from_shape_vec(IxDyn(&spec.shape), v.clone())
                .unwrap_or_else(|_| panic!("values of {:?} do not fit its shape", spec.name));
            s.tensors.insert(spec.name.clone(), a);
        }
    }
    s
}

/// The values of a reference state.
pub fn values(state: &ModelState) -> Values {
    let mut out: Values = state
        .tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
        .collect();
    for (k, &c) in &state.counters {
        out.insert(k.clone(), vec![c as f64]);
    }
    out
}

/// Host images as an ndarray batch.
pub fn array(images: &Images) -> Array4<f64> {
    let [n, c, h, w] = images.dims;
    Array4::from_shape_vec((n, c, h, w), images.data.clone()).expect("images fit their dims")
}

fn images(a: &Array4<f64>) -> Images {
    let (n, c, h, w) = a.dim();
    Images {
        dims: [n, c, h, w],
        data: a.iter().copied().collect(),
    }
}

fn flat(a: &ArrayD<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

/// Reference states for a target's members, built before the target borrows them.
fn target_states(target: &TargetSpec<'_>) -> Vec<ModelState> {
    match target {
        TargetSpec::Path { plan, values, .. } | TargetSpec::Randomised { plan, values, .. } => {
            vec![state(plan, values)]
        }
        TargetSpec::Ensemble(members) => members.iter().map(|m| state(m.plan, m.values)).collect(),
    }
}

fn make_target<'a>(target: &TargetSpec<'a>, states: &'a [ModelState]) -> Target<'a> {
    match target {
        TargetSpec::Path {
            plan, path, mode, ..
        } => Target::Path {
            plan,
            state: &states[0],
            path,
            mode: *mode,
        },
        TargetSpec::Ensemble(members) => Target::Ensemble(
            members
                .iter()
                .zip(states)
                .map(|(m, s)| Member {
                    plan: m.plan,
                    state: s,
                    path: m.path,
                })
                .collect(),
        ),
        TargetSpec::Randomised { plan, eot, .. } => Target::Randomised {
            plan,
            state: &states[0],
            eot: *eot,
        },
    }
}

impl Engine for Reference {
    fn name(&self) -> String {
        "reference-f64".into()
    }

    fn forward(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        images: &Images,
        mode: BnMode,
        nodes: &[NodeId],
    ) -> Outcome<Forward> {
        let mut s = state(plan, values);
        let end = nodes.iter().copied().max().unwrap_or(0);
        let trace = forward(plan, &s, path, &array(images), mode, end);
        s.commit(&trace);
        Ok(Forward {
            outputs: nodes
                .iter()
                .map(|&id| (id, flat(trace.output(id))))
                .collect(),
            state: self::values(&s),
        })
    }

    fn gradients(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        images: &Images,
        mode: BnMode,
        objective: &Objective,
    ) -> Outcome<Grads> {
        let s = state(plan, values);
        let x = array(images);
        let (loss, trace, seed_node, seed) = match objective {
            // (each arm: the loss, the pass, the node the loss reads, dL/d(that node))
            Objective::CrossEntropy { labels } => {
                let (z, trace) = logits(plan, &s, path, &x, mode);
                let l = cross_entropy(&z, labels);
                (l.value, trace, plan.logits(), l.grad.into_dyn())
            }
            Objective::CarliniWagner { labels, kappa } => {
                let (z, trace) = logits(plan, &s, path, &x, mode);
                let l = cw_loss(&z, labels, *kappa);
                (l.value, trace, plan.logits(), l.grad.into_dyn())
            }
            Objective::Mse { node, target } => {
                let trace = forward(plan, &s, path, &x, mode, *node);
                let out = trace.output(*node);
                let t = ArrayD::from_shape_vec(out.raw_dim(), target.clone())
                    .expect("the MSE target has the feature's shape");
                let l = mse_loss(out, &t);
                (l.value, trace, *node, l.grad)
            }
        };
        let g = backward(plan, &s, &trace, &[(seed_node, seed)]);
        Ok(Grads {
            loss,
            output: flat(trace.output(seed_node)),
            input: g
                .input
                .map(|a| a.iter().copied().collect())
                .unwrap_or_default(),
            params: g.params.iter().map(|(k, v)| (k.clone(), flat(v))).collect(),
        })
    }

    fn second_order(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        images: &Images,
        labels: &[usize],
        v: &Images,
        mode: BnMode,
    ) -> Outcome<SecondOrder> {
        let s = state(plan, values);
        let ig = input_gradient(plan, &s, path, &array(images), labels, mode);
        let g = input_gradient_vjp(plan, &s, &ig.trace, labels, &array(v));
        Ok(SecondOrder {
            loss: ig.loss,
            logits: ig.logits.iter().copied().collect(),
            input_grad: ig.grad.iter().copied().collect(),
            params: g.params.iter().map(|(k, v)| (k.clone(), flat(v))).collect(),
            input: g
                .input
                .map(|a| a.iter().copied().collect())
                .unwrap_or_default(),
        })
    }

    fn optimise(
        &self,
        plan: &Plan,
        optimiser: Optimiser,
        params: &Values,
        steps: &[StepGrads],
    ) -> Outcome<Vec<Values>> {
        enum Opt {
            Sgd(Sgd),
            Adam(Adam),
        }
        let mut opt = match optimiser {
            Optimiser::Sgd {
                lr,
                momentum,
                weight_decay,
                nesterov,
            } => Opt::Sgd(Sgd::new(SgdConfig {
                lr,
                momentum,
                weight_decay,
                nesterov,
            })),
            Optimiser::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => Opt::Adam(Adam::new(AdamConfig {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            })),
        };
        let learnable: Vec<_> = plan
            .params
            .iter()
            .filter(|p| p.role == Role::Learnable)
            .collect();
        let mut current: BTreeMap<String, ArrayD<f64>> = learnable
            .iter()
            .map(|spec| {
                let v = params[&spec.name].clone();
                (
                    spec.name.clone(),
                    ArrayD::from_shape_vec(IxDyn(&spec.shape), v).expect("shape"),
                )
            })
            .collect();
        let mut out = Vec::with_capacity(steps.len());
        for grads in steps {
            for spec in &learnable {
                let g = grads.get(&spec.name).map(|v| {
                    ArrayD::from_shape_vec(IxDyn(&spec.shape), v.clone()).expect("grad shape")
                });
                let p = current.get_mut(&spec.name).expect("learnable");
                match &mut opt {
                    Opt::Sgd(o) => o.step_param(&spec.name, p, g.as_ref()),
                    Opt::Adam(o) => o.step_param(&spec.name, p, g.as_ref()),
                }
            }
            out.push(current.iter().map(|(k, v)| (k.clone(), flat(v))).collect());
        }
        Ok(out)
    }

    fn distill(
        &self,
        plan: &Plan,
        values: &Values,
        path: &Path,
        layer: usize,
        x_t: &Images,
        x_s: &Images,
        config: &DistillConfig,
        mut rng: ChaCha8Rng,
    ) -> Outcome<DistillRun> {
        let mut s = state(plan, values);
        let d = eq2_distill(
            plan,
            &mut s,
            path,
            layer,
            &array(x_t),
            &array(x_s),
            config,
            &mut rng,
        );
        Ok(DistillRun {
            images: images(&d.images),
            losses: d.losses,
            sign_ties: d.sign_ties,
            state: self::values(&s),
        })
    }

    fn eio(
        &self,
        plan: &Plan,
        config: &Config,
        values: &Values,
        iterations: &[EioIteration],
    ) -> Outcome<EioRun> {
        let mut s = state(plan, values);
        let mut sgd = Sgd::new(SgdConfig {
            lr: config.train.lr,
            momentum: config.train.momentum,
            weight_decay: config.train.weight_decay,
            nesterov: config.train.nesterov,
        });
        let mut reports = Vec::with_capacity(iterations.len());
        for it in iterations {
            let batch = EioBatch {
                source: array(&it.source),
                labels: it.labels.clone(),
                target: array(&it.target),
            };
            let mut rng = it.rng.clone();
            let r = eq4_iteration(plan, &mut s, &mut sgd, config, &batch, &it.draw, &mut rng);
            reports.push(IterationReport {
                layer: r.layer,
                paths: r.paths,
                path_losses: r.path_losses,
                distill_losses: r.distill_losses,
                sign_ties: r.sign_ties,
            });
        }
        Ok(EioRun {
            reports,
            state: self::values(&s),
        })
    }

    fn pretrain(
        &self,
        plan: &Plan,
        config: &Config,
        values: &Values,
        batches: &[(Path, Images, Vec<usize>)],
    ) -> Outcome<(Vec<f64>, Values)> {
        let mut s = state(plan, values);
        let mut sgd = Sgd::new(SgdConfig {
            lr: config.train.lr,
            momentum: config.train.momentum,
            weight_decay: config.train.weight_decay,
            nesterov: config.train.nesterov,
        });
        let losses = batches
            .iter()
            .map(|(path, x, labels)| {
                pretrain_iteration(
                    plan,
                    &mut s,
                    &mut sgd,
                    path,
                    &array(x),
                    labels,
                    config.eio.unused_params,
                )
            })
            .collect();
        Ok((losses, self::values(&s)))
    }

    fn reload(&self, plan: &Plan, from: &std::path::Path, to: &std::path::Path) -> Outcome<()> {
        let s = ModelState::load(plan, from)
            .unwrap_or_else(|e| panic!("reference: cannot load {}: {e}", from.display()));
        s.save(to)
            .unwrap_or_else(|e| panic!("reference: cannot save {}: {e}", to.display()));
        Ok(())
    }

    fn attack_loss(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        loss: AttackLoss,
        kappa: f64,
        skip: Option<&SkipGradient>,
        mut rng: ChaCha8Rng,
    ) -> Outcome<(f64, Vec<f64>)> {
        let states = target_states(target);
        let t = make_target(target, &states);
        let (l, g) = t.loss_and_input_grad(&array(images), labels, loss, kappa, skip, &mut rng);
        Ok((l, g.iter().copied().collect()))
    }

    fn predict(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        mut rng: ChaCha8Rng,
    ) -> Outcome<Vec<usize>> {
        let states = target_states(target);
        let t = make_target(target, &states);
        Ok(t.predict(&array(images), &mut rng))
    }

    fn pgd(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        settings: &AttackSettings,
        mut rng: ChaCha8Rng,
    ) -> Outcome<AttackRun> {
        let states = target_states(target);
        let t = make_target(target, &states);
        let run = pgd_run(&t, &array(images), labels, settings, &mut rng);
        Ok(AttackRun {
            images: self::images(&run.images),
            sign_ties: run.sign_ties,
        })
    }

    fn input_diversity(
        &self,
        images: &Images,
        draw: &DiversityDraw,
        interpolation: Interpolation,
    ) -> Outcome<Images> {
        Ok(self::images(&input_diversity(
            &array(images),
            draw,
            interpolation,
        )))
    }

    fn input_diversity_backward(
        &self,
        grad: &Images,
        draw: &DiversityDraw,
        interpolation: Interpolation,
    ) -> Outcome<Images> {
        Ok(self::images(&input_diversity_backward(
            &array(grad),
            draw,
            interpolation,
        )))
    }

    fn white_box(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        config: &EvalConfig,
        seeds: &Seeds,
    ) -> Outcome<WhiteBox> {
        let states = target_states(target);
        let t = make_target(target, &states);
        let r = eio_reference::evaluate::white_box(&t, &array(images), labels, config, seeds)
            .expect("a valid evaluation config");
        Ok(WhiteBox {
            clean_accuracy: r.clean_accuracy,
            per_eps: r
                .per_eps
                .into_iter()
                .map(|e| (e.eps, e.robustness))
                .collect(),
        })
    }
}

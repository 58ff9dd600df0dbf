//! [`Engine`] over `eio-accelerated` on one candle device in one float dtype.
//!
//! Inputs are uploaded from host f64 (rounded to the engine's dtype), outputs read back as f64.
//! A candle error is a failed test (with the operation named), never a skip: skips are only for
//! devices this build or machine does not have ([`Accelerated::cuda`]).

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use eio_accelerated::attack::{pgd_run, Member, Target};
use eio_accelerated::distill::eq2_distill;
use eio_accelerated::eio::{eq4_iteration, pretrain_iteration, EioBatch};
use eio_accelerated::model::{backward, forward, logits};
use eio_accelerated::ops;
use eio_accelerated::optim::{Adam, AdamConfig, Sgd, SgdConfig};
use eio_accelerated::second_order::{input_gradient, input_gradient_vjp};
use eio_accelerated::state::ModelState;
use eio_reference::attack::AttackSettings;
use eio_spec::attack::{DiversityDraw, Interpolation, SkipGradient};
use eio_spec::config::{AttackLoss, BnMode, Config, DistillConfig, EvalConfig};
use eio_spec::plan::{NodeId, Role};
use eio_spec::rng::Seeds;
use eio_spec::{Path, Plan};
use rand_chacha::ChaCha8Rng;

use crate::engine::{
    AttackRun, DistillRun, EioIteration, EioRun, Engine, Forward, Grads, Images, IterationReport,
    Objective, Optimiser, Outcome, SecondOrder, Skip, StepGrads, TargetSpec, Values, WhiteBox,
};

/// The accelerated engine on `device` in `dtype`.
#[derive(Debug, Clone)]
pub struct Accelerated {
    pub device: Device,
    pub dtype: DType,
}

/// The environment variable that asks for the CUDA cases: `EIO_DEVICE=cuda`.
pub const DEVICE_ENV: &str = "EIO_DEVICE";

impl Accelerated {
    /// f64 on the CPU: must equal the reference to 1e-9.
    pub fn f64_cpu() -> Self {
        Accelerated {
            device: Device::Cpu,
            dtype: DType::F64,
        }
    }

    /// f32 on the CPU.
    pub fn f32_cpu() -> Self {
        Accelerated {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// f32 on CUDA device 0, when this build has the `cuda` feature and `EIO_DEVICE=cuda`;
    /// otherwise a [`Skip`] saying which is missing (the feature, the variable, or a usable
    /// GPU, with candle's reason).
    pub fn cuda() -> Outcome<Self> {
        if !cfg!(feature = "cuda") {
            return Err(Skip::new(
                "CUDA: eio-tests was built without `--features cuda`",
            ));
        }
        match std::env::var(DEVICE_ENV) {
            Ok(v) if v == "cuda" => {}
            other => {
                return Err(Skip::new(format!(
                    "CUDA: {DEVICE_ENV} is {:?}, not \"cuda\"",
                    other.ok()
                )))
            }
        }
        let device = eio_accelerated::device::select("cuda").map_err(|e| {
            Skip::new(format!(
                "CUDA: {DEVICE_ENV}=cuda but no usable GPU: {e} ({e:?})"
            ))
        })?;
        Ok(Accelerated {
            device,
            dtype: DType::F32,
        })
    }

    /// The engine's state for `values`.
    pub fn state(&self, plan: &Plan, values: &Values) -> ModelState {
        let map: HashMap<String, Vec<f64>> =
            values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        ModelState::from_values(plan, map, &self.device, self.dtype)
            .unwrap_or_else(|e| panic!("{}: state from values: {e} ({e:?})", self.name()))
    }

    /// Host images on the device in the engine's dtype.
    pub fn tensor(&self, images: &Images) -> Tensor {
        self.upload(&images.data, &images.dims)
    }

    fn upload(&self, data: &[f64], dims: &[usize]) -> Tensor {
        ok(
            Tensor::from_vec(data.to_vec(), dims, &self.device)
                .and_then(|t| t.to_dtype(self.dtype)),
            "upload",
        )
    }

    fn labels(&self, labels: &[usize]) -> Tensor {
        let v: Vec<u32> = labels.iter().map(|&y| y as u32).collect();
        ok(Tensor::from_vec(v, labels.len(), &self.device), "labels")
    }
}

/// Unwraps a candle result, failing the test with the operation's name.
fn ok<T>(r: candle_core::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("accelerated engine: {what} failed: {e}"))
}

/// A tensor read back as host f64, row-major.
pub fn host(t: &Tensor) -> Vec<f64> {
    ok(
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>()),
        "read back",
    )
}

fn host_images(t: &Tensor) -> Images {
    let (n, c, h, w) = ok(t.dims4(), "image dims");
    Images {
        dims: [n, c, h, w],
        data: host(t),
    }
}

fn scalar(t: &Tensor) -> f64 {
    ok(
        t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()),
        "read scalar",
    )
}

fn values_of(s: &ModelState) -> Values {
    ok(
        s.to_values()
            .map_err(|e| candle_core::Error::Msg(e.to_string())),
        "state to values",
    )
}

impl Accelerated {
    fn target_states(&self, target: &TargetSpec<'_>) -> Vec<ModelState> {
        match target {
            TargetSpec::Path { plan, values, .. } | TargetSpec::Randomised { plan, values, .. } => {
                vec![self.state(plan, values)]
            }
            TargetSpec::Ensemble(members) => members
                .iter()
                .map(|m| self.state(m.plan, m.values))
                .collect(),
        }
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

impl Engine for Accelerated {
    fn name(&self) -> String {
        let device = match &self.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(_) => "cuda".to_string(),
            other => format!("{other:?}").to_lowercase(),
        };
        format!("accelerated-{:?}-{device}", self.dtype).to_lowercase()
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
        let mut s = self.state(plan, values);
        let end = nodes.iter().copied().max().unwrap_or(0);
        let trace = ok(
            forward(plan, &s, path, &self.tensor(images), mode, end),
            "forward",
        );
        s.commit(&trace);
        Ok(Forward {
            outputs: nodes
                .iter()
                .map(|&id| (id, host(trace.output(id))))
                .collect(),
            state: values_of(&s),
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
        let s = self.state(plan, values);
        let x = self.tensor(images);
        let (loss, trace, node, seed) = match objective {
            Objective::CrossEntropy { labels } => {
                let (z, trace) = ok(logits(plan, &s, path, &x, mode), "logits");
                let (l, g) = ok(
                    ops::cross_entropy(&z, &self.labels(labels)),
                    "cross-entropy",
                );
                (l, trace, plan.logits(), g)
            }
            Objective::CarliniWagner { labels, kappa } => {
                let (z, trace) = ok(logits(plan, &s, path, &x, mode), "logits");
                let (l, g) = ok(ops::cw_loss(&z, &self.labels(labels), *kappa), "C&W");
                (l, trace, plan.logits(), g)
            }
            Objective::Mse { node, target } => {
                let trace = ok(forward(plan, &s, path, &x, mode, *node), "forward");
                let out = trace.output(*node);
                let t = self.upload(target, out.dims());
                let (l, g) = ok(ops::mse(out, &t), "mse");
                (l, trace, *node, g)
            }
        };
        let g = ok(backward(plan, &s, &trace, &[(node, seed)]), "backward");
        Ok(Grads {
            loss: scalar(&loss),
            output: host(trace.output(node)),
            input: g.input.as_ref().map(host).unwrap_or_default(),
            params: g.params.iter().map(|(k, v)| (k.clone(), host(v))).collect(),
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
        let s = self.state(plan, values);
        let labels = self.labels(labels);
        let ig = ok(
            input_gradient(plan, &s, path, &self.tensor(images), &labels, mode),
            "second_order::input_gradient",
        );
        let g = ok(
            input_gradient_vjp(plan, &s, &ig.trace, &labels, &self.tensor(v)),
            "second_order::input_gradient_vjp",
        );
        Ok(SecondOrder {
            loss: ig.loss,
            logits: host(&ig.logits),
            input_grad: host(&ig.grad),
            params: g.params.iter().map(|(k, v)| (k.clone(), host(v))).collect(),
            input: g.input.as_ref().map(host).unwrap_or_default(),
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
        let mut current: BTreeMap<String, Tensor> = learnable
            .iter()
            .map(|spec| {
                (
                    spec.name.clone(),
                    self.upload(&params[&spec.name], &spec.shape),
                )
            })
            .collect();
        let mut out = Vec::with_capacity(steps.len());
        for grads in steps {
            for spec in &learnable {
                let g = grads.get(&spec.name).map(|v| self.upload(v, &spec.shape));
                let p = &current[&spec.name];
                let updated = match &mut opt {
                    Opt::Sgd(o) => ok(o.step_param(&spec.name, p, g.as_ref()), "sgd step"),
                    Opt::Adam(o) => ok(o.step_param(&spec.name, p, g.as_ref()), "adam step"),
                };
                current.insert(spec.name.clone(), updated);
            }
            out.push(current.iter().map(|(k, v)| (k.clone(), host(v))).collect());
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
        let mut s = self.state(plan, values);
        let d = ok(
            eq2_distill(
                plan,
                &mut s,
                path,
                layer,
                &self.tensor(x_t),
                &self.tensor(x_s),
                config,
                &mut rng,
            ),
            "eq2_distill",
        );
        Ok(DistillRun {
            images: host_images(&d.images),
            losses: d.losses,
            sign_ties: d.sign_ties,
            state: values_of(&s),
        })
    }

    fn eio(
        &self,
        plan: &Plan,
        config: &Config,
        values: &Values,
        iterations: &[EioIteration],
    ) -> Outcome<EioRun> {
        let mut s = self.state(plan, values);
        let mut sgd = Sgd::new(SgdConfig {
            lr: config.train.lr,
            momentum: config.train.momentum,
            weight_decay: config.train.weight_decay,
            nesterov: config.train.nesterov,
        });
        let mut reports = Vec::with_capacity(iterations.len());
        for it in iterations {
            let batch = EioBatch {
                source: self.tensor(&it.source),
                labels: self.labels(&it.labels),
                target: self.tensor(&it.target),
            };
            let mut rng = it.rng.clone();
            let r = ok(
                eq4_iteration(plan, &mut s, &mut sgd, config, &batch, &it.draw, &mut rng),
                "eq4_iteration",
            );
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
            state: values_of(&s),
        })
    }

    fn pretrain(
        &self,
        plan: &Plan,
        config: &Config,
        values: &Values,
        batches: &[(Path, Images, Vec<usize>)],
    ) -> Outcome<(Vec<f64>, Values)> {
        let mut s = self.state(plan, values);
        let mut sgd = Sgd::new(SgdConfig {
            lr: config.train.lr,
            momentum: config.train.momentum,
            weight_decay: config.train.weight_decay,
            nesterov: config.train.nesterov,
        });
        let mut losses = Vec::with_capacity(batches.len());
        for (path, x, labels) in batches {
            losses.push(ok(
                pretrain_iteration(
                    plan,
                    &mut s,
                    &mut sgd,
                    path,
                    &self.tensor(x),
                    &self.labels(labels),
                    config.eio.unused_params,
                ),
                "pretrain_iteration",
            ));
        }
        Ok((losses, values_of(&s)))
    }

    fn reload(&self, plan: &Plan, from: &std::path::Path, to: &std::path::Path) -> Outcome<()> {
        let s = ModelState::load(plan, from, &self.device, self.dtype).unwrap_or_else(|e| {
            panic!(
                "{}: cannot load {}: {e} ({e:?})",
                self.name(),
                from.display()
            )
        });
        s.save(to).unwrap_or_else(|e| {
            panic!("{}: cannot save {}: {e} ({e:?})", self.name(), to.display())
        });
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
        let states = self.target_states(target);
        let t = make_target(target, &states);
        let (l, g) = ok(
            t.loss_and_input_grad(
                &self.tensor(images),
                &self.labels(labels),
                loss,
                kappa,
                skip,
                &mut rng,
            ),
            "loss_and_input_grad",
        );
        Ok((scalar(&l), host(&g)))
    }

    fn predict(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        mut rng: ChaCha8Rng,
    ) -> Outcome<Vec<usize>> {
        let states = self.target_states(target);
        let t = make_target(target, &states);
        Ok(ok(t.predict(&self.tensor(images), &mut rng), "predict"))
    }

    fn pgd(
        &self,
        target: &TargetSpec<'_>,
        images: &Images,
        labels: &[usize],
        settings: &AttackSettings,
        mut rng: ChaCha8Rng,
    ) -> Outcome<AttackRun> {
        let states = self.target_states(target);
        let t = make_target(target, &states);
        // Both engines read the one `eio_spec::attack::AttackSettings`.
        let run = ok(
            pgd_run(
                &t,
                &self.tensor(images),
                &self.labels(labels),
                settings,
                &mut rng,
            ),
            "pgd_run",
        );
        Ok(AttackRun {
            images: host_images(&run.images),
            sign_ties: run.sign_ties,
        })
    }

    fn input_diversity(
        &self,
        images: &Images,
        draw: &DiversityDraw,
        interpolation: Interpolation,
    ) -> Outcome<Images> {
        Ok(host_images(&ok(
            ops::input_diversity(&self.tensor(images), draw, interpolation),
            "input_diversity",
        )))
    }

    fn input_diversity_backward(
        &self,
        grad: &Images,
        draw: &DiversityDraw,
        interpolation: Interpolation,
    ) -> Outcome<Images> {
        Ok(host_images(&ok(
            ops::input_diversity_backward(&self.tensor(grad), draw, interpolation),
            "input_diversity_backward",
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
        let states = self.target_states(target);
        let t = make_target(target, &states);
        let r = eio_accelerated::evaluate::white_box(
            &t,
            &self.tensor(images),
            &self.labels(labels),
            config,
            seeds,
        )
        .unwrap_or_else(|e| panic!("accelerated engine: white_box failed: {e} ({e:?})"));
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

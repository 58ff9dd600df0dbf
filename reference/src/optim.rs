//! Optimisers: SGD and Adam, exactly as `torch.optim.SGD` and
//! `torch.optim.Adam` (default, non-fused, single-tensor code path).
//!
//! Parameters are addressed by name. An optimiser keeps its per-parameter
//! state (momentum buffers, Adam moments and step counts) in a map keyed by
//! the same names.
//!
//! # Parameters without a gradient
//!
//! A parameter whose gradient is `None` for a step (PyTorch: `p.grad is
//! None`, e.g. the paths of an Ensemble-in-One supernet that were not sampled
//! in this step) is skipped entirely: it is not decayed, not moved, and its
//! state (momentum buffer, Adam moments, Adam step count) is left untouched
//! and is not even created. The authors' training relies on this, since
//! weight decay would otherwise shrink unsampled paths. In
//! [`Sgd::step_param`] / [`Adam::step_param`] this is the `None` argument;
//! in the map-level `step` it is a name that is absent from the gradient map.
//!
//! Note that a gradient of zeros is *not* the same as `None`: a zero
//! gradient still applies weight decay and momentum.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Zip};

fn check_grad(op: &str, name: &str, param: &ArrayD<f64>, grad: &ArrayD<f64>) {
    assert_eq!(
        param.shape(),
        grad.shape(),
        "{op}: gradient of `{name}` has shape {:?}, parameter has {:?}",
        grad.shape(),
        param.shape()
    );
}

fn check_grad_names(
    op: &str,
    params: &BTreeMap<String, ArrayD<f64>>,
    grads: &BTreeMap<String, ArrayD<f64>>,
) {
    for name in grads.keys() {
        assert!(
            params.contains_key(name),
            "{op}: gradient given for unknown parameter `{name}`"
        );
    }
}

/// The hyper-parameters of [`Sgd`] (PyTorch's `dampening` is fixed at 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate `lr` (public so that a schedule can change it between
    /// steps).
    pub lr: f64,
    /// Momentum factor `mu` (0 disables momentum and its buffers).
    pub momentum: f64,
    /// Coupled (L2) weight decay `lambda`, added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum (requires `momentum > 0`).
    pub nesterov: bool,
}

/// Stochastic gradient descent, exactly `torch.optim.SGD(params, lr,
/// momentum, dampening=0, weight_decay, nesterov)`.
///
/// For each parameter `p` with gradient `g` (skipped if `g` is `None`, see
/// the module documentation):
///
/// ```text
/// d = g + lambda * p                       (if lambda != 0)
/// if mu != 0:
///     b = d                                (first step of this parameter: no buffer yet)
///     b = mu * b + d                       (later steps)
///     d = d + mu * b   if nesterov   else   d = b
/// p = p - lr * d
/// ```
///
/// with `lr` the learning rate, `mu` the momentum, `lambda` the weight decay
/// and `b` the parameter's momentum buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sgd {
    /// The hyper-parameters.
    pub config: SgdConfig,
    momentum_buffers: BTreeMap<String, ArrayD<f64>>,
}

impl Sgd {
    /// A fresh optimiser with no state.
    ///
    /// # Panics
    ///
    /// If `lr`, `momentum` or `weight_decay` is negative (or NaN), or
    /// `nesterov` is set with `momentum == 0` (PyTorch raises the same).
    pub fn new(config: SgdConfig) -> Self {
        assert!(config.lr >= 0.0, "Sgd: invalid learning rate {}", config.lr);
        assert!(
            config.momentum >= 0.0,
            "Sgd: invalid momentum {}",
            config.momentum
        );
        assert!(
            config.weight_decay >= 0.0,
            "Sgd: invalid weight_decay {}",
            config.weight_decay
        );
        assert!(
            !config.nesterov || config.momentum > 0.0,
            "Sgd: Nesterov momentum requires a non-zero momentum"
        );
        Self {
            config,
            momentum_buffers: BTreeMap::new(),
        }
    }

    /// The momentum buffer `b` of parameter `name`, if it has one yet.
    pub fn momentum_buffer(&self, name: &str) -> Option<&ArrayD<f64>> {
        self.momentum_buffers.get(name)
    }

    /// One update of the single parameter `name` (see [`Sgd`] for the
    /// equations). `grad == None` leaves `param` and its buffer untouched.
    ///
    /// # Panics
    ///
    /// If `grad`'s shape differs from `param`'s, or from the shape of the
    /// buffer already stored under `name`.
    pub fn step_param(&mut self, name: &str, param: &mut ArrayD<f64>, grad: Option<&ArrayD<f64>>) {
        let Some(grad) = grad else {
            return;
        };
        check_grad("Sgd", name, param, grad);
        let SgdConfig {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } = self.config;
        // d = g + lambda * p
        let mut d = grad.clone();
        if weight_decay != 0.0 {
            Zip::from(&mut d)
                .and(&*param)
                .for_each(|d, &p| *d += weight_decay * p);
        }
        if momentum != 0.0 {
            match self.momentum_buffers.get_mut(name) {
                None => {
                    self.momentum_buffers.insert(name.to_string(), d.clone());
                }
                Some(buf) => {
                    check_grad("Sgd (momentum buffer)", name, buf, grad);
                    Zip::from(&mut *buf)
                        .and(&d)
                        .for_each(|b, &d| *b = momentum * *b + d);
                }
            }
            let buf = &self.momentum_buffers[name];
            if nesterov {
                Zip::from(&mut d)
                    .and(buf)
                    .for_each(|d, &b| *d += momentum * b);
            } else {
                d.assign(buf);
            }
        }
        Zip::from(&mut *param)
            .and(&d)
            .for_each(|p, &d| *p -= lr * d);
    }

    /// One step over all parameters. `grads[name]` is the gradient of
    /// `params[name]`; a parameter whose name is absent from `grads` has a
    /// `None` gradient and is skipped.
    ///
    /// # Panics
    ///
    /// If `grads` names a parameter that is not in `params`, or as
    /// [`Sgd::step_param`].
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, ArrayD<f64>>,
        grads: &BTreeMap<String, ArrayD<f64>>,
    ) {
        check_grad_names("Sgd", params, grads);
        for (name, param) in params.iter_mut() {
            self.step_param(name, param, grads.get(name));
        }
    }
}

/// The hyper-parameters of [`Adam`] (AMSGrad off).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate `lr` (public so that a schedule can change it).
    pub lr: f64,
    /// `beta1`, the decay of the first moment.
    pub beta1: f64,
    /// `beta2`, the decay of the second moment.
    pub beta2: f64,
    /// `eps`, added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// Coupled (L2) weight decay `lambda`, added to the gradient (this is
    /// `Adam`, not `AdamW`).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    /// PyTorch's defaults: `lr = 1e-3`, `betas = (0.9, 0.999)`,
    /// `eps = 1e-8`, `weight_decay = 0`.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The per-parameter state of [`Adam`], named as in PyTorch's
/// `optimizer.state[p]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamParamState {
    /// `step`: the number of updates this parameter has received.
    pub step: u64,
    /// `exp_avg`: the first moment `m`.
    pub exp_avg: ArrayD<f64>,
    /// `exp_avg_sq`: the second moment `v`.
    pub exp_avg_sq: ArrayD<f64>,
}

/// Adam, exactly `torch.optim.Adam(params, lr, betas=(beta1, beta2), eps,
/// weight_decay, amsgrad=False)`.
///
/// For each parameter `p` with gradient `g` (skipped if `g` is `None`, see
/// the module documentation), with `m` and `v` starting at zero and `t` the
/// parameter's own step count:
///
/// ```text
/// t = t + 1
/// d = g + lambda * p                       (if lambda != 0)
/// m = beta1 * m + (1 - beta1) * d
/// v = beta2 * v + (1 - beta2) * d^2
/// p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// ```
///
/// (all elementwise). Note where `eps` enters: it is added after dividing
/// `sqrt(v)` by `sqrt(1 - beta2^t)`, as PyTorch does.
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    /// The hyper-parameters.
    pub config: AdamConfig,
    state: BTreeMap<String, AdamParamState>,
}

impl Adam {
    /// A fresh optimiser with no state.
    ///
    /// # Panics
    ///
    /// If `lr`, `eps` or `weight_decay` is negative, or a beta is not in
    /// `[0, 1)` (PyTorch raises the same).
    pub fn new(config: AdamConfig) -> Self {
        assert!(
            config.lr >= 0.0,
            "Adam: invalid learning rate {}",
            config.lr
        );
        assert!(config.eps >= 0.0, "Adam: invalid eps {}", config.eps);
        assert!(
            (0.0..1.0).contains(&config.beta1),
            "Adam: invalid beta1 {}",
            config.beta1
        );
        assert!(
            (0.0..1.0).contains(&config.beta2),
            "Adam: invalid beta2 {}",
            config.beta2
        );
        assert!(
            config.weight_decay >= 0.0,
            "Adam: invalid weight_decay {}",
            config.weight_decay
        );
        Self {
            config,
            state: BTreeMap::new(),
        }
    }

    /// The state of parameter `name`, if it has been updated at least once.
    pub fn state(&self, name: &str) -> Option<&AdamParamState> {
        self.state.get(name)
    }

    /// One update of the single parameter `name` (see [`Adam`] for the
    /// equations). `grad == None` leaves `param` and its state untouched.
    ///
    /// # Panics
    ///
    /// If `grad`'s shape differs from `param`'s or from the stored state's.
    pub fn step_param(&mut self, name: &str, param: &mut ArrayD<f64>, grad: Option<&ArrayD<f64>>) {
        let Some(grad) = grad else {
            return;
        };
        check_grad("Adam", name, param, grad);
        let AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let state = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| AdamParamState {
                step: 0,
                exp_avg: ArrayD::zeros(param.raw_dim()),
                exp_avg_sq: ArrayD::zeros(param.raw_dim()),
            });
        check_grad("Adam (state)", name, &state.exp_avg, grad);
        state.step += 1;
        let mut d = grad.clone();
        if weight_decay != 0.0 {
            Zip::from(&mut d)
                .and(&*param)
                .for_each(|d, &p| *d += weight_decay * p);
        }
        Zip::from(&mut state.exp_avg)
            .and(&mut state.exp_avg_sq)
            .and(&d)
            .for_each(|m, v, &d| {
                *m = beta1 * *m + (1.0 - beta1) * d;
                *v = beta2 * *v + (1.0 - beta2) * d * d;
            });
        // PyTorch evaluates `beta ** step` with Python floats, i.e. `pow`.
        let t = state.step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
        let step_size = lr / bias_correction1;
        Zip::from(&mut *param)
            .and(&state.exp_avg)
            .and(&state.exp_avg_sq)
            .for_each(|p, &m, &v| {
                let denom = v.sqrt() / bias_correction2_sqrt + eps;
                *p -= step_size * m / denom;
            });
    }

    /// One step over all parameters. `grads[name]` is the gradient of
    /// `params[name]`; a parameter whose name is absent from `grads` has a
    /// `None` gradient and is skipped.
    ///
    /// # Panics
    ///
    /// If `grads` names a parameter that is not in `params`, or as
    /// [`Adam::step_param`].
    pub fn step(
        &mut self,
        params: &mut BTreeMap<String, ArrayD<f64>>,
        grads: &BTreeMap<String, ArrayD<f64>>,
    ) {
        check_grad_names("Adam", params, grads);
        for (name, param) in params.iter_mut() {
            self.step_param(name, param, grads.get(name));
        }
    }
}

/// The main phase's optimiser of one model or ensemble member, as `train.optimizer` picks it
/// (`eio_spec::config::Optimizer`): [`Sgd`] (DVERGE, Baseline, EIO) or [`Adam`] (ADP, GAL,
/// TRS). One Adam over all members, as DVERGE's ADP and GAL ports build it, is exactly one
/// [`Adam`] per member: Adam acts on each parameter alone, and every member steps at every
/// iteration, so the step counts agree.
#[derive(Debug, Clone, PartialEq)]
pub enum Optimiser {
    Sgd(Sgd),
    Adam(Adam),
}

impl Optimiser {
    /// A fresh optimiser of `config.train.optimizer` at learning rate `lr` (the caller's
    /// schedule decides it): SGD with `train.momentum`, `train.nesterov` and
    /// `train.weight_decay` (DVERGE's `get_optimizers`: 0.9, no Nesterov, 1e-4), or Adam with
    /// `train.adam` (betas, eps) and `train.weight_decay` as coupled L2 decay
    /// (`torch.optim.Adam(weight_decay=...)`, not AdamW; ADP's and GAL's ports: 1e-4, eps
    /// 1e-7).
    ///
    /// # Panics
    /// As [`Sgd::new`] / [`Adam::new`], never for a validated config and `lr >= 0`.
    pub fn for_config(config: &eio_spec::config::Config, lr: f64) -> Self {
        let t = &config.train;
        match t.optimizer {
            eio_spec::config::Optimizer::Sgd => Optimiser::Sgd(Sgd::new(SgdConfig {
                lr,
                momentum: t.momentum,
                weight_decay: t.weight_decay,
                nesterov: t.nesterov,
            })),
            eio_spec::config::Optimizer::Adam => Optimiser::Adam(Adam::new(AdamConfig {
                lr,
                beta1: t.adam.beta1,
                beta2: t.adam.beta2,
                eps: t.adam.eps,
                weight_decay: t.weight_decay,
            })),
        }
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Optimiser::Sgd(o) => o.config.lr,
            Optimiser::Adam(o) => o.config.lr,
        }
    }

    /// Sets the learning rate (a schedule's step); the state is kept.
    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optimiser::Sgd(o) => o.config.lr = lr,
            Optimiser::Adam(o) => o.config.lr = lr,
        }
    }

    /// One update of parameter `name`: [`Sgd::step_param`] or [`Adam::step_param`].
    /// `grad == None` leaves `param` and its state untouched.
    ///
    /// # Panics
    /// As the optimiser's own `step_param`.
    pub fn step_param(&mut self, name: &str, param: &mut ArrayD<f64>, grad: Option<&ArrayD<f64>>) {
        match self {
            Optimiser::Sgd(o) => o.step_param(name, param, grad),
            Optimiser::Adam(o) => o.step_param(name, param, grad),
        }
    }
}

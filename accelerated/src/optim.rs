//! SGD and Adam on device tensors, exactly as `torch.optim.SGD` / `torch.optim.Adam` (the
//! equations are documented in `eio_reference::optim`). A `None` gradient skips the parameter
//! entirely: no decay, no move, state untouched (what the authors' code relies on).

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

/// SGD hyper-parameters (PyTorch's, dampening 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// SGD with momentum, Nesterov and coupled weight decay.
#[derive(Debug, Clone)]
pub struct Sgd {
    pub config: SgdConfig,
    buffers: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// A fresh optimiser.
    pub fn new(config: SgdConfig) -> Self {
        Sgd {
            config,
            buffers: BTreeMap::new(),
        }
    }

    /// An optimiser that continues from stored momentum buffers (a resumed checkpoint).
    pub fn with_buffers(config: SgdConfig, buffers: BTreeMap<String, Tensor>) -> Self {
        Sgd { config, buffers }
    }

    /// Every momentum buffer, by parameter name (what a checkpoint stores).
    pub fn buffers(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// The momentum buffer of `name`, once it exists.
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.buffers.get(name)
    }

    /// One update of `param`: d = g + λp; b = d (first step) or μb + d; d = d + μb (Nesterov)
    /// or b; p ← p − lr·d. `None` leaves everything untouched.
    ///
    /// # Errors
    /// On a device error.
    pub fn step_param(
        &mut self,
        name: &str,
        param: &Tensor,
        grad: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(grad) = grad else {
            return Ok(param.clone());
        };
        let c = self.config;
        let mut d = if c.weight_decay != 0.0 {
            (grad + (param * c.weight_decay)?)?
        } else {
            grad.clone()
        };
        if c.momentum != 0.0 {
            let buf = match self.buffers.remove(name) {
                Some(b) => ((b * c.momentum)? + &d)?,
                None => d.clone(),
            };
            d = if c.nesterov {
                (d + (&buf * c.momentum)?)?
            } else {
                buf.clone()
            };
            self.buffers.insert(name.to_string(), buf);
        }
        param - (d * c.lr)?
    }
}

/// Adam hyper-parameters (PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The per-parameter state of [`Adam`], named as in PyTorch's `optimizer.state[p]`
/// (`eio_reference::optim::AdamParamState`).
#[derive(Debug, Clone)]
pub struct AdamParamState {
    /// `step`: the number of updates this parameter has received (the t of the bias
    /// corrections).
    pub step: u64,
    /// `exp_avg`: the first moment m, the parameter's shape, dtype and device.
    pub exp_avg: Tensor,
    /// `exp_avg_sq`: the second moment v, likewise.
    pub exp_avg_sq: Tensor,
}

/// Adam with coupled weight decay and bias correction.
///
/// A checkpoint saves [`Adam::states`] (per parameter name: `step`, `exp_avg`, `exp_avg_sq`)
/// with [`Adam::config`], and resumes with [`Adam::with_states`]; the resumed optimiser then
/// takes exactly the steps the original would have. A parameter absent from the map has not
/// been updated yet (its first step starts from zero moments and t = 1), as in PyTorch.
#[derive(Debug, Clone)]
pub struct Adam {
    pub config: AdamConfig,
    state: BTreeMap<String, AdamParamState>,
}

impl Adam {
    /// A fresh optimiser.
    pub fn new(config: AdamConfig) -> Self {
        Adam {
            config,
            state: BTreeMap::new(),
        }
    }

    /// An optimiser that continues from stored per-parameter states (a resumed checkpoint):
    /// the inverse of [`Adam::states`]. Each state's moments must have their parameter's
    /// shape, dtype and device.
    pub fn with_states(config: AdamConfig, states: BTreeMap<String, AdamParamState>) -> Self {
        Adam {
            config,
            state: states,
        }
    }

    /// Every parameter's state, by name (what a checkpoint stores): only parameters that
    /// have been updated at least once appear.
    pub fn states(&self) -> &BTreeMap<String, AdamParamState> {
        &self.state
    }

    /// The state of parameter `name`, once it has been updated.
    pub fn state(&self, name: &str) -> Option<&AdamParamState> {
        self.state.get(name)
    }

    /// One update: g' = g + λp; m = β₁m + (1−β₁)g'; v = β₂v + (1−β₂)g'²;
    /// p ← p − lr/(1−β₁ᵗ) · m / (sqrt(v)/sqrt(1−β₂ᵗ) + eps). `None` skips.
    ///
    /// # Errors
    /// On a device error.
    pub fn step_param(
        &mut self,
        name: &str,
        param: &Tensor,
        grad: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(grad) = grad else {
            return Ok(param.clone());
        };
        let c = self.config;
        let g = if c.weight_decay != 0.0 {
            (grad + (param * c.weight_decay)?)?
        } else {
            grad.clone()
        };
        let s = match self.state.remove(name) {
            Some(s) => s,
            None => AdamParamState {
                step: 0,
                exp_avg: g.zeros_like()?,
                exp_avg_sq: g.zeros_like()?,
            },
        };
        let step = s.step + 1;
        let exp_avg = ((s.exp_avg * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let exp_avg_sq = ((s.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        // PyTorch evaluates `beta ** step` with Python floats, i.e. `pow`.
        let t = step as f64;
        let bias1 = 1.0 - c.beta1.powf(t);
        let bias2_sqrt = (1.0 - c.beta2.powf(t)).sqrt();
        let denom = ((exp_avg_sq.sqrt()? / bias2_sqrt)? + c.eps)?;
        let updated = (param - (exp_avg.div(&denom)? * (c.lr / bias1))?)?;
        self.state.insert(
            name.to_string(),
            AdamParamState {
                step,
                exp_avg,
                exp_avg_sq,
            },
        );
        Ok(updated)
    }
}

/// The main phase's optimiser of one model or ensemble member, as `train.optimizer` picks it
/// (`eio_reference::optim::Optimiser`, which documents the choice): [`Sgd`] or [`Adam`].
#[derive(Debug, Clone)]
pub enum Optimiser {
    Sgd(Sgd),
    Adam(Adam),
}

impl Optimiser {
    /// A fresh optimiser of `config.train.optimizer` at learning rate `lr`: SGD with
    /// `train.momentum`, `train.nesterov`, `train.weight_decay`, or Adam with `train.adam` and
    /// `train.weight_decay` as coupled L2 decay (not AdamW).
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

    /// One update of parameter `name` ([`Sgd::step_param`] or [`Adam::step_param`]): the new
    /// value. `None` returns `param` unchanged and leaves the state untouched.
    ///
    /// # Errors
    /// On a device error.
    pub fn step_param(
        &mut self,
        name: &str,
        param: &Tensor,
        grad: Option<&Tensor>,
    ) -> Result<Tensor> {
        match self {
            Optimiser::Sgd(o) => o.step_param(name, param, grad),
            Optimiser::Adam(o) => o.step_param(name, param, grad),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn host(t: &Tensor) -> Vec<f64> {
        t.to_vec1::<f64>().expect("host values")
    }

    /// An Adam rebuilt from [`Adam::states`] with [`Adam::with_states`] after two steps takes
    /// the same third step as the original, bit for bit; and `for_config` picks the
    /// optimiser and its constants from `train`.
    #[test]
    fn adam_state_round_trip_and_for_config() {
        let mut config = eio_spec::config::Config::default();
        config.train.optimizer = eio_spec::config::Optimizer::Adam;
        config.train.adam.eps = 1e-7;
        config.train.weight_decay = 1e-2;
        let Optimiser::Adam(mut adam) = Optimiser::for_config(&config, 1e-2) else {
            panic!("train.optimizer = adam builds an Adam");
        };
        assert_eq!(adam.config.eps, 1e-7);
        assert_eq!(adam.config.weight_decay, 1e-2);
        let mut p = Tensor::new(&[0.5f64, -1.0, 2.0], &Device::Cpu).expect("p");
        let grads = [[0.1f64, -0.2, 0.3], [-0.4, 0.5, 0.05], [0.2, 0.2, -0.7]];
        for g in &grads[..2] {
            let g = Tensor::new(g, &Device::Cpu).expect("g");
            p = adam.step_param("w", &p, Some(&g)).expect("step");
        }
        assert_eq!(adam.state("w").map(|s| s.step), Some(2));
        let mut resumed = Adam::with_states(adam.config, adam.states().clone());
        let g = Tensor::new(&grads[2], &Device::Cpu).expect("g");
        let a = adam.step_param("w", &p, Some(&g)).expect("step");
        let b = resumed.step_param("w", &p, Some(&g)).expect("step");
        assert_eq!(host(&a), host(&b));
        assert_eq!(resumed.states()["w"].step, 3);
        assert_eq!(resumed.states()["w"].exp_avg.dtype(), DType::F64);
        config.train.optimizer = eio_spec::config::Optimizer::Sgd;
        let sgd = Optimiser::for_config(&config, 0.1);
        assert!(
            matches!(sgd, Optimiser::Sgd(ref s) if s.config.momentum == 0.9 && !s.config.nesterov)
        );
        assert_eq!(sgd.lr(), 0.1);
    }
}

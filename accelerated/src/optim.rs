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

#[derive(Debug, Clone)]
struct AdamState {
    step: i32,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Adam with coupled weight decay and bias correction.
#[derive(Debug, Clone)]
pub struct Adam {
    pub config: AdamConfig,
    state: BTreeMap<String, AdamState>,
}

impl Adam {
    /// A fresh optimiser.
    pub fn new(config: AdamConfig) -> Self {
        Adam {
            config,
            state: BTreeMap::new(),
        }
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
            None => AdamState {
                step: 0,
                exp_avg: g.zeros_like()?,
                exp_avg_sq: g.zeros_like()?,
            },
        };
        let step = s.step + 1;
        let exp_avg = ((s.exp_avg * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let exp_avg_sq = ((s.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let bias1 = 1.0 - c.beta1.powf(f64::from(step));
        let bias2_sqrt = (1.0 - c.beta2.powf(f64::from(step))).sqrt();
        let denom = ((exp_avg_sq.sqrt()? / bias2_sqrt)? + c.eps)?;
        let updated = (param - (exp_avg.div(&denom)? * (c.lr / bias1))?)?;
        self.state.insert(
            name.to_string(),
            AdamState {
                step,
                exp_avg,
                exp_avg_sq,
            },
        );
        Ok(updated)
    }
}

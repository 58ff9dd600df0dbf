//! The settings of the rival ensemble methods the paper compares EIO with (DVERGE, ADP, GAL)
//! and of TRS, a later rival; facts from `rivals.md` (read from DVERGE's and TRS's public code).
//! Each method is `train.method = "<name>"` over `train.ensemble_size` members; the sections
//! here hold what only that method reads. The equations are in `spec/SPEC.md`, section
//! "Rival methods".

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, LayerSchedule};
use crate::Preset;

/// The optimiser of the main phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// SGD with `train.momentum`, `train.nesterov`, `train.weight_decay`, one per member
    /// (DVERGE's `get_optimizers`).
    Sgd,
    /// Adam with `train.adam` and coupled weight decay `train.weight_decay`
    /// (`torch.optim.Adam`, not AdamW). One Adam over all members (ADP, GAL, TRS) is exactly
    /// one Adam per member, as Adam acts on each parameter alone with one shared step count.
    Adam,
}

/// Adam's constants (`torch.optim.Adam`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamSettings {
    /// Default 0.9 (PyTorch).
    pub beta1: f64,
    /// Default 0.999 (PyTorch).
    pub beta2: f64,
    /// Default 1e-8 (PyTorch); DVERGE's ADP and GAL and TRS use 1e-7.
    pub eps: f64,
}

impl Default for AdamSettings {
    fn default() -> Self {
        AdamSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// DVERGE (Yang et al. 2020): each member distils its own x'_j from (x_s, x_t) with Eq. 2's
/// machinery (the `[distill]` section), then member i trains on Σ_{j≠i} CE(f_i(x'_j), y_s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DvergeConfig {
    /// When the distillation layer is drawn. Default `per-epoch` (DVERGE's `train_dverge.py`
    /// draws `random.randint(1, depth)` once per epoch).
    pub layer_schedule: LayerSchedule,
    /// DVERGE's `--plus-adv`: add CE on PGD examples (`train.adv`, random start, train-mode
    /// BN) made against member i alone to member i's loss. Default false.
    pub plus_adv: bool,
    /// DVERGE's `--dverge-coeff`: with `plus_adv`, member i's loss is
    /// coeff · Σ_{j≠i} CE(f_i(x'_j), y_s) + CE(f_i(x_adv,i), y_s). Default 1.0.
    pub coeff: f64,
    /// DVERGE's `--init-from`: a checkpoint of a trained baseline ensemble of the same size
    /// and model to start from (the public code always starts there; its "from scratch"
    /// option is broken). Empty: start from fresh weights. A relative path is resolved
    /// against the working folder. Default empty.
    pub init_from: String,
}

impl Default for DvergeConfig {
    fn default() -> Self {
        DvergeConfig {
            layer_schedule: LayerSchedule::PerEpoch,
            plus_adv: false,
            coeff: 1.0,
            init_from: String::new(),
        }
    }
}

/// ADP (Pang et al. 2019), DVERGE's port:
/// loss = Σ_m CE_m − alpha·H(p̄) − beta·log det(G + det_offset·I).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdpConfig {
    /// Weight of the ensemble entropy. Default 2.0 (`arguments.py --alpha`).
    pub alpha: f64,
    /// Weight of the log-det. Default 0.5 (`arguments.py --beta`).
    pub beta: f64,
    /// Added to G's diagonal before the log-det. Default 1e-6 (`det_offset`).
    pub det_offset: f64,
    /// Added inside the entropy's log. Default 1e-20 (`log_offset`).
    pub log_offset: f64,
}

impl Default for AdpConfig {
    fn default() -> Self {
        AdpConfig {
            alpha: 2.0,
            beta: 0.5,
            det_offset: 1e-6,
            log_offset: 1e-20,
        }
    }
}

/// GAL (Kariyappa & Qureshi 2019), DVERGE's port:
/// loss = (Σ_m CE_m)/N + coherence·mean_b log(Σ_{i<j} exp(cos(∇_x CE_i, ∇_x CE_j)) + log_offset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GalConfig {
    /// Weight of the coherence term. Default 0.5 (`arguments.py --lambda`).
    pub coherence: f64,
    /// Added inside the coherence's log. Default 1e-20 (`log_offset`).
    pub log_offset: f64,
    /// Std of the Gaussian noise added to a training image (not clamped). Default 0.045
    /// (`utils.py AddGaussianNoise(0., 0.045)`).
    pub noise_std: f64,
    /// Probability that an image gets noise. Default 0.5 (`AddGaussianNoise prob=.5`).
    pub noise_probability: f64,
    /// Run each member's CE term on a second train-mode forward of the same images, as the
    /// public code does (`m(inputs.clone().detach())`): the outputs are the same, the running
    /// statistics take a second update. Default true.
    pub second_forward: bool,
}

impl Default for GalConfig {
    fn default() -> Self {
        GalConfig {
            coherence: 0.5,
            log_offset: 1e-20,
            noise_std: 0.045,
            noise_probability: 0.5,
            second_forward: true,
        }
    }
}

/// TRS (Yang et al., NeurIPS 2021): loss = Σ_m CE_m + scale·(coeff·L_cos + lamda·L_smooth).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrsConfig {
    /// Weight of the gradient-alignment term. Default 2.0 (`--coeff`).
    pub coeff: f64,
    /// Weight of the smoothness term. Default 2.0 (`--lamda`).
    pub lamda: f64,
    /// Overall weight of both terms. Default 5.0 (`--scale`).
    pub scale: f64,
    /// Compute L_smooth on a batch whose second half is moved by the PGD that maximises the
    /// gradient magnitude (`--plus-adv`); else on the clean batch. Default true.
    pub plus_adv: bool,
    /// That PGD's radius at epoch 0 (`--init-eps`), annealed linearly to `adv_eps`.
    /// Default 0.1.
    pub init_eps: f64,
    /// The radius the annealing heads for (`--adv-eps`; the last epoch uses
    /// init_eps + (adv_eps − init_eps)·(E − 1)/E). Default 0.2.
    pub adv_eps: f64,
    /// That PGD's steps. Default 6 (`trainer.py PGD`).
    pub pgd_steps: usize,
    /// Its step size as a fraction of the radius. Default 1/3 (`alpha = eps / 3.`).
    pub pgd_step_fraction: f64,
    /// Step along the sign of the gradients summed over the PGD's steps so far, as the public
    /// code does (`adv.grad` is never zeroed inside its loop); false: the current step's
    /// gradient only. Default true.
    pub pgd_accumulate: bool,
}

impl Default for TrsConfig {
    fn default() -> Self {
        TrsConfig {
            coeff: 2.0,
            lamda: 2.0,
            scale: 5.0,
            plus_adv: true,
            init_eps: 0.1,
            adv_eps: 0.2,
            pgd_steps: 6,
            pgd_step_fraction: 1.0 / 3.0,
            pgd_accumulate: true,
        }
    }
}

impl TrsConfig {
    /// The PGD radius of (0-based) epoch `epoch` of `epochs`:
    /// init_eps + (adv_eps − init_eps)·epoch/epochs (`trainer.py`'s `cureps`; `train_trs.py`
    /// counts epochs from 0).
    pub fn radius(&self, epoch: usize, epochs: usize) -> f64 {
        let e = epoch as f64 / epochs.max(1) as f64;
        (self.adv_eps - self.init_eps) * e + self.init_eps
    }
}

/// The rival sections' range checks (called by `Config::validate`), and what a method needs of
/// the rest of the config.
pub(crate) fn validate(config: &crate::config::Config, v: &mut crate::config::Validator) {
    use crate::config::Method;
    let t = &config.train;
    v.closed_open("train.adam.beta1", t.adam.beta1, 0.0, 1.0);
    v.closed_open("train.adam.beta2", t.adam.beta2, 0.0, 1.0);
    v.positive("train.adam.eps", t.adam.eps);
    if t.optimizer == Optimizer::Adam
        && !matches!(
            t.method,
            Method::Dverge | Method::Adp | Method::Gal | Method::Trs
        )
    {
        v.fail(
            "train.optimizer",
            "\"adam\"",
            &format!(
                "is for the rival ensemble methods (dverge, adp, gal, trs); train.method = \"{}\" trains with SGD",
                method_name(t.method)
            ),
        );
    }
    if t.method.is_ensemble() && config.model.n != 1 {
        v.fail(
            "model.n",
            config.model.n,
            &format!(
                "must be 1: train.method = \"{}\" trains plain networks",
                method_name(t.method)
            ),
        );
    }
    if matches!(t.method, Method::Dverge | Method::Gal | Method::Trs) && t.ensemble_size < 2 {
        v.fail(
            "train.ensemble_size",
            t.ensemble_size,
            &format!(
                "must be at least 2: {} compares members",
                method_name(t.method)
            ),
        );
    }
    let a = &config.adp;
    v.closed_open("adp.alpha", a.alpha, 0.0, f64::INFINITY);
    v.closed_open("adp.beta", a.beta, 0.0, f64::INFINITY);
    v.positive("adp.det_offset", a.det_offset);
    v.positive("adp.log_offset", a.log_offset);
    v.closed_open("dverge.coeff", config.dverge.coeff, 0.0, f64::INFINITY);
    let g = &config.gal;
    v.closed_open("gal.coherence", g.coherence, 0.0, f64::INFINITY);
    v.positive("gal.log_offset", g.log_offset);
    v.closed_open("gal.noise_std", g.noise_std, 0.0, f64::INFINITY);
    if !(0.0..=1.0).contains(&g.noise_probability) {
        v.fail(
            "gal.noise_probability",
            g.noise_probability,
            "is outside [0, 1]",
        );
    }
    let r = &config.trs;
    v.closed_open("trs.coeff", r.coeff, 0.0, f64::INFINITY);
    v.closed_open("trs.lamda", r.lamda, 0.0, f64::INFINITY);
    v.closed_open("trs.scale", r.scale, 0.0, f64::INFINITY);
    v.closed_open("trs.init_eps", r.init_eps, 0.0, 1.0);
    v.closed_open("trs.adv_eps", r.adv_eps, 0.0, 1.0);
    v.at_least("trs.pgd_steps", r.pgd_steps, 1);
    v.open_closed("trs.pgd_step_fraction", r.pgd_step_fraction, 0.0, 1.0);
    let mut names = std::collections::BTreeSet::new();
    for (i, rival) in config.run.rivals.iter().enumerate() {
        let field = format!("run.rivals[{i}].name");
        let safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if rival.name.is_empty() || !rival.name.chars().all(safe) || rival.name.starts_with('.') {
            v.fail(
                &field,
                format!("{:?}", rival.name),
                "must be a folder name: letters, digits, '.', '_', '-', not starting with '.'",
            );
        } else if ["baseline", "eio", "derived", "surrogates", "suite"]
            .contains(&rival.name.as_str())
            || !names.insert(rival.name.clone())
        {
            v.fail(
                &field,
                format!("{:?}", rival.name),
                "is used twice or by a stage of `eio run` (baseline, eio, derived, surrogates, suite)",
            );
        }
        if let Err(e) = rival_config(config, rival) {
            v.fail(
                &format!("run.rivals[{i}]"),
                format!("{:?}", rival.name),
                &e.to_string(),
            );
        }
    }
}

/// The method's name as written in `train.method`.
pub fn method_name(method: crate::config::Method) -> &'static str {
    use crate::config::Method;
    match method {
        Method::Baseline => "baseline",
        Method::Eio => "eio",
        Method::Advt => "advt",
        Method::Dverge => "dverge",
        Method::Adp => "adp",
        Method::Gal => "gal",
        Method::Trs => "trs",
    }
}

/// One rival of `eio run` (`[[run.rivals]]`): a method trained from a preset's settings under
/// the run's data and evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RivalRun {
    /// Its name in the report and its folder under the run (letters, digits, `.`, `_`, `-`),
    /// e.g. `"ADP-3"`.
    pub name: String,
    /// The preset whose method settings it trains with, e.g. `"adp-3"`.
    pub preset: String,
    /// `key=value` assignments applied last (the run's scale: epochs, milestones, ...).
    #[serde(default)]
    pub set: Vec<String>,
}

/// The config a rival trains with: the preset's, with the run's `seed`, `[data]`, `[eval]`,
/// `[blackbox]` and `[run]` (without rivals), the run's model as a plain network (`n = 1`)
/// with the preset's activation (GAL's LeakyReLU), then the rival's `set` assignments.
///
/// # Errors
/// An unknown preset, or an assignment that does not parse or validate, named with the rival.
pub fn rival_config(config: &Config, rival: &RivalRun) -> Result<Config, ConfigError> {
    let preset = Preset::from_name(&rival.preset).ok_or_else(|| ConfigError::Invalid {
        origin: format!("run.rivals ({})", rival.name),
        errors: crate::config::FieldErrors(vec![crate::config::FieldError {
            field: "preset".into(),
            value: format!("{:?}", rival.preset),
            rule: format!(
                "is not a preset (one of {})",
                Preset::ALL.map(Preset::name).join(", ")
            ),
        }]),
    })?;
    let mut c = preset.config()?;
    c.seed = config.seed;
    c.data = config.data.clone();
    c.eval = config.eval.clone();
    c.blackbox = config.blackbox.clone();
    c.run = crate::config::RunConfig {
        rivals: Vec::new(),
        ..config.run.clone()
    };
    let (activation, slope) = (c.model.activation, c.model.leaky_slope);
    c.model = config.model.clone();
    c.model.n = 1;
    c.model.activation = activation;
    c.model.leaky_slope = slope;
    c.with_overrides(&rival.set)
}

//! 2-D batch normalisation with PyTorch `nn.BatchNorm2d` semantics
//! (`affine=True`, `track_running_stats=True`).

use ndarray::{Array1, Array4};

/// PyTorch's default `eps` of `nn.BatchNorm2d`.
pub const BN_EPS: f64 = 1e-5;

/// PyTorch's default `momentum` of `nn.BatchNorm2d`.
pub const BN_MOMENTUM: f64 = 0.1;

/// Train or eval BatchNorm, as `eio-spec` defines it (`model.train()` / `model.eval()`).
pub use eio_spec::config::BnMode;

/// The running statistics (buffers) of one batch-norm layer with `C`
/// channels, named as in PyTorch's `state_dict`.
#[derive(Debug, Clone, PartialEq)]
pub struct BnRunningStats {
    /// `running_mean`, shape `[C]`.
    pub running_mean: Array1<f64>,
    /// `running_var` (an unbiased estimate), shape `[C]`.
    pub running_var: Array1<f64>,
    /// `num_batches_tracked`: the number of train-mode forward passes.
    pub num_batches_tracked: i64,
}

impl BnRunningStats {
    /// PyTorch's initial buffers: `running_mean = 0`, `running_var = 1`,
    /// `num_batches_tracked = 0`.
    pub fn new(channels: usize) -> Self {
        Self {
            running_mean: Array1::zeros(channels),
            running_var: Array1::ones(channels),
            num_batches_tracked: 0,
        }
    }

    /// The number of channels `C`.
    pub fn channels(&self) -> usize {
        self.running_mean.len()
    }
}

/// The result of a [`batch_norm2d`] forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm2dOutput {
    /// `y`, same shape as the input.
    pub output: Array4<f64>,
    /// The per-channel mean used for normalising: the batch mean in
    /// [`BnMode::Train`], `running_mean` in [`BnMode::Eval`].
    pub mean: Array1<f64>,
    /// The per-channel variance used for normalising: the *biased* batch
    /// variance in [`BnMode::Train`], `running_var` in [`BnMode::Eval`].
    pub var: Array1<f64>,
    /// The running statistics after this pass: updated in
    /// [`BnMode::Train`], an unchanged copy in [`BnMode::Eval`].
    pub running: BnRunningStats,
}

/// The gradients of a loss `L` through [`batch_norm2d`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm2dGrads {
    /// `dL/dx`, shape `[N, C, H, W]`.
    pub input: Array4<f64>,
    /// `dL/dgamma` (PyTorch's `weight`), shape `[C]`.
    pub gamma: Array1<f64>,
    /// `dL/dbeta` (PyTorch's `bias`), shape `[C]`.
    pub beta: Array1<f64>,
}

fn check_shapes(
    input: &Array4<f64>,
    gamma: &Array1<f64>,
    beta: &Array1<f64>,
    running: &BnRunningStats,
) {
    let c = input.dim().1;
    assert_eq!(
        gamma.len(),
        c,
        "batch_norm2d: gamma has {} entries, input has {c} channels",
        gamma.len()
    );
    assert_eq!(
        beta.len(),
        c,
        "batch_norm2d: beta has {} entries, input has {c} channels",
        beta.len()
    );
    assert_eq!(
        running.running_mean.len(),
        c,
        "batch_norm2d: running_mean has {} entries, input has {c} channels",
        running.running_mean.len()
    );
    assert_eq!(
        running.running_var.len(),
        c,
        "batch_norm2d: running_var has {} entries, input has {c} channels",
        running.running_var.len()
    );
}

/// The per-channel mean and *biased* variance over `(N, H, W)`.
fn batch_statistics(input: &Array4<f64>) -> (Array1<f64>, Array1<f64>) {
    let (batch, channels, h, w) = input.dim();
    let count = (batch * h * w) as f64;
    let mut mean = Array1::<f64>::zeros(channels);
    let mut var = Array1::<f64>::zeros(channels);
    for c in 0..channels {
        let mut sum = 0.0;
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    sum += input[[n, c, i, j]];
                }
            }
        }
        let mu = sum / count;
        let mut sq = 0.0;
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    let d = input[[n, c, i, j]] - mu;
                    sq += d * d;
                }
            }
        }
        mean[c] = mu;
        var[c] = sq / count;
    }
    (mean, var)
}

/// Forward batch norm over NCHW input, PyTorch `nn.BatchNorm2d` semantics.
///
/// With `M = N * H * W` values per channel `c`:
///
/// ```text
/// Train:  mu_c     = (1/M) sum_{n,i,j} x[n,c,i,j]
///         var_c    = (1/M) sum_{n,i,j} (x[n,c,i,j] - mu_c)^2      (biased)
/// Eval:   mu_c     = running_mean_c,  var_c = running_var_c
/// Both:   x_hat    = (x[n,c,i,j] - mu_c) / sqrt(var_c + eps)
///         y[n,c,i,j] = gamma_c * x_hat + beta_c
/// ```
///
/// In [`BnMode::Train`] the running statistics are updated as PyTorch does
/// (with `m` = `momentum`, PyTorch default [`BN_MOMENTUM`] = 0.1):
///
/// ```text
/// running_mean_c      = (1 - m) * running_mean_c + m * mu_c
/// running_var_c       = (1 - m) * running_var_c  + m * var_c * M / (M - 1)   (unbiased)
/// num_batches_tracked = num_batches_tracked + 1
/// ```
///
/// The function is pure: `running` is not modified; the updated statistics
/// are returned in [`BatchNorm2dOutput::running`] (an unchanged copy in
/// [`BnMode::Eval`]). `eps` is PyTorch's default [`BN_EPS`] = 1e-5 unless the
/// caller chooses otherwise. `gamma` and `beta` are PyTorch's `weight` and
/// `bias`.
///
/// # Panics
///
/// If `gamma`, `beta` or the running statistics do not have `C` entries, or,
/// in [`BnMode::Train`], if `M <= 1` (PyTorch refuses this too: "Expected more
/// than 1 value per channel when training").
pub fn batch_norm2d(
    input: &Array4<f64>,
    gamma: &Array1<f64>,
    beta: &Array1<f64>,
    running: &BnRunningStats,
    mode: BnMode,
    eps: f64,
    momentum: f64,
) -> BatchNorm2dOutput {
    check_shapes(input, gamma, beta, running);
    let (batch, channels, h, w) = input.dim();
    let count = batch * h * w;
    let (mean, var, new_running) = match mode {
        BnMode::Train => {
            assert!(
                count > 1,
                "batch_norm2d: train mode needs more than 1 value per channel, got N*H*W = {count}"
            );
            let (mean, var) = batch_statistics(input);
            let mut updated = running.clone();
            let bessel = count as f64 / (count as f64 - 1.0);
            for c in 0..channels {
                updated.running_mean[c] =
                    (1.0 - momentum) * running.running_mean[c] + momentum * mean[c];
                updated.running_var[c] =
                    (1.0 - momentum) * running.running_var[c] + momentum * var[c] * bessel;
            }
            updated.num_batches_tracked += 1;
            (mean, var, updated)
        }
        BnMode::Eval => (
            running.running_mean.clone(),
            running.running_var.clone(),
            running.clone(),
        ),
    };
    let mut output = Array4::<f64>::zeros((batch, channels, h, w));
    for c in 0..channels {
        let inv_std = 1.0 / (var[c] + eps).sqrt();
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    let x_hat = (input[[n, c, i, j]] - mean[c]) * inv_std;
                    output[[n, c, i, j]] = gamma[c] * x_hat + beta[c];
                }
            }
        }
    }
    BatchNorm2dOutput {
        output,
        mean,
        var,
        running: new_running,
    }
}

/// Backward of [`batch_norm2d`]. With `g = dL/dy` (`grad_output`, same shape
/// as the input), `M = N * H * W`, `x_hat` and `sigma_c = sqrt(var_c + eps)`
/// as in the forward pass, and all sums over `(n, i, j)` of channel `c`:
///
/// ```text
/// dL/dbeta_c  = sum g
/// dL/dgamma_c = sum g * x_hat
/// Train:  dL/dx = gamma_c / (M * sigma_c) * (M * g - sum g - x_hat * sum(g * x_hat))
/// Eval:   dL/dx = gamma_c / sigma_c * g
/// ```
///
/// In train mode the gradient flows through the batch mean and variance
/// (the running statistics are buffers and receive no gradient). `running`
/// must be the statistics passed to the forward pass; only
/// [`BnMode::Eval`] reads them. `eps` must match the forward pass.
///
/// # Panics
///
/// As [`batch_norm2d`], and if `grad_output` and `input` shapes differ.
pub fn batch_norm2d_backward(
    input: &Array4<f64>,
    gamma: &Array1<f64>,
    running: &BnRunningStats,
    mode: BnMode,
    eps: f64,
    grad_output: &Array4<f64>,
) -> BatchNorm2dGrads {
    check_shapes(input, gamma, gamma, running);
    assert_eq!(
        input.shape(),
        grad_output.shape(),
        "batch_norm2d_backward: grad_output shape {:?} != input shape {:?}",
        grad_output.shape(),
        input.shape()
    );
    let (batch, channels, h, w) = input.dim();
    let count = batch * h * w;
    let (mean, var) = match mode {
        BnMode::Train => {
            assert!(
                count > 1,
                "batch_norm2d_backward: train mode needs more than 1 value per channel, got N*H*W = {count}"
            );
            batch_statistics(input)
        }
        BnMode::Eval => (running.running_mean.clone(), running.running_var.clone()),
    };
    let m = count as f64;
    let mut grad_input = Array4::<f64>::zeros((batch, channels, h, w));
    let mut grad_gamma = Array1::<f64>::zeros(channels);
    let mut grad_beta = Array1::<f64>::zeros(channels);
    for c in 0..channels {
        let inv_std = 1.0 / (var[c] + eps).sqrt();
        let x_hat = |n: usize, i: usize, j: usize| (input[[n, c, i, j]] - mean[c]) * inv_std;
        let mut sum_g = 0.0;
        let mut sum_g_xhat = 0.0;
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    let g = grad_output[[n, c, i, j]];
                    sum_g += g;
                    sum_g_xhat += g * x_hat(n, i, j);
                }
            }
        }
        grad_beta[c] = sum_g;
        grad_gamma[c] = sum_g_xhat;
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    let g = grad_output[[n, c, i, j]];
                    grad_input[[n, c, i, j]] = match mode {
                        BnMode::Train => {
                            gamma[c] * inv_std / m * (m * g - sum_g - x_hat(n, i, j) * sum_g_xhat)
                        }
                        BnMode::Eval => gamma[c] * inv_std * g,
                    };
                }
            }
        }
    }
    BatchNorm2dGrads {
        input: grad_input,
        gamma: grad_gamma,
        beta: grad_beta,
    }
}

/// The tangent (forward-mode derivative) of [`batch_norm2d`]'s output along an input tangent
/// `u = ẋ` (`tangent`, same shape as the input), at fixed `gamma` and `beta`: the
/// Jacobian-vector product `ẏ = (dy/dx) u`. With `sigma_c = sqrt(var_c + eps)`, `x_hat` as in
/// the forward pass and `mean` over the `M = N * H * W` values of channel `c`:
///
/// ```text
/// Train:  ẋ_hat = (u - mean(u) - x_hat * mean(x_hat * u)) / sigma_c
///         ẏ     = gamma_c * ẋ_hat
/// Eval:   ẏ     = gamma_c * u / sigma_c          (sigma_c from running_var)
/// ```
///
/// In train mode the batch mean moves by `mean(u)` and `sigma_c` by `mean(x_hat * u)`. The
/// bias `beta` does not enter the tangent. Used by the reverse-over-forward second-order
/// gradients (`second_order`).
///
/// # Panics
///
/// As [`batch_norm2d_backward`], with `tangent` in place of `grad_output`.
pub fn batch_norm2d_tangent(
    input: &Array4<f64>,
    gamma: &Array1<f64>,
    running: &BnRunningStats,
    mode: BnMode,
    eps: f64,
    tangent: &Array4<f64>,
) -> Array4<f64> {
    let stats = ChannelStats::new("batch_norm2d_tangent", input, gamma, running, mode, eps);
    assert_eq!(
        input.shape(),
        tangent.shape(),
        "batch_norm2d_tangent: tangent shape {:?} != input shape {:?}",
        tangent.shape(),
        input.shape()
    );
    let (batch, channels, h, w) = input.dim();
    let mut out = Array4::<f64>::zeros((batch, channels, h, w));
    for c in 0..channels {
        let sigma = stats.sigma[c];
        let (mean_u, mean_xhat_u) = match mode {
            BnMode::Train => (
                stats.channel_mean(|n, i, j| tangent[[n, c, i, j]]),
                stats
                    .channel_mean(|n, i, j| stats.x_hat(input, n, c, i, j) * tangent[[n, c, i, j]]),
            ),
            BnMode::Eval => (0.0, 0.0),
        };
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    let x_hat = stats.x_hat(input, n, c, i, j);
                    let x_hat_dot = (tangent[[n, c, i, j]] - mean_u - x_hat * mean_xhat_u) / sigma;
                    out[[n, c, i, j]] = gamma[c] * x_hat_dot;
                }
            }
        }
    }
    out
}

/// The gradients, through [`batch_norm2d_tangent`], of a scalar `s` that reads the tangent
/// output `ẏ` (with `a_bar = ds/dẏ`): the part of a reverse-over-forward backward that flows
/// from the tangent computation. The usual first-order part (from `ds/dy`) is
/// [`batch_norm2d_backward`]'s, which the caller adds.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchNorm2dTangentGrads {
    /// `ds/dx` through `ẏ(x, u)` at fixed `u`: the second-order term, shape `[N, C, H, W]`
    /// (zero in [`BnMode::Eval`], where `ẏ` does not depend on `x`).
    pub input: Array4<f64>,
    /// `ds/du` (`u = ẋ`, the input tangent), shape `[N, C, H, W]`.
    pub tangent: Array4<f64>,
    /// `ds/dgamma` through `ẏ`, shape `[C]` (`beta` does not enter `ẏ`).
    pub gamma: Array1<f64>,
}

/// Backward of [`batch_norm2d_tangent`] with respect to the input `x`, the input tangent
/// `u = ẋ` (`tangent`) and `gamma`, for `ds/dẏ = grad_tangent_output` (written `ẏ_bar`).
/// With `sigma_c`, `x_hat`, `ẋ_hat` as in [`batch_norm2d_tangent`], `mean` and `sum` over the
/// `M` values of channel `c`, and `a = gamma_c * ẏ_bar`:
///
/// ```text
/// Eval:   ds/du     = gamma_c * ẏ_bar / sigma_c
///         ds/dgamma = sum ẏ_bar * u / sigma_c
///         ds/dx     = 0
/// Train:  ds/du     = (gamma_c / sigma_c) * (ẏ_bar - mean(ẏ_bar) - x_hat * mean(x_hat * ẏ_bar))
///         ds/dgamma = sum ẏ_bar * ẋ_hat
///         ds/dx     = (h - mean(h) - x_hat * mean(h * x_hat)) / sigma_c - (S / sigma_c) * x_hat / M
///   with  m_u = mean(x_hat * u),  m_a = mean(a * x_hat),  S = sum a * ẋ_hat,
///         h   = -(a * m_u + m_a * u) / sigma_c
/// ```
///
/// Derivation of the train-mode `ds/dx`: `S = sum a * ẋ_hat = (sum a * (u - mean(u)) -
/// M * m_u * m_a) / sigma_c` depends on `x` through `x_hat` and `sigma_c`. At fixed `sigma_c`,
/// `dS/dx_hat = h`; at fixed `x_hat`, `dS/dsigma_c = -S / sigma_c`. The chain rule through
/// `x_hat = (x - mu) / sigma_c` (the usual BatchNorm input backward applied to `h`) and
/// `dsigma_c/dx = x_hat / M` gives the formula. `ds/du` is the usual train-mode BatchNorm
/// input backward applied to `ẏ_bar` (the tangent map is the Jacobian of `y`, whose transpose
/// that backward is).
///
/// # Panics
///
/// As [`batch_norm2d_tangent`], and if `grad_tangent_output` and `input` shapes differ.
pub fn batch_norm2d_tangent_backward(
    input: &Array4<f64>,
    gamma: &Array1<f64>,
    running: &BnRunningStats,
    mode: BnMode,
    eps: f64,
    tangent: &Array4<f64>,
    grad_tangent_output: &Array4<f64>,
) -> BatchNorm2dTangentGrads {
    let what = "batch_norm2d_tangent_backward";
    let stats = ChannelStats::new(what, input, gamma, running, mode, eps);
    for (name, t) in [
        ("tangent", tangent),
        ("grad_tangent_output", grad_tangent_output),
    ] {
        assert_eq!(
            input.shape(),
            t.shape(),
            "{what}: {name} shape {:?} != input shape {:?}",
            t.shape(),
            input.shape()
        );
    }
    let (batch, channels, h, w) = input.dim();
    let mut grad_input = Array4::<f64>::zeros((batch, channels, h, w));
    let mut grad_tangent = Array4::<f64>::zeros((batch, channels, h, w));
    let mut grad_gamma = Array1::<f64>::zeros(channels);
    let m = stats.count;
    for c in 0..channels {
        let sigma = stats.sigma[c];
        let g = gamma[c];
        let x_hat = |n: usize, i: usize, j: usize| stats.x_hat(input, n, c, i, j);
        let u = |n: usize, i: usize, j: usize| tangent[[n, c, i, j]];
        let bar = |n: usize, i: usize, j: usize| grad_tangent_output[[n, c, i, j]];
        match mode {
            BnMode::Eval => {
                let mut sum = 0.0;
                stats.for_each(|n, i, j| {
                    grad_tangent[[n, c, i, j]] = g * bar(n, i, j) / sigma;
                    sum += bar(n, i, j) * u(n, i, j) / sigma;
                });
                grad_gamma[c] = sum;
            }
            BnMode::Train => {
                let mean_u = stats.channel_mean(u);
                let m_u = stats.channel_mean(|n, i, j| x_hat(n, i, j) * u(n, i, j));
                let x_hat_dot = |n: usize, i: usize, j: usize| {
                    (u(n, i, j) - mean_u - x_hat(n, i, j) * m_u) / sigma
                };
                // ds/du: the first-order BatchNorm input backward of ẏ_bar.
                let mean_bar = stats.channel_mean(bar);
                let mean_xhat_bar = stats.channel_mean(|n, i, j| x_hat(n, i, j) * bar(n, i, j));
                // a = gamma * ẏ_bar, S = sum a * ẋ_hat, m_a = mean(a * x_hat).
                let a = |n: usize, i: usize, j: usize| g * bar(n, i, j);
                let m_a = g * mean_xhat_bar;
                let mut s = 0.0;
                let mut sum_bar_xhat_dot = 0.0;
                stats.for_each(|n, i, j| {
                    grad_tangent[[n, c, i, j]] =
                        g / sigma * (bar(n, i, j) - mean_bar - x_hat(n, i, j) * mean_xhat_bar);
                    s += a(n, i, j) * x_hat_dot(n, i, j);
                    sum_bar_xhat_dot += bar(n, i, j) * x_hat_dot(n, i, j);
                });
                grad_gamma[c] = sum_bar_xhat_dot;
                // h = dS/dx_hat at fixed sigma, then through x_hat(x) and sigma(x).
                let h_of =
                    |n: usize, i: usize, j: usize| -(a(n, i, j) * m_u + m_a * u(n, i, j)) / sigma;
                let mean_h = stats.channel_mean(h_of);
                let mean_h_xhat = stats.channel_mean(|n, i, j| h_of(n, i, j) * x_hat(n, i, j));
                stats.for_each(|n, i, j| {
                    let xh = x_hat(n, i, j);
                    grad_input[[n, c, i, j]] =
                        (h_of(n, i, j) - mean_h - xh * mean_h_xhat) / sigma - s / sigma * xh / m;
                });
            }
        }
    }
    BatchNorm2dTangentGrads {
        input: grad_input,
        tangent: grad_tangent,
        gamma: grad_gamma,
    }
}

/// The per-channel normalising statistics of one pass (batch statistics in train mode, the
/// running ones in eval mode), for the tangent functions.
struct ChannelStats {
    mean: Array1<f64>,
    /// sqrt(var + eps).
    sigma: Array1<f64>,
    /// M = N * H * W.
    count: f64,
    dims: (usize, usize, usize),
}

impl ChannelStats {
    fn new(
        what: &str,
        input: &Array4<f64>,
        gamma: &Array1<f64>,
        running: &BnRunningStats,
        mode: BnMode,
        eps: f64,
    ) -> Self {
        check_shapes(input, gamma, gamma, running);
        let (batch, _, h, w) = input.dim();
        let count = batch * h * w;
        let (mean, var) = match mode {
            BnMode::Train => {
                assert!(
                    count > 1,
                    "{what}: train mode needs more than 1 value per channel, got N*H*W = {count}"
                );
                batch_statistics(input)
            }
            BnMode::Eval => (running.running_mean.clone(), running.running_var.clone()),
        };
        Self {
            mean,
            sigma: var.mapv(|v| (v + eps).sqrt()),
            count: count as f64,
            dims: (batch, h, w),
        }
    }

    fn x_hat(&self, input: &Array4<f64>, n: usize, c: usize, i: usize, j: usize) -> f64 {
        (input[[n, c, i, j]] - self.mean[c]) / self.sigma[c]
    }

    /// Calls `f(n, i, j)` for every position of one channel.
    fn for_each(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (batch, h, w) = self.dims;
        for n in 0..batch {
            for i in 0..h {
                for j in 0..w {
                    f(n, i, j);
                }
            }
        }
    }

    /// The mean of `f(n, i, j)` over one channel's `M` positions (`f` reads the channel).
    fn channel_mean(&self, f: impl Fn(usize, usize, usize) -> f64) -> f64 {
        let mut sum = 0.0;
        self.for_each(|n, i, j| sum += f(n, i, j));
        sum / self.count
    }
}

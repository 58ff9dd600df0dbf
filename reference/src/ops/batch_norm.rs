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

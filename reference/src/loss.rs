//! Losses and the softmax family, each with its gradient.
//!
//! Logits are `Array2<f64>` of shape `[N, K]` (batch, classes); labels are
//! `&[usize]` of length `N` with entries in `0..K`. Scalar losses return a
//! [`LossAndGrad`]: the value and the gradient of that value with respect to
//! the loss's (first) input, i.e. the backward pass for an upstream
//! gradient of 1.

use ndarray::{Array, Array2, Dimension, Ix2, Zip};

/// A scalar loss value together with its gradient with respect to the input.
#[derive(Debug, Clone, PartialEq)]
pub struct LossAndGrad<D: Dimension> {
    /// The loss value `L`.
    pub value: f64,
    /// `dL/d(input)`, the input's shape.
    pub grad: Array<f64, D>,
}

fn check_labels(op: &str, logits: &Array2<f64>, labels: &[usize]) {
    let (batch, classes) = logits.dim();
    assert_eq!(
        labels.len(),
        batch,
        "{op}: {} labels for a batch of {batch}",
        labels.len()
    );
    assert!(
        batch > 0,
        "{op}: empty batch (the mean over 0 samples is undefined)"
    );
    for (n, &y) in labels.iter().enumerate() {
        assert!(
            y < classes,
            "{op}: label {y} of sample {n} is out of range for {classes} classes"
        );
    }
}

/// `log(sum_k exp(z_k))` of one row, computed stably as
/// `m + log(sum_k exp(z_k - m))` with `m = max_k z_k`.
fn log_sum_exp(row: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = row.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    m + row.map(|z| (z - m).exp()).sum::<f64>().ln()
}

/// Row-wise log-softmax (PyTorch `F.log_softmax(z, dim=1)`):
///
/// ```text
/// out[n, k] = z[n, k] - log(sum_j exp(z[n, j]))
/// ```
///
/// computed with the max-shift trick so large logits do not overflow.
pub fn log_softmax(logits: &Array2<f64>) -> Array2<f64> {
    let (batch, classes) = logits.dim();
    let mut out = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        let lse = log_sum_exp(logits.row(n).iter().copied());
        for k in 0..classes {
            out[[n, k]] = logits[[n, k]] - lse;
        }
    }
    out
}

/// Row-wise softmax (PyTorch `F.softmax(z, dim=1)`):
/// `s[n, k] = exp(z[n, k]) / sum_j exp(z[n, j])`, computed as
/// `exp(log_softmax(z))`.
pub fn softmax(logits: &Array2<f64>) -> Array2<f64> {
    log_softmax(logits).mapv(f64::exp)
}

fn check_grad_shape(op: &str, logits: &Array2<f64>, grad_output: &Array2<f64>) {
    assert_eq!(
        logits.shape(),
        grad_output.shape(),
        "{op}: grad_output shape {:?} != logits shape {:?}",
        grad_output.shape(),
        logits.shape()
    );
}

/// Backward of [`log_softmax`], with `g = dL/d(out)` (`grad_output`) and
/// `s = softmax(z)`:
///
/// ```text
/// dL/dz[n, j] = g[n, j] - s[n, j] * sum_k g[n, k]
/// ```
///
/// # Panics
///
/// If `logits` and `grad_output` shapes differ.
pub fn log_softmax_backward(logits: &Array2<f64>, grad_output: &Array2<f64>) -> Array2<f64> {
    check_grad_shape("log_softmax_backward", logits, grad_output);
    let s = softmax(logits);
    let (batch, classes) = logits.dim();
    let mut grad = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        let sum_g: f64 = grad_output.row(n).sum();
        for j in 0..classes {
            grad[[n, j]] = grad_output[[n, j]] - s[[n, j]] * sum_g;
        }
    }
    grad
}

/// Backward of [`softmax`], with `g = dL/ds` (`grad_output`) and
/// `s = softmax(z)`:
///
/// ```text
/// dL/dz[n, j] = s[n, j] * (g[n, j] - sum_k g[n, k] * s[n, k])
/// ```
///
/// # Panics
///
/// If `logits` and `grad_output` shapes differ.
pub fn softmax_backward(logits: &Array2<f64>, grad_output: &Array2<f64>) -> Array2<f64> {
    check_grad_shape("softmax_backward", logits, grad_output);
    let s = softmax(logits);
    let (batch, classes) = logits.dim();
    let mut grad = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        let mut dot = 0.0;
        for k in 0..classes {
            dot += grad_output[[n, k]] * s[[n, k]];
        }
        for j in 0..classes {
            grad[[n, j]] = s[[n, j]] * (grad_output[[n, j]] - dot);
        }
    }
    grad
}

/// Cross-entropy with integer labels, mean over the batch (PyTorch
/// `F.cross_entropy(z, y)` with its default `reduction='mean'`, no weights,
/// no label smoothing):
///
/// ```text
/// L = (1/N) sum_n ( log(sum_k exp(z[n, k])) - z[n, y_n] )
/// dL/dz[n, k] = (softmax(z)[n, k] - [k == y_n]) / N
/// ```
///
/// # Panics
///
/// If `labels.len() != N`, `N == 0`, or a label is not in `0..K`.
pub fn cross_entropy(logits: &Array2<f64>, labels: &[usize]) -> LossAndGrad<Ix2> {
    check_labels("cross_entropy", logits, labels);
    let (batch, classes) = logits.dim();
    let n_f = batch as f64;
    let log_probs = log_softmax(logits);
    let mut value = 0.0;
    let mut grad = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        value -= log_probs[[n, labels[n]]];
        for k in 0..classes {
            let target = if k == labels[n] { 1.0 } else { 0.0 };
            grad[[n, k]] = (log_probs[[n, k]].exp() - target) / n_f;
        }
    }
    LossAndGrad {
        value: value / n_f,
        grad,
    }
}

/// The first index of the largest logit of row `n` other than `label`.
fn max_other(logits: &Array2<f64>, n: usize, label: usize) -> usize {
    let classes = logits.dim().1;
    let mut best: Option<usize> = None;
    for k in 0..classes {
        if k == label {
            continue;
        }
        match best {
            Some(b) if logits[[n, k]] <= logits[[n, b]] => {}
            _ => best = Some(k),
        }
    }
    best.expect("cw_loss: at least 2 classes were checked")
}

/// The Carlini & Wagner margin loss, mean over the batch:
///
/// ```text
/// m_n = z[n, y_n] - max_{k != y_n} z[n, k] + kappa
/// L   = (1/N) sum_n -relu(m_n)
/// ```
///
/// with `kappa >= 0` the confidence margin. Gradient (where `o_n` is the
/// index attaining the max over `k != y_n`):
///
/// ```text
/// dL/dz[n, y_n] = -[m_n > 0] / N,   dL/dz[n, o_n] = +[m_n > 0] / N,   0 elsewhere
/// ```
///
/// Subgradient conventions: at a tie of the max, `o_n` is the *first*
/// (lowest) index attaining it; at the kink `m_n = 0` the gradient is zero
/// (ReLU backward tests `m > 0`, as PyTorch does).
///
/// # Panics
///
/// If `K < 2`, `labels.len() != N`, `N == 0`, or a label is not in `0..K`.
pub fn cw_loss(logits: &Array2<f64>, labels: &[usize], kappa: f64) -> LossAndGrad<Ix2> {
    check_labels("cw_loss", logits, labels);
    let (batch, classes) = logits.dim();
    assert!(
        classes >= 2,
        "cw_loss: needs at least 2 classes, got {classes}"
    );
    let n_f = batch as f64;
    let mut value = 0.0;
    let mut grad = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        let y = labels[n];
        let o = max_other(logits, n, y);
        let margin = logits[[n, y]] - logits[[n, o]] + kappa;
        if margin > 0.0 {
            value -= margin;
            grad[[n, y]] = -1.0 / n_f;
            grad[[n, o]] = 1.0 / n_f;
        }
    }
    LossAndGrad {
        value: value / n_f,
        grad,
    }
}

/// DVERGE's variant of the C&W loss (`cw-dverge`, rivals.md): the true class is masked to 0
/// rather than removed, so the "best wrong logit" is max(0, max_{k≠y} z_k):
///
/// ```text
/// v[n, k] = z[n, k] for k != y_n,   v[n, y_n] = 0
/// o_n     = the first index attaining max_k v[n, k]
/// m_n     = z[n, y_n] - v[n, o_n] + kappa
/// L       = (1/N) sum_n -relu(m_n)
/// dL/dz[n, y_n] = -[m_n > 0] / N,   dL/dz[n, o_n] += [m_n > 0] / N only if o_n != y_n
/// ```
///
/// On an ensemble's log-probabilities (all <= 0) v's maximum is the masked 0, so the gradient
/// only lowers z_y and the margin vanishes once z_y <= -kappa: a weaker attack than [`cw_loss`].
///
/// # Panics
/// As [`cw_loss`].
pub fn cw_dverge_loss(logits: &Array2<f64>, labels: &[usize], kappa: f64) -> LossAndGrad<Ix2> {
    check_labels("cw_dverge_loss", logits, labels);
    let (batch, classes) = logits.dim();
    assert!(
        classes >= 2,
        "cw_dverge_loss: needs at least 2 classes, got {classes}"
    );
    let n_f = batch as f64;
    let mut value = 0.0;
    let mut grad = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        let y = labels[n];
        let masked = |k: usize| if k == y { 0.0 } else { logits[[n, k]] };
        let mut o = 0;
        for k in 1..classes {
            if masked(k) > masked(o) {
                o = k;
            }
        }
        let margin = logits[[n, y]] - masked(o) + kappa;
        if margin > 0.0 {
            value -= margin;
            grad[[n, y]] -= 1.0 / n_f;
            if o != y {
                grad[[n, o]] += 1.0 / n_f;
            }
        }
    }
    LossAndGrad {
        value: value / n_f,
        grad,
    }
}

/// Mean squared error over all elements (PyTorch `F.mse_loss(x, t)`, default
/// `reduction='mean'`), for tensors of any rank with `E` elements:
///
/// ```text
/// L = (1/E) sum_i (x_i - t_i)^2,    dL/dx_i = 2 (x_i - t_i) / E
/// ```
///
/// The gradient is with respect to `input` (`x`); the gradient with respect
/// to `target` (`t`) is its negation.
///
/// # Panics
///
/// If the shapes differ or the tensors are empty.
pub fn mse_loss<D: Dimension>(input: &Array<f64, D>, target: &Array<f64, D>) -> LossAndGrad<D> {
    assert_eq!(
        input.shape(),
        target.shape(),
        "mse_loss: input shape {:?} != target shape {:?}",
        input.shape(),
        target.shape()
    );
    assert!(!input.is_empty(), "mse_loss: empty input");
    let count = input.len() as f64;
    let mut value = 0.0;
    let mut grad = Array::<f64, D>::zeros(input.raw_dim());
    Zip::from(&mut grad)
        .and(input)
        .and(target)
        .for_each(|g, &x, &t| {
            let d = x - t;
            value += d * d;
            *g = 2.0 * d / count;
        });
    LossAndGrad {
        value: value / count,
        grad,
    }
}

/// The probability floor of DVERGE's `Ensemble.forward`
/// (`torch.clamp(mean_softmax, min=1e-40)` before the log).
pub const ENSEMBLE_PROB_FLOOR: f64 = 1e-40;

fn check_members(op: &str, members: &[Array2<f64>], prob_floor: f64) -> (usize, usize) {
    assert!(
        !members.is_empty(),
        "{op}: an ensemble needs at least one member"
    );
    assert!(
        prob_floor >= 0.0,
        "{op}: prob_floor must be >= 0, got {prob_floor}"
    );
    let dim = members[0].dim();
    for (m, z) in members.iter().enumerate() {
        assert_eq!(
            z.dim(),
            dim,
            "{op}: member {m} has logits shape {:?}, member 0 has {:?}",
            z.shape(),
            members[0].shape()
        );
    }
    dim
}

/// The unclamped `log((1/M) sum_m softmax(z_m))` and each member's
/// log-softmax.
fn log_mean_softmax_parts(members: &[Array2<f64>]) -> (Array2<f64>, Vec<Array2<f64>>) {
    let (batch, classes) = members[0].dim();
    let log_m = (members.len() as f64).ln();
    let member_log_probs: Vec<Array2<f64>> = members.iter().map(log_softmax).collect();
    let mut out = Array2::<f64>::zeros((batch, classes));
    for n in 0..batch {
        for k in 0..classes {
            out[[n, k]] = log_sum_exp(member_log_probs.iter().map(|lp| lp[[n, k]])) - log_m;
        }
    }
    (out, member_log_probs)
}

/// The log of the mean softmax of an ensemble of `M` members (the ensemble
/// output the attacks differentiate; DVERGE's `Ensemble.forward` for
/// `M > 1`):
///
/// ```text
/// p[n, k]   = (1/M) sum_m softmax(z_m)[n, k]
/// out[n, k] = log(max(p[n, k], floor))
/// ```
///
/// where `z_m` (`members[m]`, `[N, K]`) are member `m`'s logits and `floor`
/// is `prob_floor` (DVERGE uses [`ENSEMBLE_PROB_FLOOR`] = 1e-40; pass `0.0`
/// for no clamp). `log p` is computed stably as
/// `logsumexp_m(log_softmax(z_m)[n, k]) - log M`. Since the rows of `p` sum
/// to 1, `cross_entropy(out, y)` equals the mean negative log-likelihood of
/// the ensemble (unless clamping happened).
///
/// # Panics
///
/// If `members` is empty, the members' shapes differ, or `prob_floor < 0`.
pub fn log_mean_softmax(members: &[Array2<f64>], prob_floor: f64) -> Array2<f64> {
    check_members("log_mean_softmax", members, prob_floor);
    let log_floor = prob_floor.ln();
    let (out, _) = log_mean_softmax_parts(members);
    out.mapv(|v| v.max(log_floor))
}

/// Backward of [`log_mean_softmax`] to every member's logits. With
/// `g = dL/d(out)` (`grad_output`, `[N, K]`), `s_m = softmax(z_m)` and the
/// member responsibilities `r_m[n, k] = s_m[n, k] / (M p[n, k])` (which sum
/// to 1 over `m`):
///
/// ```text
/// g'[n, k]        = g[n, k] if p[n, k] >= floor, else 0   (clamp backward)
/// dL/dz_m[n, j]   = g'[n, j] r_m[n, j] - s_m[n, j] sum_k g'[n, k] r_m[n, k]
/// ```
///
/// Returns one `[N, K]` gradient per member, in member order.
///
/// # Panics
///
/// As [`log_mean_softmax`], and if `grad_output` is not `[N, K]`.
pub fn log_mean_softmax_backward(
    members: &[Array2<f64>],
    prob_floor: f64,
    grad_output: &Array2<f64>,
) -> Vec<Array2<f64>> {
    let (batch, classes) = check_members("log_mean_softmax_backward", members, prob_floor);
    check_grad_shape("log_mean_softmax_backward", &members[0], grad_output);
    let log_floor = prob_floor.ln();
    let log_m = (members.len() as f64).ln();
    let (log_p, member_log_probs) = log_mean_softmax_parts(members);
    let mut masked = grad_output.clone();
    for n in 0..batch {
        for k in 0..classes {
            if log_p[[n, k]] < log_floor {
                masked[[n, k]] = 0.0;
            }
        }
    }
    let mut grads = Vec::with_capacity(members.len());
    for lp in &member_log_probs {
        let mut grad = Array2::<f64>::zeros((batch, classes));
        for n in 0..batch {
            // r[k] = s_m[n, k] / (M p[n, k]) = exp(log s_m - log M - log p);
            // a member probability that underflowed to 0 has responsibility 0
            // (this also avoids `-inf - -inf = NaN`).
            let r: Vec<f64> = (0..classes)
                .map(|k| {
                    if lp[[n, k]] == f64::NEG_INFINITY {
                        0.0
                    } else {
                        (lp[[n, k]] - log_m - log_p[[n, k]]).exp()
                    }
                })
                .collect();
            let mut dot = 0.0;
            for k in 0..classes {
                dot += masked[[n, k]] * r[k];
            }
            for j in 0..classes {
                grad[[n, j]] = masked[[n, j]] * r[j] - lp[[n, j]].exp() * dot;
            }
        }
        grads.push(grad);
    }
    grads
}

//! ADP, the adaptive diversity promoting regulariser (Pang et al. 2019, "Improving
//! Adversarial Robustness via Promoting Ensemble Diversity", ICML 2019), as DVERGE's port
//! (`train/train_adp.py`) trains it: one iteration over N members on one batch.
//!
//! For members m = 1..N with logits z_m and softmax s_m = softmax(z_m) on a batch of B images
//! with labels y (`[adp]` holds α, β, δ = `det_offset` and τ = `log_offset`):
//!
//! ```text
//! CE     = Σ_m CE(z_m, y)                              (each the batch mean; summed over members)
//! p̄      = (1/N) Σ_m s_m
//! H      = (1/B) Σ_b −Σ_k p̄_bk · log(p̄_bk + τ)         (ensemble entropy, batch mean)
//! u_bm   = s_bm with the entry y_b removed              (K−1 values)
//! v_bm   = u_bm / ‖u_bm‖₂
//! G_b    = V_b V_bᵀ,   (G_b)_mn = ⟨v_bm, v_bn⟩           (N x N)
//! D      = (1/B) Σ_b log det(G_b + δ·I)                 (≤ N·log(1 + δ), about 0)
//! L      = CE − α·H − β·D
//! ```
//!
//! The paper writes L = L_ECE − α·H(F) − β·log(ED), with ED the determinant of the Gram
//! matrix of the members' normalised non-true predictions; the code (the original ADP code and
//! DVERGE's port alike) adds δ·I before the log-det so that it stays finite when two members'
//! predictions align. Where DVERGE's port departs from the original code (rivals.md): its
//! schedule (200 epochs, MultiStepLR [100, 150], batch 128, against 180 epochs with decays at
//! 80/120/160 and batch 64) and one Adam over all members (lr 1e-3, wd 1e-4 coupled, eps
//! 1e-7), which the caller builds ([`Optimiser::for_config`]). The port's optional `--plus-adv`
//! term (CE on PGD examples of the whole ensemble) has no `[adp]` switch and is not
//! implemented here.
//!
//! Gradient, by hand, with respect to each member's logits. The CE part is the usual
//! (s_m − onehot(y))/B. With g_s the gradient with respect to s_m of the other two terms:
//!
//! ```text
//! ∂(−α·H)/∂s_bmk = (α/(B·N)) · (log(p̄_bk + τ) + p̄_bk/(p̄_bk + τ))
//! ∂ log det A / ∂A = A⁻¹                  (A = G_b + δI symmetric positive definite; Cholesky)
//! ∂ log det A / ∂V = 2·A⁻¹·V
//! ∂/∂u = (g_v − v·⟨g_v, v⟩) / ‖u‖          (through the L2 normalisation, per row)
//! ∂(−β·D)/∂s_bmk = −(β/B) · (∂ log det/∂u_bm)_k   for k ≠ y_b, and 0 at k = y_b
//! ∂L/∂z_m = (s_m − onehot(y))/B + s_m ⊙ (g_s − ⟨g_s, s_m⟩)        (softmax backward)
//! ```
//!
//! In the iteration ([`adp_iteration`]) the members run their train-mode forwards in member
//! order on the same batch, each committing its running statistics (`train_adp.py` runs
//! `m(inputs)` for each m in order, models in `train()`); then every member back-propagates
//! its logits' gradient and takes its own optimiser step.

use eio_spec::config::{AdpConfig, BnMode, Config};
use eio_spec::Plan;
use ndarray::{Array2, Array4};

use crate::ensemble::{member_path, optimiser_step, MethodReport};
use crate::loss::{cross_entropy, softmax, softmax_backward};
use crate::model::{backward, logits};
use crate::optim::Optimiser;
use crate::state::ModelState;

/// ADP's loss on a batch and its gradient with respect to every member's logits.
#[derive(Debug, Clone, PartialEq)]
pub struct AdpLoss {
    /// L = CE − α·H − β·D.
    pub value: f64,
    /// CE = Σ_m CE(z_m, y), each a batch mean.
    pub ce: f64,
    /// H, the ensemble entropy (batch mean), before its weight.
    pub entropy: f64,
    /// D, the batch mean of log det(G_b + δI), before its weight (≤ 0 up to δ).
    pub log_det: f64,
    /// dL/dz_m for each member, `[B, K]`.
    pub grads: Vec<Array2<f64>>,
}

/// The log-determinant of a symmetric positive definite matrix `a` (`n x n`, row-major) and
/// its gradient A⁻¹ (row-major), by Cholesky: A = L·Lᵀ, log det A = 2·Σ_i log L_ii,
/// A⁻¹ = L⁻ᵀ·L⁻¹ with L⁻¹ by forward substitution.
///
/// A matrix that is not positive definite in floating point (a non-positive or NaN pivot)
/// gives NaN for the value and every entry of the gradient (`torch.logdet` gives NaN for a
/// negative determinant).
///
/// # Panics
/// If `a.len() != n·n`.
pub fn spd_log_det(a: &[f64], n: usize) -> (f64, Vec<f64>) {
    assert_eq!(
        a.len(),
        n * n,
        "spd_log_det: {} values for {n} x {n}",
        a.len()
    );
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let mut pivot = a[j * n + j];
        for p in 0..j {
            pivot -= l[j * n + p] * l[j * n + p];
        }
        if pivot.is_nan() || pivot <= 0.0 {
            return (f64::NAN, vec![f64::NAN; n * n]);
        }
        let d = pivot.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for p in 0..j {
                v -= l[i * n + p] * l[j * n + p];
            }
            l[i * n + j] = v / d;
        }
    }
    let log_det = 2.0 * (0..n).map(|i| l[i * n + i].ln()).sum::<f64>();
    // L⁻¹, lower triangular: column c solves L·x = e_c.
    let mut li = vec![0.0; n * n];
    for c in 0..n {
        for i in c..n {
            let mut v = if i == c { 1.0 } else { 0.0 };
            for p in c..i {
                v -= l[i * n + p] * li[p * n + c];
            }
            li[i * n + c] = v / l[i * n + i];
        }
    }
    // A⁻¹ = L⁻ᵀ L⁻¹: (A⁻¹)_ij = Σ_{p ≥ max(i, j)} (L⁻¹)_pi (L⁻¹)_pj.
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let mut v = 0.0;
            for p in i.max(j)..n {
                v += li[p * n + i] * li[p * n + j];
            }
            inv[i * n + j] = v;
        }
    }
    (log_det, inv)
}

/// ADP's loss (see the module documentation) of the members' logits `logits` (each `[B, K]`)
/// on `labels`, and its gradient with respect to each member's logits.
///
/// # Panics
/// If there are no members, the members' logits differ in shape, K < 2, or as
/// [`cross_entropy`] for the labels.
pub fn adp_loss(logits: &[Array2<f64>], labels: &[usize], config: &AdpConfig) -> AdpLoss {
    let n = logits.len();
    assert!(n > 0, "adp_loss: no members");
    let (batch, classes) = logits[0].dim();
    assert!(classes >= 2, "adp_loss: {classes} classes, need at least 2");
    for z in logits {
        assert_eq!(
            z.dim(),
            (batch, classes),
            "adp_loss: members' logits differ"
        );
    }
    let (alpha, beta) = (config.alpha, config.beta);
    let (b_f, n_f) = (batch as f64, n as f64);

    let mut ce = 0.0;
    let mut grads = Vec::with_capacity(n);
    for z in logits {
        let l = cross_entropy(z, labels);
        ce += l.value;
        grads.push(l.grad);
    }
    let probs: Vec<Array2<f64>> = logits.iter().map(softmax).collect();

    // Ensemble entropy and dL/ds_m of −α·H (the same for every member).
    let mut p_bar = Array2::<f64>::zeros((batch, classes));
    for s in &probs {
        p_bar += s;
    }
    p_bar /= n_f;
    let mut entropy = 0.0;
    let mut g_entropy = Array2::<f64>::zeros((batch, classes));
    for b in 0..batch {
        let mut h = 0.0;
        for k in 0..classes {
            let p = p_bar[[b, k]];
            let log = (p + config.log_offset).ln();
            h -= p * log;
            g_entropy[[b, k]] = alpha / (b_f * n_f) * (log + p / (p + config.log_offset));
        }
        entropy += h;
    }
    entropy /= b_f;
    let mut g_s: Vec<Array2<f64>> = vec![g_entropy; n];

    // Log-det of the normalised non-true predictions, per sample.
    let d = classes - 1;
    let mut log_det = 0.0;
    for b in 0..batch {
        let y = labels[b];
        let mut v = vec![0.0; n * d];
        let mut norms = vec![0.0; n];
        for (m, s) in probs.iter().enumerate() {
            let u: Vec<f64> = (0..classes)
                .filter(|&k| k != y)
                .map(|k| s[[b, k]])
                .collect();
            let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
            norms[m] = norm;
            for (slot, x) in v[m * d..(m + 1) * d].iter_mut().zip(&u) {
                *slot = x / norm;
            }
        }
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..d).map(|k| v[i * d + k] * v[j * d + k]).sum();
                a[i * n + j] = dot + if i == j { config.det_offset } else { 0.0 };
            }
        }
        let (ld, inv) = spd_log_det(&a, n);
        log_det += ld;
        for m in 0..n {
            // g_v = 2·(A⁻¹ V)_m, then through the normalisation.
            let g_v: Vec<f64> = (0..d)
                .map(|k| 2.0 * (0..n).map(|j| inv[m * n + j] * v[j * d + k]).sum::<f64>())
                .collect();
            let v_m = &v[m * d..(m + 1) * d];
            let dot: f64 = g_v.iter().zip(v_m).map(|(g, v)| g * v).sum();
            let mut kk = 0;
            for k in 0..classes {
                if k == y {
                    continue;
                }
                let g_u = (g_v[kk] - v_m[kk] * dot) / norms[m];
                g_s[m][[b, k]] -= beta / b_f * g_u;
                kk += 1;
            }
        }
    }
    log_det /= b_f;

    for ((grad, z), g) in grads.iter_mut().zip(logits).zip(&g_s) {
        *grad += &softmax_backward(z, g);
    }
    AdpLoss {
        value: ce - alpha * entropy - beta * log_det,
        ce,
        entropy,
        log_det,
        grads,
    }
}

/// One ADP iteration (DVERGE's `train_adp.py`, without `--plus-adv`) of the members in
/// `members` on `images` and `labels`: train-mode forwards in member order (each committing
/// its running statistics), the loss of [`adp_loss`] with `config.adp`, then each member's
/// backward and its optimiser's step ([`optimiser_step`]; `optimisers[m]` is member m's).
///
/// The report: `loss` = L; terms `("ce", CE)`, `("entropy", H)`, `("log_det", D)` unweighted
/// (L = CE − α·H − β·D); no distillation.
///
/// # Panics
/// If `members` and `optimisers` differ in length, there are no members, or the batch does
/// not fit the plan.
pub fn adp_iteration(
    plan: &Plan,
    members: &mut [ModelState],
    optimisers: &mut [Optimiser],
    config: &Config,
    images: &Array4<f64>,
    labels: &[usize],
) -> MethodReport {
    assert_eq!(
        members.len(),
        optimisers.len(),
        "adp_iteration: one optimiser per member"
    );
    let path = member_path(plan);
    let mut outputs = Vec::with_capacity(members.len());
    let mut traces = Vec::with_capacity(members.len());
    for state in members.iter_mut() {
        let (z, trace) = logits(plan, state, &path, images, BnMode::Train);
        state.commit(&trace);
        outputs.push(z);
        traces.push(trace);
    }
    let loss = adp_loss(&outputs, labels, &config.adp);
    for (((state, optimiser), trace), grad) in members
        .iter_mut()
        .zip(optimisers.iter_mut())
        .zip(&traces)
        .zip(&loss.grads)
    {
        let grads = backward(
            plan,
            state,
            trace,
            &[(plan.logits(), grad.clone().into_dyn())],
        );
        optimiser_step(plan, state, optimiser, &grads);
    }
    MethodReport {
        loss: loss.value,
        terms: vec![
            ("ce", loss.ce),
            ("entropy", loss.entropy),
            ("log_det", loss.log_det),
        ],
        distill_loss: None,
        sign_ties: 0,
    }
}

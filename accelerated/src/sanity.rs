//! The sanity checks of every evaluation report (`eio_spec::sanity` states each rule): the
//! ones over finished reports, and the two that need the model (the share of zero input
//! gradients, and DVERGE's convergence check over more PGD steps).

use candle_core::{DType, Device};
use eio_data::Images;
use eio_spec::config::{AttackLoss, EvalConfig};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::sanity::{self, Flag};

use crate::attack::Target;
use crate::evaluate::evaluate_images;
use crate::experiment::{EvalReport, ExperimentError, Protocol, WHITE_BOX};
use crate::train::range_tensors;

/// Accuracy of an undefended model at its largest ε above this is flagged.
pub const UNDEFENDED_BOUND: f64 = 0.05;
/// A share of images with an all-zero input gradient above this is flagged.
pub const ZERO_GRADIENT_BOUND: f64 = 0.01;

fn curve(report: &EvalReport) -> Vec<(f64, f64)> {
    report
        .report
        .per_eps
        .iter()
        .map(|e| (e.eps, e.robustness.accuracy))
        .collect()
}

/// The checks over finished reports: accuracy non-increasing in ε for every attack; per model,
/// white-box at most every transfer and suite accuracy at the same ε; and near 0 at the largest
/// ε under white-box attack for the models named in `undefended` (standard-trained ones).
pub fn report_flags(reports: &[EvalReport], undefended: &[String]) -> Vec<Flag> {
    let mut flags = Vec::new();
    for r in reports.iter().filter(|r| !r.report.per_eps.is_empty()) {
        flags.push(sanity::non_increasing_in_eps(
            &format!("{} / {}", r.model, r.attack),
            &curve(r),
        ));
    }
    for white in reports.iter().filter(|r| r.attack == WHITE_BOX) {
        for black in reports
            .iter()
            .filter(|r| r.model == white.model && r.attack != WHITE_BOX)
            .filter(|r| !matches!(r.protocol, Protocol::Clean))
        {
            flags.push(sanity::white_box_at_most_black_box(
                &format!("{} (against {})", white.model, black.attack),
                &curve(white),
                &curve(black),
            ));
        }
        if undefended.contains(&white.model) {
            flags.extend(sanity::undefended_near_zero(
                &format!("{} / {WHITE_BOX}", white.model),
                &curve(white),
                UNDEFENDED_BOUND,
            ));
        }
    }
    flags
}

/// The input gradient of the first white-box loss at the clean images: how many images have
/// an all-zero gradient (a sign attack cannot move them: gradient masking), and the share of
/// zero entries.
///
/// # Errors
/// A device error.
pub fn gradient_masking(
    name: &str,
    target: &Target<'_>,
    images: &Images,
    config: &EvalConfig,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<Flag, ExperimentError> {
    let loss = config.losses.first().copied().unwrap_or(AttackLoss::Ce);
    let per_image = images.shape.len();
    let mut rng = Seeds::new(seed).stream(Stream::AttackStart, u64::MAX);
    let (mut zero_images, mut zero_entries) = (0, 0usize);
    let n = images.len();
    for start in (0..n).step_by(config.batch_size.max(1)) {
        let end = (start + config.batch_size.max(1)).min(n);
        let (x, y) = range_tensors(images, start..end, device, dtype)?;
        let (_, grad) =
            target.loss_and_input_grad(&x, &y, loss, config.cw_kappa, None, &mut rng)?;
        let grad = grad.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        for image in grad.chunks(per_image) {
            let zeros = image.iter().filter(|g| **g == 0.0).count();
            zero_entries += zeros;
            if zeros == per_image {
                zero_images += 1;
            }
        }
    }
    Ok(sanity::gradient_masking(
        &format!("{name} ({} loss at the clean images)", loss.name()),
        zero_images,
        n,
        zero_entries as f64 / (n * per_image).max(1) as f64,
        ZERO_GRADIENT_BOUND,
    ))
}

/// DVERGE's convergence check: the white-box evaluation of `config` at the single radius
/// `eps` with each step count of `steps` (e.g. 50, 500, 1000); more steps must never raise the
/// all-or-nothing accuracy. Returns the flag and the accuracy per step count.
///
/// # Errors
/// A device or verdict error.
#[allow(clippy::too_many_arguments)]
pub fn convergence(
    name: &str,
    target: &Target<'_>,
    images: &Images,
    config: &EvalConfig,
    eps: f64,
    steps: &[usize],
    seed: u64,
    device: &Device,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<(Flag, Vec<(usize, f64)>), ExperimentError> {
    let seeds = Seeds::new(seed);
    let mut points = Vec::with_capacity(steps.len());
    for &s in steps {
        let c = EvalConfig {
            eps: vec![eps],
            steps: s,
            ..config.clone()
        };
        let report = evaluate_images(
            target,
            target,
            images,
            &c,
            &seeds,
            device,
            dtype,
            &mut |b, n| progress(s, b, n),
        )?;
        points.push((s, report.per_eps[0].robustness.accuracy));
    }
    Ok((
        sanity::converged(&format!("{name} / {WHITE_BOX} at eps {eps}"), &points),
        points,
    ))
}

//! The per-sample L1-normalised momentum shared by Eq. 2's distillation (DVERGE's momentum,
//! [`crate::distill::eq2_distill`]) and MI-FGSM (Dong et al. 2018, [`crate::attack::pgd_run`]):
//!
//! ```text
//! m_k = μ·m_{k−1} + g_k / max(‖g_k‖₁, 1e−12)      ‖·‖₁ per sample (over C, H, W)
//! ```
//!
//! with m_{−1} = 0 (no previous direction) and the floor `eio_spec::attack::MOMENTUM_L1_FLOOR`.

use eio_spec::attack::MOMENTUM_L1_FLOOR;
use ndarray::{Array4, Axis, Zip};

/// One momentum update: `decay`·`previous` + `grad` / max(‖`grad[n]`‖₁, 1e−12) for every
/// sample n. `previous = None` is the first step (m_{−1} = 0): the result is the normalised
/// gradient itself.
///
/// The L1 norm of sample n is the sum of |g| over its elements in row-major (C, H, W) order;
/// each element is divided by the floored norm and the quotient added to previous·`decay` (the
/// arithmetic order of Eq. 2's earlier inline form, so its results are unchanged).
///
/// # Panics
/// If `previous` and `grad` differ in shape.
pub fn l1_momentum(previous: Option<&Array4<f64>>, grad: &Array4<f64>, decay: f64) -> Array4<f64> {
    let mut normalised = grad.clone();
    for mut sample in normalised.axis_iter_mut(Axis(0)) {
        let l1: f64 = sample.iter().map(|g| g.abs()).sum();
        let norm = l1.max(MOMENTUM_L1_FLOOR);
        sample.mapv_inplace(|g| g / norm);
    }
    match previous {
        None => normalised,
        Some(previous) => {
            assert_eq!(
                previous.shape(),
                grad.shape(),
                "l1_momentum: previous direction and gradient differ in shape"
            );
            Zip::from(previous)
                .and(&normalised)
                .map_collect(|&m, &n| m * decay + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array4;

    #[test]
    fn first_step_is_the_per_sample_l1_normalised_gradient() {
        // Sample 0: |1| + |−3| + |0| + |4| = 8; sample 1 is all zeros (norm floored at 1e-12).
        let g = Array4::from_shape_vec((2, 1, 2, 2), vec![1.0, -3.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
            .expect("8 values");
        let m = l1_momentum(None, &g, 1.0);
        assert_eq!(
            m.iter().copied().collect::<Vec<_>>(),
            [0.125, -0.375, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0]
        );
        // A tiny gradient is divided by the floor, not by its own norm.
        let tiny = Array4::from_elem((1, 1, 1, 2), 1e-14);
        let m = l1_momentum(None, &tiny, 1.0);
        assert!(m.iter().all(|&v| (v - 1e-2).abs() < 1e-16), "{m:?}");
    }

    #[test]
    fn second_step_decays_the_previous_direction() {
        let g1 = Array4::from_shape_vec((1, 1, 1, 4), vec![2.0, -2.0, 0.0, 4.0]).expect("4");
        let g2 = Array4::from_shape_vec((1, 1, 1, 4), vec![0.0, 1.0, -1.0, 0.0]).expect("4");
        let m1 = l1_momentum(None, &g1, 0.5);
        let m2 = l1_momentum(Some(&m1), &g2, 0.5);
        // m1 = g1 / 8 = (0.25, −0.25, 0, 0.5); m2 = 0.5·m1 + g2 / 2.
        assert_eq!(
            m2.iter().copied().collect::<Vec<_>>(),
            [0.125, 0.375, -0.5, 0.25]
        );
    }
}

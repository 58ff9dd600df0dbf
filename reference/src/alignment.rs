//! Per-sample cosine similarity of two input gradients and its gradient: the shared piece of
//! GAL's coherence (`crate::gal`) and TRS's alignment term (`crate::trs`).
//!
//! ```text
//! cos_b(a, c) = ⟨a_b, c_b⟩ / max(‖a_b‖·‖c_b‖, ε)     ε = 1e-8
//! ```
//!
//! over the flattened values of sample b, as `torch.nn.functional.cosine_similarity(a, c,
//! dim=-1)` computes it in PyTorch 1.4, the version DVERGE's code (and so the paper's GAL
//! numbers) ran on: the product of the norms is clamped, not each norm (later PyTorch clamps
//! each). The two differ when ‖a_b‖·‖c_b‖ < ε, which the 1/B-scaled input gradients of
//! confidently classified images reach; there the gradient below is that of ⟨a_b, c_b⟩/ε.

use ndarray::{Array1, Array4, Axis};

/// `cosine_similarity`'s ε.
pub const COSINE_EPS: f64 = 1e-8;

/// cos_b(a, c) for every sample b of two `[B, C, H, W]` arrays.
pub fn cosine(a: &Array4<f64>, c: &Array4<f64>) -> Array1<f64> {
    assert_eq!(a.dim(), c.dim(), "cosine of arrays of different shapes");
    a.outer_iter()
        .zip(c.outer_iter())
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y.iter()).map(|(u, v)| u * v).sum();
            dot / (norm(x.iter()) * norm(y.iter())).max(COSINE_EPS)
        })
        .collect()
}

/// d(Σ_b w_b · cos_b(a, c)) / da, `[B, C, H, W]`:
/// w_b · (c_b / (‖a_b‖‖c_b‖) − cos_b · a_b / ‖a_b‖²) where ‖a_b‖‖c_b‖ > ε, and w_b · c_b / ε
/// where the product is clamped.
pub fn cosine_backward(a: &Array4<f64>, c: &Array4<f64>, weights: &Array1<f64>) -> Array4<f64> {
    let cos = cosine(a, c);
    let mut out = Array4::zeros(a.dim());
    for (b, mut row) in out.outer_iter_mut().enumerate() {
        let (x, y) = (a.index_axis(Axis(0), b), c.index_axis(Axis(0), b));
        let (na, nc) = (norm(x.iter()), norm(y.iter()));
        let product = na * nc;
        let w = weights[b];
        let (denominator, self_term) = if product > COSINE_EPS {
            (product, cos[b] / (na * na))
        } else {
            (COSINE_EPS, 0.0)
        };
        for ((o, &u), &v) in row.iter_mut().zip(x.iter()).zip(y.iter()) {
            *o = w * (v / denominator - self_term * u);
        }
    }
    out
}

/// The unordered pairs i < j of `n` members, in order (GAL's and TRS's pair terms).
pub fn pairs(n: usize) -> Vec<(usize, usize)> {
    (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect()
}

/// cos_b(g_i, g_j) for every pair of [`pairs`], in that order.
pub fn pair_cosines(grads: &[&Array4<f64>]) -> Vec<Array1<f64>> {
    pairs(grads.len())
        .into_iter()
        .map(|(i, j)| cosine(grads[i], grads[j]))
        .collect()
}

/// ∂/∂g_m of Σ_{pairs (i, j)} Σ_b w_ij,b · cos_b(g_i, g_j) for every member m, with one weight
/// vector per pair of [`pairs`], in that order.
pub fn pair_directions(grads: &[&Array4<f64>], weights: &[Array1<f64>]) -> Vec<Array4<f64>> {
    let mut directions: Vec<Array4<f64>> = grads.iter().map(|g| Array4::zeros(g.dim())).collect();
    for ((i, j), w) in pairs(grads.len()).into_iter().zip(weights) {
        directions[i] += &cosine_backward(grads[i], grads[j], w);
        directions[j] += &cosine_backward(grads[j], grads[i], w);
    }
    directions
}

fn norm<'a>(values: impl Iterator<Item = &'a f64>) -> f64 {
    values.map(|v| v * v).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng) -> Array4<f64> {
        Array::from_shape_fn((3, 2, 2, 2), |_| rng.random_range(-1.0..1.0))
    }

    #[test]
    fn cosine_of_a_vector_with_itself_is_one_and_with_its_negative_minus_one() {
        let a = random(&mut ChaCha8Rng::seed_from_u64(1));
        for v in cosine(&a, &a) {
            assert!((v - 1.0).abs() < 1e-15);
        }
        for v in cosine(&a, &(-&a)) {
            assert!((v + 1.0).abs() < 1e-15);
        }
    }

    #[test]
    fn the_product_of_the_norms_is_clamped_as_pytorch_1_4_does() {
        // ‖a‖ = ‖c‖ = 1e-5: each norm is above ε, their product (1e-10) is not.
        let a = Array4::from_shape_vec((1, 1, 1, 2), vec![1e-5, 0.0]).unwrap();
        let c = Array4::from_shape_vec((1, 1, 1, 2), vec![0.6e-5, 0.8e-5]).unwrap();
        let cos = cosine(&a, &c)[0];
        assert!((cos / (0.6e-10 / 1e-8) - 1.0).abs() < 1e-12, "cos {cos}");
        let w = Array1::from(vec![1.0]);
        let g = cosine_backward(&a, &c, &w);
        assert!((g[[0, 0, 0, 1]] / (0.8e-5 / 1e-8) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn backward_matches_central_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (a, c) = (random(&mut rng), random(&mut rng));
        let w = Array1::from(vec![0.3, -1.2, 2.0]);
        let f = |a: &Array4<f64>| (cosine(a, &c) * &w).sum();
        let analytic = cosine_backward(&a, &c, &w);
        let h = 1e-6;
        for (idx, &g) in analytic.indexed_iter() {
            let (mut up, mut down) = (a.clone(), a.clone());
            up[idx] += h;
            down[idx] -= h;
            let numeric = (f(&up) - f(&down)) / (2.0 * h);
            assert!(
                (numeric - g).abs() < 1e-8 * (1.0 + g.abs()),
                "at {idx:?}: numeric {numeric}, analytic {g}"
            );
        }
    }
}

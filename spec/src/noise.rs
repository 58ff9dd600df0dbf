//! GAL's Gaussian-noise augmentation (DVERGE's `utils.py` `AddGaussianNoise(0., 0.045)`, used
//! for GAL only): with probability `probability` an image gets N(0, std²) noise on every pixel,
//! not clamped to [0, 1]. Drawn here, in plain Rust, so both engines add the same noise.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// The noise to add to `images` images of `image_len` values each, row-major: per image, first
/// a uniform u in [0, 1); when u < `probability` the image gets `std`·z for each pixel, z
/// standard normal drawn in pixel order; otherwise zeros (nothing else is drawn for it).
pub fn gaussian_noise<R: Rng + ?Sized>(
    rng: &mut R,
    images: usize,
    image_len: usize,
    std: f64,
    probability: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; images * image_len];
    for image in out.chunks_mut(image_len.max(1)).take(images) {
        if rng.random::<f64>() < probability {
            for v in image.iter_mut() {
                let z: f64 = StandardNormal.sample(rng);
                *v = std * z;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn about_half_the_images_get_noise_of_the_given_std() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, len) = (2000, 64);
        let noise = gaussian_noise(&mut rng, n, len, 0.045, 0.5);
        let noisy: Vec<&[f64]> = noise
            .chunks(len)
            .filter(|c| c.iter().any(|&v| v != 0.0))
            .collect();
        let share = noisy.len() as f64 / n as f64;
        assert!((share - 0.5).abs() < 0.05, "share of noisy images {share}");
        let values: Vec<f64> = noisy.iter().flat_map(|c| c.iter().copied()).collect();
        let var = values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64;
        assert!((var.sqrt() - 0.045).abs() < 0.002, "std {}", var.sqrt());
    }

    #[test]
    fn probability_zero_draws_no_noise_and_one_noises_every_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        assert!(gaussian_noise(&mut rng, 10, 8, 0.1, 0.0)
            .iter()
            .all(|&v| v == 0.0));
        let all = gaussian_noise(&mut rng, 10, 8, 0.1, 1.0);
        assert!(all.chunks(8).all(|c| c.iter().all(|&v| v != 0.0)));
    }
}

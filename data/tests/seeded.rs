//! Seeded choices: hold-out, train limit, evaluation subset, epoch order, batches and the
//! crop+flip augmentation (hand-computed cases, resumption mid-epoch, proptest properties).

use std::collections::HashSet;

use eio_data::feed::{augment_image, augment_stream_index, augment_unit};
use eio_data::split::{below, eval_subset_indices, permutation, sample};
use eio_data::*;
use eio_spec::rng::{Seeds, Stream};
use proptest::prelude::*;

/// `n` images of `shape` whose bytes depend on the image index and the position
/// (byte k of image i = (7·i + 3·k + 1) mod 256, so the first bytes of images 0..256 differ)
/// and whose label is the index.
fn numbered(n: usize, shape: ImageShape) -> Images {
    let l = shape.len();
    let pixels = (0..n * l)
        .map(|v| ((7 * (v / l) + 3 * (v % l) + 1) % 256) as u8)
        .collect();
    Images::new(shape, pixels, (0..n as u32).collect()).unwrap()
}

#[test]
fn below_and_sample_are_pinned() {
    // Pins the selection algorithm: if these change, recorded runs select other images.
    let mut rng = Seeds::new(0).stream(Stream::Validation, 0);
    let draws: Vec<u64> = (0..8).map(|_| below(&mut rng, 10)).collect();
    let mut rng = Seeds::new(0).stream(Stream::Validation, 0);
    let again: Vec<u64> = (0..8).map(|_| below(&mut rng, 10)).collect();
    assert_eq!(draws, again);
    assert!(draws.iter().all(|&d| d < 10));
    let mut rng = Seeds::new(0).stream(Stream::EvalSubset, 0);
    let s = sample(10, 10, &mut rng);
    let mut sorted = s.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(s, (0..10).collect::<Vec<_>>());
    assert_eq!(below(&mut rng, 1), 0);
    assert_eq!(below(&mut rng, 0), 0);
}

#[test]
fn below_is_uniform() {
    // Chi-square with 6 cells, 60,000 draws: 5 degrees of freedom, 99.9% quantile 20.5.
    let mut rng = Seeds::new(3).stream(Stream::DataOrder, 0);
    let mut counts = [0f64; 6];
    for _ in 0..60_000 {
        counts[below(&mut rng, 6) as usize] += 1.0;
    }
    let chi: f64 = counts
        .iter()
        .map(|c| (c - 10_000.0).powi(2) / 10_000.0)
        .sum();
    assert!(chi < 20.5, "chi-square {chi}, counts {counts:?}");
}

#[test]
fn holdout_is_deterministic_disjoint_and_complete() {
    let seeds = Seeds::new(11);
    let h = holdout(1000, 100, None, &seeds).unwrap();
    assert_eq!(h, holdout(1000, 100, None, &seeds).unwrap());
    assert_eq!((h.train.len(), h.validation.len()), (900, 100));
    let t: HashSet<_> = h.train.iter().collect();
    let v: HashSet<_> = h.validation.iter().collect();
    assert!(t.is_disjoint(&v));
    assert_eq!(t.len() + v.len(), 1000);
    assert!(h.train.windows(2).all(|w| w[0] < w[1]));
    assert!(h.validation.windows(2).all(|w| w[0] < w[1]));
    // Another seed holds out other images; the hold-out is not a prefix.
    let other = holdout(1000, 100, None, &Seeds::new(12)).unwrap();
    assert_ne!(other.validation, h.validation);
    assert_ne!(h.validation, (0..100).collect::<Vec<_>>());
}

#[test]
fn train_limit_keeps_validation_fixed() {
    let seeds = Seeds::new(5);
    let full = holdout(500, 50, None, &seeds).unwrap();
    let limited = holdout(500, 50, Some(120), &seeds).unwrap();
    assert_eq!(limited.validation, full.validation);
    assert_eq!(limited.train.len(), 120);
    assert!(limited.train.iter().all(|i| full.train.contains(i)));
    // A limit above the training images uses them all.
    assert_eq!(holdout(500, 50, Some(10_000), &seeds).unwrap(), full);
    assert!(holdout(10, 10, None, &seeds).is_err());
    assert_eq!(
        holdout(10, 0, None, &seeds).unwrap().train,
        (0..10).collect::<Vec<_>>()
    );
}

/// `data.validation = 0` (the CIFAR presets: the authors and DVERGE train on all 50,000
/// images): nothing is held out, every image is trained on, in file order; a train limit still
/// draws its seeded subset.
#[test]
fn no_holdout_trains_on_every_image() {
    for seed in [0, 1, 99] {
        let seeds = Seeds::new(seed);
        let h = holdout(1000, 0, None, &seeds).unwrap();
        assert!(h.validation.is_empty());
        assert_eq!(h.train, (0..1000).collect::<Vec<_>>());
        let limited = holdout(1000, 0, Some(100), &seeds).unwrap();
        assert!(limited.validation.is_empty());
        assert_eq!(limited.train.len(), 100);
        assert!(limited.train.windows(2).all(|w| w[0] < w[1]));
        assert_ne!(limited.train, (0..100).collect::<Vec<_>>());
    }
    // One image and no hold-out is still a training set; none is an error.
    assert_eq!(holdout(1, 0, None, &Seeds::new(0)).unwrap().train, vec![0]);
    assert!(holdout(0, 0, None, &Seeds::new(0)).is_err());
}

#[test]
fn eval_subset_fixed_and_sorted() {
    let test = numbered(50, ImageShape::new(1, 2, 2));
    let seeds = Seeds::new(9);
    let a = eval_subset(&test, 10, &seeds);
    assert_eq!(a, eval_subset(&test, 10, &seeds));
    assert_eq!(a.len(), 10);
    assert!(a.labels.windows(2).all(|w| w[0] < w[1]));
    for k in 0..10 {
        assert_eq!(a.image(k), test.image(a.labels[k] as usize));
    }
    // Stream::EvalSubset, not another stream: the subset differs from the hold-out choice.
    let idx = eval_subset_indices(50, 10, &seeds);
    let hold = holdout(50, 10, None, &seeds).unwrap().validation;
    assert_ne!(idx, hold);
    assert_eq!(eval_subset(&test, 50, &seeds), test);
    assert_eq!(eval_subset(&test, 1000, &seeds), test);
}

#[test]
fn epoch_plan_visits_every_image_once_and_keeps_the_last_partial_batch() {
    let seeds = Seeds::new(1);
    let images = numbered(10, ImageShape::new(1, 2, 2));
    let plan = EpochPlan::new(10, 4, 0, &seeds);
    assert_eq!(plan.batches(), 3);
    let mut seen = Vec::new();
    for b in 0..plan.batches() {
        let batch = plan.batch(&images, b, None);
        assert_eq!(batch.len, if b == 2 { 2 } else { 4 });
        assert_eq!(batch.labels.len(), batch.len);
        assert_eq!(batch.pixels.len(), batch.len * 4);
        for (k, &i) in batch.indices.iter().enumerate() {
            assert_eq!(batch.labels[k], i as u32);
            assert_eq!(&batch.pixels[k * 4..(k + 1) * 4], &images.image_unit(i)[..]);
            // Each value is byte / 255 of the stored byte, to the bit.
            for (v, &b) in batch.pixels[k * 4..(k + 1) * 4].iter().zip(images.image(i)) {
                assert_eq!(v.to_bits(), (f32::from(b) / 255.0).to_bits());
            }
        }
        seen.extend(batch.indices);
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_eq!(seen, plan.order());
    // Seeded: the same epoch repeats, another epoch differs.
    assert_eq!(EpochPlan::new(10, 4, 0, &seeds).order(), plan.order());
    assert_ne!(EpochPlan::new(10, 4, 1, &seeds).order(), plan.order());
    assert_eq!(EpochPlan::new(0, 4, 0, &seeds).batches(), 0);
    assert_eq!(EpochPlan::new(8, 4, 0, &seeds).batches(), 2);
}

#[test]
fn crop_and_flip_hand_computed() {
    // One 1x3x3 image 1..9, padding 1.
    let shape = ImageShape::new(1, 3, 3);
    let src: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let mut out = vec![f32::NAN; 9];
    // top = left = padding: no shift.
    let id = AugmentDraw {
        top: 1,
        left: 1,
        flip: false,
    };
    augment_image(&src, shape, 1, id, &mut out);
    assert_eq!(out, src);
    // top 0, left 2: the window starts one row above and one column right:
    // out[y][x] = src[y-1][x+1].
    let d = AugmentDraw {
        top: 0,
        left: 2,
        flip: false,
    };
    augment_image(&src, shape, 1, d, &mut out);
    assert_eq!(out, vec![0., 0., 0., 2., 3., 0., 5., 6., 0.]);
    // Flip only.
    let f = AugmentDraw {
        top: 1,
        left: 1,
        flip: true,
    };
    augment_image(&src, shape, 1, f, &mut out);
    assert_eq!(out, vec![3., 2., 1., 6., 5., 4., 9., 8., 7.]);
    // Crop then flip: top 2, left 0 is out[y][x] = src[y+1][x-1], then mirrored.
    let cf = AugmentDraw {
        top: 2,
        left: 0,
        flip: true,
    };
    augment_image(&src, shape, 1, cf, &mut out);
    assert_eq!(out, vec![5., 4., 0., 8., 7., 0., 0., 0., 0.]);
    // Two channels are cropped alike.
    let shape2 = ImageShape::new(2, 3, 3);
    let src2: Vec<f32> = (1..=18).map(|v| v as f32).collect();
    let mut out2 = vec![f32::NAN; 18];
    augment_image(&src2, shape2, 1, d, &mut out2);
    assert_eq!(
        out2,
        vec![0., 0., 0., 2., 3., 0., 5., 6., 0., 0., 0., 0., 11., 12., 0., 14., 15., 0.]
    );
}

#[test]
fn augmentation_resumes_mid_epoch() {
    let seeds = Seeds::new(21);
    let shape = ImageShape::new(3, 8, 8);
    let images = numbered(37, shape);
    let a = Augment {
        padding: 2,
        flip: true,
    };
    let aug = Some(a);
    for epoch in [0, 3] {
        let plan = EpochPlan::new(37, 5, epoch, &seeds);
        let straight: Vec<Batch> = (0..plan.batches())
            .map(|b| plan.batch(&images, b, aug))
            .collect();
        // Resume at batch 4 with a freshly built plan.
        let resumed = EpochPlan::new(37, 5, epoch, &seeds);
        for (b, want) in straight.iter().enumerate().skip(4) {
            assert_eq!(
                &resumed.batch(&images, b, aug),
                want,
                "epoch {epoch} batch {b}"
            );
        }
        // The draws of batch b come from the Augmentation stream at epoch·2^32 + b.
        let idx = augment_stream_index(epoch, 4);
        assert_eq!(idx, ((epoch as u64) << 32) + 4);
    }
    // Different batches and epochs draw differently.
    let plan = EpochPlan::new(37, 5, 0, &seeds);
    assert_ne!(plan.augment_draws(0, a), plan.augment_draws(1, a));
    assert_ne!(
        plan.augment_draws(0, a),
        EpochPlan::new(37, 5, 1, &seeds).augment_draws(0, a)
    );
}

/// An augmented batch is made from the stored bytes, converted as it is written; it must
/// hold exactly the f32 values of converting each image first and cropping and flipping the
/// f32 pixels (what the batches held when images were stored as f32).
#[test]
fn augmented_batches_equal_augmenting_the_converted_images() {
    let seeds = Seeds::new(5);
    let shape = ImageShape::new(3, 8, 8);
    let images = numbered(37, shape);
    let a = Augment {
        padding: 3,
        flip: true,
    };
    let plan = EpochPlan::new(37, 5, 2, &seeds);
    let mut want = vec![f32::NAN; shape.len()];
    let mut shifted = 0;
    for b in 0..plan.batches() {
        let batch = plan.batch(&images, b, Some(a));
        let draws = plan.augment_draws(b, a);
        for (k, (&i, draw)) in batch.indices.iter().zip(draws).enumerate() {
            augment_image(&images.image_unit(i), shape, a.padding, draw, &mut want);
            let got = &batch.pixels[k * shape.len()..(k + 1) * shape.len()];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(got), bits(&want), "batch {b} image {i}");
            shifted += usize::from(draw.top != a.padding || draw.left != a.padding || draw.flip);
        }
    }
    assert!(
        shifted > 30,
        "the draws crop and flip ({shifted} of 37 changed)"
    );
}

#[test]
fn augmentation_draws_cover_every_offset_and_both_flips() {
    let plan = EpochPlan::new(4000, 4000, 0, &Seeds::new(2));
    let draws = plan.augment_draws(
        0,
        Augment {
            padding: 4,
            flip: true,
        },
    );
    let tops: HashSet<_> = draws.iter().map(|d| d.top).collect();
    let lefts: HashSet<_> = draws.iter().map(|d| d.left).collect();
    assert_eq!(tops, (0..=8).collect());
    assert_eq!(lefts, (0..=8).collect());
    let flips = draws.iter().filter(|d| d.flip).count();
    assert!((1800..2200).contains(&flips), "{flips} flips of 4000");
    // flip: false never flips; padding 0 never shifts.
    let none = plan.augment_draws(
        0,
        Augment {
            padding: 0,
            flip: false,
        },
    );
    assert!(none.iter().all(|d| d.top == 0 && d.left == 0 && !d.flip));
}

#[test]
fn augment_from_config() {
    let mut d = eio_spec::config::DataConfig::default();
    assert_eq!(
        Augment::from_config(&d),
        Some(Augment {
            padding: 4,
            flip: true
        })
    );
    d.augment = false;
    assert_eq!(Augment::from_config(&d), None);
}

#[derive(Debug, Clone)]
struct AugCase {
    c: usize,
    h: usize,
    w: usize,
    padding: usize,
    top: usize,
    left: usize,
    flip: bool,
}

fn aug_case() -> impl Strategy<Value = AugCase> {
    (
        1usize..=3,
        1usize..=6,
        1usize..=6,
        0usize..=4,
        any::<bool>(),
    )
        .prop_flat_map(|(c, h, w, padding, flip)| {
            (0..=2 * padding, 0..=2 * padding).prop_map(move |(top, left)| AugCase {
                c,
                h,
                w,
                padding,
                top,
                left,
                flip,
            })
        })
}

proptest! {
    /// Every output pixel is 0 (padding) or the source pixel the formula names; a crop at the
    /// centre with no flip is the identity; flipping twice with a centred crop is the identity.
    #[test]
    fn augment_matches_the_formula(case in aug_case()) {
        let shape = ImageShape::new(case.c, case.h, case.w);
        let src: Vec<f32> = (0..shape.len()).map(|v| v as f32 + 1.0).collect();
        let mut out = vec![f32::NAN; shape.len()];
        let d = AugmentDraw { top: case.top, left: case.left, flip: case.flip };
        augment_image(&src, shape, case.padding, d, &mut out);
        for ch in 0..case.c {
            for y in 0..case.h {
                for x in 0..case.w {
                    let xx = if case.flip { case.w - 1 - x } else { x };
                    let sy = (y + case.top) as isize - case.padding as isize;
                    let sx = (xx + case.left) as isize - case.padding as isize;
                    let want = if sy >= 0 && sx >= 0 && (sy as usize) < case.h && (sx as usize) < case.w {
                        src[ch * case.h * case.w + sy as usize * case.w + sx as usize]
                    } else {
                        0.0
                    };
                    prop_assert_eq!(out[ch * case.h * case.w + y * case.w + x], want);
                }
            }
        }
        let centre = AugmentDraw { top: case.padding, left: case.padding, flip: true };
        let mut once = vec![0.0; shape.len()];
        let mut twice = vec![0.0; shape.len()];
        augment_image(&src, shape, case.padding, centre, &mut once);
        augment_image(&once, shape, case.padding, centre, &mut twice);
        prop_assert_eq!(twice, src);
    }

    /// Cropping and flipping the bytes then converting, converting then cropping and flipping,
    /// and `augment_unit` give the same f32 bits.
    #[test]
    fn augment_commutes_with_conversion(case in aug_case(), seed in any::<u8>()) {
        let shape = ImageShape::new(case.c, case.h, case.w);
        let bytes: Vec<u8> =
            (0..shape.len()).map(|v| (v as u8).wrapping_mul(29).wrapping_add(seed)).collect();
        let d = AugmentDraw { top: case.top, left: case.left, flip: case.flip };
        let mut cropped = vec![0u8; shape.len()];
        augment_image(&bytes, shape, case.padding, d, &mut cropped);
        let then_convert: Vec<u32> = cropped.iter().map(|&b| unit(b).to_bits()).collect();
        let converted: Vec<f32> = bytes.iter().map(|&b| unit(b)).collect();
        let mut first = vec![f32::NAN; shape.len()];
        augment_image(&converted, shape, case.padding, d, &mut first);
        let mut direct = vec![f32::NAN; shape.len()];
        augment_unit(&bytes, shape, case.padding, d, &mut direct);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(&bits(&first), &then_convert);
        prop_assert_eq!(&bits(&direct), &then_convert);
    }

    /// Any (n, validation, limit, seed): disjoint, within range, right sizes, deterministic.
    #[test]
    fn holdout_properties(n in 1usize..300, v_frac in 0.0f64..1.0, limit in proptest::option::of(0usize..400), seed in any::<u64>()) {
        let v = ((n as f64) * v_frac) as usize;
        prop_assume!(v < n);
        let limit = limit.map(|l| l.max(1));
        let h = holdout(n, v, limit, &Seeds::new(seed)).unwrap();
        prop_assert_eq!(h.validation.len(), v);
        prop_assert_eq!(h.train.len(), limit.map_or(n - v, |l| l.min(n - v)));
        let all: HashSet<_> = h.train.iter().chain(&h.validation).collect();
        prop_assert_eq!(all.len(), h.train.len() + h.validation.len());
        prop_assert!(all.iter().all(|&&i| i < n));
        prop_assert_eq!(h.clone(), holdout(n, v, limit, &Seeds::new(seed)).unwrap());
    }

    /// The first k of a permutation do not depend on how many more are drawn.
    #[test]
    fn sample_is_a_prefix_of_the_permutation(n in 0usize..200, k in 0usize..250, seed in any::<u64>()) {
        let s = Seeds::new(seed);
        let p = permutation(n, &mut s.stream(Stream::Validation, 0));
        let q = sample(n, k, &mut s.stream(Stream::Validation, 0));
        prop_assert_eq!(&p[..k.min(n)], &q[..]);
    }

    /// Any train length and batch size: the batches partition the epoch in order.
    #[test]
    fn batches_partition_the_epoch(n in 0usize..200, bs in 1usize..64, epoch in 0usize..5, seed in any::<u64>()) {
        let plan = EpochPlan::new(n, bs, epoch, &Seeds::new(seed));
        prop_assert_eq!(plan.batches(), n.div_ceil(bs));
        let joined: Vec<usize> = (0..plan.batches()).flat_map(|b| plan.batch_indices(b).to_vec()).collect();
        prop_assert_eq!(&joined[..], plan.order());
        let mut sorted = joined.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    }
}

#[test]
fn images_helpers() {
    let shape = ImageShape::new(1, 2, 2);
    let images = numbered(5, shape);
    let s = images.subset(&[4, 0, 4]);
    assert_eq!(s.labels, vec![4, 0, 4]);
    assert_eq!(s.image(0), images.image(4));
    assert_eq!(images.class_counts(3), vec![1, 1, 1]);
    assert!(Images::new(shape, vec![0; 7], vec![0, 1]).is_err());
    let mut a = numbered(2, shape);
    assert!(a
        .append(numbered(1, ImageShape::new(1, 1, 4)), "x")
        .is_err());
    a.append(numbered(1, shape), "x").unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(shape.to_string(), "1x2x2");
}

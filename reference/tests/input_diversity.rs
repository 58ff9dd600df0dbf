//! DI²-FGSM's transform (Xie et al. 2019) and its adjoint: answers derived by hand from
//! PyTorch's `F.interpolate` formulas (module docs of `eio_reference::input_diversity`), the
//! adjoint identity <T x, g> = <x, Tᵀ g>, and central finite differences of a scalar of T(x).

mod common;

use common::{assert_close, assert_grad, rng, uniform};
use eio_reference::grad_check::weighted_sum;
use eio_reference::input_diversity::{input_diversity, input_diversity_backward};
use eio_spec::attack::{DiversityDraw, InputDiversity, Interpolation};
use ndarray::{array, Array2, Array4};

const BOTH: [Interpolation; 2] = [Interpolation::Bilinear, Interpolation::Nearest];

/// A one-image, one-channel batch from a matrix.
fn image(m: Array2<f64>) -> Array4<f64> {
    let (h, w) = m.dim();
    m.into_shape_with_order((1, 1, h, w)).expect("same count")
}

/// The 4 x 4 ramp x[a, b] = 4a + b.
fn ramp4() -> Array4<f64> {
    image(Array2::from_shape_fn((4, 4), |(a, b)| (4 * a + b) as f64))
}

// Bilinear, 4 -> 3, align_corners = False: scale = 4/3, src(i) = max(4/3·(i + 0.5) − 0.5, 0):
//   i = 0: 2/3 − 1/2 = 1/6   -> i0 = 0, i1 = 1, λ = 1/6
//   i = 1: 2 − 1/2   = 3/2   -> i0 = 1, i1 = 2, λ = 1/2
//   i = 2: 10/3 − 1/2 = 17/6 -> i0 = 2, i1 = 3, λ = 5/6
// Interpolation between two neighbours reproduces an affine function exactly, so on the ramp
// T(x)[i, j] = 4·src(i) + src(j).
const SRC_4_TO_3: [f64; 3] = [1.0 / 6.0, 1.5, 17.0 / 6.0];

#[test]
fn bilinear_4x4_to_3x3_on_a_ramp() {
    let draw = DiversityDraw {
        size: 3,
        top: 0,
        left: 0,
    };
    let out = input_diversity(&ramp4(), &draw, Interpolation::Bilinear);
    // 4·src(i) + src(j), written out: row 0 = 2/3 + (1/6, 3/2, 17/6) = (5/6, 13/6, 7/2);
    // row 1 = 6 + src = (37/6, 15/2, 53/6); row 2 = 34/3 + src = (23/2, 77/6, 85/6).
    let expected = image(array![
        [5.0 / 6.0, 13.0 / 6.0, 3.5, 0.0],
        [37.0 / 6.0, 7.5, 53.0 / 6.0, 0.0],
        [11.5, 77.0 / 6.0, 85.0 / 6.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]);
    assert_close("bilinear ramp", &out, &expected, 1e-14);
    for (i, s) in SRC_4_TO_3.iter().enumerate() {
        assert!((out[[0, 0, i, i]] - 5.0 * s).abs() < 1e-14, "diagonal {i}");
    }
}

#[test]
fn bilinear_4x4_to_3x3_on_a_delta() {
    // x = 1 at (row 1, column 2). Weights on source row 1: output row 0 reads it with λ = 1/6
    // (as i1), row 1 with 1 − 1/2 = 1/2 (as i0), row 2 not at all. On source column 2: output
    // column 0 never, column 1 with λ = 1/2 (as i1), column 2 with 1 − 5/6 = 1/6 (as i0).
    // T(x)[i, j] = w_h(i) · w_w(j).
    let mut x = Array4::zeros((1, 1, 4, 4));
    x[[0, 0, 1, 2]] = 1.0;
    let draw = DiversityDraw {
        size: 3,
        top: 0,
        left: 0,
    };
    let out = input_diversity(&x, &draw, Interpolation::Bilinear);
    let expected = image(array![
        [0.0, 1.0 / 12.0, 1.0 / 36.0, 0.0],
        [0.0, 0.25, 1.0 / 12.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]);
    assert_close("bilinear delta", &out, &expected, 1e-15);
    // The adjoint of a delta at the output reads the same weights back: output (1, 1) took
    // 1/2·1/2 of each of source (1, 1), (1, 2), (2, 1), (2, 2).
    let mut g = Array4::zeros((1, 1, 4, 4));
    g[[0, 0, 1, 1]] = 1.0;
    let back = input_diversity_backward(&g, &draw, Interpolation::Bilinear);
    let expected = image(array![
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.25, 0.25, 0.0],
        [0.0, 0.25, 0.25, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]);
    assert_close("bilinear adjoint of a delta", &back, &expected, 1e-15);
}

#[test]
fn nearest_4x4_to_3x3() {
    // src(i) = floor(i · 4/3) = 0, 1, 2: the top-left 3 x 3 of the ramp.
    let draw = DiversityDraw {
        size: 3,
        top: 0,
        left: 0,
    };
    let out = input_diversity(&ramp4(), &draw, Interpolation::Nearest);
    let expected = image(array![
        [0.0, 1.0, 2.0, 0.0],
        [4.0, 5.0, 6.0, 0.0],
        [8.0, 9.0, 10.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]);
    assert_eq!(out, expected);
    // 5 -> 3: src = floor(i · 5/3) = 0, 1, 3 (rows and columns 2 and 4 are dropped, so they
    // get no gradient).
    let ramp5 = image(Array2::from_shape_fn((5, 5), |(a, b)| (5 * a + b) as f64));
    let out = input_diversity(&ramp5, &draw, Interpolation::Nearest);
    let picked = [0, 1, 3];
    for (i, &a) in picked.iter().enumerate() {
        for (j, &b) in picked.iter().enumerate() {
            assert_eq!(out[[0, 0, i, j]], (5 * a + b) as f64, "({i}, {j})");
        }
    }
    let back = input_diversity_backward(&Array4::ones((1, 1, 5, 5)), &draw, Interpolation::Nearest);
    for a in 0..5 {
        for b in 0..5 {
            let read = picked.contains(&a) && picked.contains(&b);
            assert_eq!(back[[0, 0, a, b]], f64::from(u8::from(read)), "({a}, {b})");
        }
    }
}

#[test]
fn nearest_uses_pytorchs_f32_scale() {
    // PyTorch computes floorf(i · (float)in / out): for in = 26, out = 22, i = 11 the exact
    // source index 11·26/22 = 13 comes out as 12 (f32(26/22) is below 13/11).
    let cols = image(Array2::from_shape_fn((26, 26), |(_, b)| b as f64));
    let draw = DiversityDraw {
        size: 22,
        top: 0,
        left: 0,
    };
    let out = input_diversity(&cols, &draw, Interpolation::Nearest);
    assert_eq!(out[[0, 0, 0, 11]], 12.0);
    assert_eq!(out[[0, 0, 0, 10]], 11.0); // floor(10 · 26/22) = floor(11.8) = 11
    assert_eq!(out[[0, 0, 0, 12]], 14.0); // floor(12 · 26/22) = floor(14.18) = 14
}

#[test]
fn padding_places_the_resized_image_at_the_offset() {
    // The ramp resized bilinearly to 3 x 3 (values above), then padded with top = 1 row above
    // and left = 0 columns: rows 1..=3, columns 0..=2 hold it, row 0 and column 3 are zero.
    let draw = DiversityDraw {
        size: 3,
        top: 1,
        left: 0,
    };
    let out = input_diversity(&ramp4(), &draw, Interpolation::Bilinear);
    let expected = image(array![
        [0.0, 0.0, 0.0, 0.0],
        [5.0 / 6.0, 13.0 / 6.0, 3.5, 0.0],
        [37.0 / 6.0, 7.5, 53.0 / 6.0, 0.0],
        [11.5, 77.0 / 6.0, 85.0 / 6.0, 0.0],
    ]);
    assert_close("padded bilinear", &out, &expected, 1e-14);
    // Nearest, 4 -> 2 (src = floor(2i) = 0, 2), top 2, left 1: x[0,0] = 0, x[0,2] = 2,
    // x[2,0] = 8, x[2,2] = 10 at rows 2..=3, columns 1..=2.
    let draw = DiversityDraw {
        size: 2,
        top: 2,
        left: 1,
    };
    let out = input_diversity(&ramp4(), &draw, Interpolation::Nearest);
    let expected = image(array![
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 2.0, 0.0],
        [0.0, 8.0, 10.0, 0.0],
    ]);
    assert_eq!(out, expected);
}

#[test]
fn full_size_draw_is_the_identity() {
    // size = side: bilinear src(i) = i, λ = 0 (weight 1 on x[i]); nearest floor(i · 1) = i.
    let mut r = rng(7);
    let x: Array4<f64> = uniform(&mut r, (2, 3, 6, 6), 0.0, 1.0);
    let draw = DiversityDraw {
        size: 6,
        top: 0,
        left: 0,
    };
    for interpolation in BOTH {
        assert_eq!(
            input_diversity(&x, &draw, interpolation),
            x,
            "{interpolation:?}"
        );
        assert_eq!(
            input_diversity_backward(&x, &draw, interpolation),
            x,
            "{interpolation:?}"
        );
    }
}

/// Draws for 8 x 8 images: the seeded draws of a transform with sizes 4..8, and fixed corners.
fn draws(seed: u64) -> Vec<DiversityDraw> {
    let di = InputDiversity {
        probability: 1.0,
        resize_rate: 0.5,
        interpolation: Interpolation::Bilinear,
    };
    let mut r = rng(seed);
    let mut out: Vec<DiversityDraw> = (0..6)
        .map(|_| di.draw(8, &mut r).expect("probability 1"))
        .collect();
    out.push(DiversityDraw {
        size: 5,
        top: 3,
        left: 0,
    });
    out.push(DiversityDraw {
        size: 7,
        top: 0,
        left: 1,
    });
    out
}

#[test]
fn backward_is_the_adjoint() {
    let mut r = rng(11);
    for (k, draw) in draws(12).into_iter().enumerate() {
        for interpolation in BOTH {
            let x: Array4<f64> = uniform(&mut r, (2, 3, 8, 8), -1.0, 1.0);
            let g: Array4<f64> = uniform(&mut r, (2, 3, 8, 8), -1.0, 1.0);
            let lhs = weighted_sum(&input_diversity(&x, &draw, interpolation), &g);
            let rhs = weighted_sum(&x, &input_diversity_backward(&g, &draw, interpolation));
            assert!(
                (lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()),
                "draw {k} {draw:?} {interpolation:?}: <Tx, g> = {lhs}, <x, Tᵀg> = {rhs}"
            );
        }
    }
}

#[test]
fn backward_matches_finite_differences() {
    let mut r = rng(21);
    for draw in draws(22).into_iter().take(4) {
        for interpolation in BOTH {
            let x: Array4<f64> = uniform(&mut r, (1, 2, 8, 8), 0.0, 1.0);
            let w: Array4<f64> = uniform(&mut r, (1, 2, 8, 8), -1.0, 1.0);
            // A nonlinear scalar of T(x): sum(w · T(x)²); its gradient is Tᵀ(2·w·T(x)).
            let f = |x: &Array4<f64>| {
                let t = input_diversity(x, &draw, interpolation);
                weighted_sum(&(&t * &t), &w)
            };
            let t = input_diversity(&x, &draw, interpolation);
            let analytic = input_diversity_backward(&(&w * &t * 2.0), &draw, interpolation);
            assert_grad(&format!("T {draw:?} {interpolation:?}"), f, &x, &analytic);
        }
    }
}

#[test]
#[should_panic(expected = "does not fit")]
fn a_draw_larger_than_the_image_is_refused() {
    let draw = DiversityDraw {
        size: 3,
        top: 2,
        left: 0,
    };
    input_diversity(&ramp4(), &draw, Interpolation::Bilinear);
}

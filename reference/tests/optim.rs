//! SGD and Adam against numbers computed by hand from the PyTorch update
//! equations, and the `None`-gradient rule.

use std::collections::BTreeMap;

use eio_reference::optim::{Adam, AdamConfig, Sgd, SgdConfig};
use ndarray::{arr1, ArrayD, IxDyn};

fn vecd(v: &[f64]) -> ArrayD<f64> {
    arr1(v).into_dyn()
}

fn assert_vec_close(what: &str, actual: &ArrayD<f64>, expected: &[f64], tol: f64) {
    assert_eq!(actual.shape(), &[expected.len()], "{what}: shape");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tol, "{what}[{i}] = {a}, expected {e}");
    }
}

fn sgd(nesterov: bool) -> Sgd {
    Sgd::new(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
        nesterov,
    })
}

/// p0 = [1, -2], the same gradient g = [0.5, 0.1] at every step, lr = 0.1,
/// momentum mu = 0.9, weight decay lambda = 0.01, dampening 0.
#[test]
fn sgd_momentum_weight_decay_three_steps() {
    // Step 1: d = g + 0.01 p = [0.51, 0.08]; b = d = [0.51, 0.08];
    //         p = p - 0.1 b = [0.949, -2.008]
    // Step 2: d = [0.5 + 0.00949, 0.1 - 0.02008] = [0.50949, 0.07992];
    //         b = 0.9 [0.51, 0.08] + d = [0.96849, 0.15192];
    //         p = [0.949 - 0.096849, -2.008 - 0.015192] = [0.852151, -2.023192]
    // Step 3: d = [0.50852151, 0.07976808];
    //         b = 0.9 [0.96849, 0.15192] + d = [1.38016251, 0.21649608];
    //         p = [0.852151 - 0.138016251, -2.023192 - 0.021649608]
    //           = [0.714134749, -2.044841608]
    let expected_p = [
        [0.949, -2.008],
        [0.852151, -2.023192],
        [0.714134749, -2.044841608],
    ];
    let expected_b = [[0.51, 0.08], [0.96849, 0.15192], [1.38016251, 0.21649608]];
    let mut opt = sgd(false);
    let mut p = vecd(&[1.0, -2.0]);
    let g = vecd(&[0.5, 0.1]);
    for step in 0..3 {
        opt.step_param("w", &mut p, Some(&g));
        assert_vec_close(
            &format!("sgd p step {}", step + 1),
            &p,
            &expected_p[step],
            1e-12,
        );
        let buf = opt
            .momentum_buffer("w")
            .expect("buffer exists after a step");
        assert_vec_close(
            &format!("sgd b step {}", step + 1),
            buf,
            &expected_b[step],
            1e-12,
        );
    }
}

#[test]
fn sgd_nesterov_three_steps() {
    // Same setting, nesterov: d = d + mu * b after the buffer update.
    // Step 1: d = [0.51, 0.08]; b = d; d = d + 0.9 b = [0.969, 0.152];
    //         p = [1 - 0.0969, -2 - 0.0152] = [0.9031, -2.0152]
    // Step 2: d = [0.509031, 0.079848]; b = 0.9 [0.51, 0.08] + d = [0.968031, 0.151848];
    //         d = d + 0.9 b = [1.3802589, 0.2165112];
    //         p = [0.9031 - 0.13802589, -2.0152 - 0.02165112] = [0.76507411, -2.03685112]
    // Step 3: d = [0.5076507411, 0.0796314888];
    //         b = 0.9 [0.968031, 0.151848] + d = [1.3788786411, 0.2162946888];
    //         d = d + 0.9 b = [1.74864151809, 0.27429670872];
    //         p = [0.76507411 - 0.174864151809, -2.03685112 - 0.027429670872]
    //           = [0.590209958191, -2.064280790872]
    let expected_p = [
        [0.9031, -2.0152],
        [0.76507411, -2.03685112],
        [0.590209958191, -2.064280790872],
    ];
    let expected_b = [
        [0.51, 0.08],
        [0.968031, 0.151848],
        [1.3788786411, 0.2162946888],
    ];
    let mut opt = sgd(true);
    let mut p = vecd(&[1.0, -2.0]);
    let g = vecd(&[0.5, 0.1]);
    for step in 0..3 {
        opt.step_param("w", &mut p, Some(&g));
        assert_vec_close(
            &format!("nesterov p step {}", step + 1),
            &p,
            &expected_p[step],
            1e-12,
        );
        let buf = opt
            .momentum_buffer("w")
            .expect("buffer exists after a step");
        assert_vec_close(
            &format!("nesterov b step {}", step + 1),
            buf,
            &expected_b[step],
            1e-12,
        );
    }
}

#[test]
fn sgd_without_momentum_keeps_no_buffer() {
    // p = 1 - 0.5 * (2 + 0.1 * 1) = -0.05
    let mut opt = Sgd::new(SgdConfig {
        lr: 0.5,
        momentum: 0.0,
        weight_decay: 0.1,
        nesterov: false,
    });
    let mut p = vecd(&[1.0]);
    opt.step_param("w", &mut p, Some(&vecd(&[2.0])));
    assert_vec_close("plain sgd", &p, &[-0.05], 1e-15);
    assert!(opt.momentum_buffer("w").is_none());
}

#[test]
fn sgd_none_gradient_leaves_parameter_and_buffer_untouched() {
    let mut opt = sgd(false);
    let mut params = BTreeMap::new();
    params.insert("a".to_string(), vecd(&[1.0, -2.0]));
    params.insert("b".to_string(), vecd(&[3.0]));
    let mut grads = BTreeMap::new();
    grads.insert("a".to_string(), vecd(&[0.5, 0.1]));
    grads.insert("b".to_string(), vecd(&[1.0]));
    // Step 1: both have gradients. b: d = 1 + 0.03 = 1.03, buf = 1.03,
    // p = 3 - 0.103 = 2.897.
    opt.step(&mut params, &grads);
    assert_vec_close("b after step 1", &params["b"], &[2.897], 1e-15);
    let b_after_1 = params["b"].clone();
    let buf_after_1 = opt.momentum_buffer("b").cloned().expect("buffer");
    // Steps 2 and 3: `b` has no gradient (absent from the map = None): no
    // weight decay, no momentum step, buffer unchanged. `a` keeps moving.
    let only_a: BTreeMap<String, ArrayD<f64>> =
        [("a".to_string(), vecd(&[0.5, 0.1]))].into_iter().collect();
    opt.step(&mut params, &only_a);
    opt.step_param("b", params.get_mut("b").expect("b"), None);
    assert_eq!(params["b"], b_after_1, "parameter moved without a gradient");
    assert_eq!(
        opt.momentum_buffer("b"),
        Some(&buf_after_1),
        "buffer changed"
    );
    assert_vec_close(
        "a still updated",
        &params["a"],
        &[0.852151, -2.023192],
        1e-12,
    );
    // Step 4: `b` gets a gradient again; its buffer continues from step 1:
    // d = 1 + 0.01 * 2.897 = 1.02897, buf = 0.9 * 1.03 + 1.02897 = 1.95597,
    // p = 2.897 - 0.195597 = 2.701403.
    opt.step(&mut params, &grads);
    assert_vec_close(
        "b buffer resumes",
        opt.momentum_buffer("b").expect("buffer"),
        &[1.95597],
        1e-12,
    );
    assert_vec_close("b resumes", &params["b"], &[2.701403], 1e-12);
    // A parameter that never had a gradient gets no state at all.
    let mut c = vecd(&[5.0]);
    opt.step_param("c", &mut c, None);
    assert_eq!(c, vecd(&[5.0]));
    assert!(opt.momentum_buffer("c").is_none());
}

#[test]
#[should_panic(expected = "gradient given for unknown parameter `typo`")]
fn sgd_rejects_gradients_for_unknown_parameters() {
    let mut opt = sgd(false);
    let mut params: BTreeMap<String, ArrayD<f64>> = BTreeMap::new();
    params.insert("a".to_string(), vecd(&[1.0]));
    let grads: BTreeMap<String, ArrayD<f64>> =
        [("typo".to_string(), vecd(&[1.0]))].into_iter().collect();
    opt.step(&mut params, &grads);
}

#[test]
fn adam_constant_gradient_moves_lr_per_step() {
    // With a constant gradient and no weight decay, m_t = (1 - b1^t) g and
    // v_t = (1 - b2^t) g^2, so the bias-corrected step is exactly
    // lr * g / (|g| + eps): each step moves every coordinate by ~lr.
    // p0 = [1, -2], g = [0.5, -0.1], lr = 0.1, eps = 1e-8, 3 steps:
    // p = [1 - 0.3 * 0.5 / (0.5 + 1e-8), -2 + 0.3 * 0.1 / (0.1 + 1e-8)]
    //   = [0.700000006, -1.70000003] (to 9 digits).
    let mut opt = Adam::new(AdamConfig {
        lr: 0.1,
        ..AdamConfig::default()
    });
    let mut p = vecd(&[1.0, -2.0]);
    let g = vecd(&[0.5, -0.1]);
    for _ in 0..3 {
        opt.step_param("w", &mut p, Some(&g));
    }
    let expected = [
        1.0 - 0.3 * 0.5 / (0.5 + 1e-8),
        -2.0 + 0.3 * 0.1 / (0.1 + 1e-8),
    ];
    assert_vec_close("adam constant", &p, &expected, 1e-12);
    assert_vec_close(
        "adam constant (digits)",
        &p,
        &[0.700000006, -1.70000003],
        1e-9,
    );
    let state = opt.state("w").expect("state");
    assert_eq!(state.step, 3);
}

#[test]
fn adam_varying_gradients_three_steps() {
    // p0 = 1, gradients 1, -1, 2, lr = 0.1, betas (0.9, 0.999), eps 1e-8, wd 0.
    // t=1: m = 0.1, v = 0.001, m_hat = 1, v_hat = 1
    //      p = 1 - 0.1 * 1 / (1 + 1e-8) = 0.900000001
    // t=2: m = 0.09 - 0.1 = -0.01, v = 0.000999 + 0.001 = 0.001999,
    //      m_hat = -0.01 / 0.19 = -0.0526315789..., v_hat = 0.001999 / 0.001999 = 1
    //      p = 0.900000001 + 0.1 * 0.0526315789 / (1 + 1e-8) = 0.9052631588421052
    // t=3: m = -0.009 + 0.2 = 0.191, v = 0.001997001 + 0.004 = 0.005997001,
    //      m_hat = 0.191 / 0.271 = 0.70479704797..., v_hat = 0.005997001 / 0.002997001
    //      = 2.0010003337..., sqrt = 1.4145671...,
    //      p = 0.9052631588 - 0.1 * 0.704797048 / 1.414567 = 0.8554389447994022
    let mut opt = Adam::new(AdamConfig {
        lr: 0.1,
        ..AdamConfig::default()
    });
    let mut p = vecd(&[1.0]);
    let expected_p = [0.900000001, 0.9052631588421052, 0.8554389447994022];
    let expected_m = [0.1, -0.01, 0.191];
    let expected_v = [0.001, 0.001999, 0.005997001];
    for (t, g) in [1.0, -1.0, 2.0].into_iter().enumerate() {
        opt.step_param("w", &mut p, Some(&vecd(&[g])));
        assert_vec_close(&format!("adam p t={}", t + 1), &p, &[expected_p[t]], 1e-13);
        let s = opt.state("w").expect("state");
        assert_eq!(s.step, t as u64 + 1);
        assert_vec_close("adam m", &s.exp_avg, &[expected_m[t]], 1e-15);
        assert_vec_close("adam v", &s.exp_avg_sq, &[expected_v[t]], 1e-15);
    }
}

#[test]
fn adam_coupled_weight_decay_three_steps() {
    // As above with weight_decay 0.1 added to the gradient: d = g + 0.1 p.
    // t=1: d = 1.1, m = 0.11, v = 0.00121, m_hat = 1.1, sqrt(v_hat) = 1.1,
    //      p = 1 - 0.1 * 1.1 / (1.1 + 1e-8) = 0.9000000009090909
    // t=2: d = -1 + 0.09000000009 = -0.90999999991, m = 0.099 - 0.090999999991
    //      = 0.008000000009, v = 0.00120879 + 0.000828099999836 = 0.002036889999836,
    //      p = 0.8958288203345847
    // t=3: d = 2 + 0.08958288203 = 2.08958288203, p = 0.8412511474330678
    let mut opt = Adam::new(AdamConfig {
        lr: 0.1,
        weight_decay: 0.1,
        ..AdamConfig::default()
    });
    let mut p = vecd(&[1.0]);
    let expected_p = [0.9000000009090909, 0.8958288203345847, 0.8412511474330678];
    for (t, g) in [1.0, -1.0, 2.0].into_iter().enumerate() {
        opt.step_param("w", &mut p, Some(&vecd(&[g])));
        assert_vec_close(
            &format!("adam wd p t={}", t + 1),
            &p,
            &[expected_p[t]],
            1e-13,
        );
    }
    assert_vec_close(
        "adam wd m",
        &opt.state("w").expect("state").exp_avg,
        &[0.2161582882115276],
        1e-14,
    );
}

#[test]
fn adam_none_gradient_skips_step_count_and_moments() {
    let mut opt = Adam::new(AdamConfig {
        lr: 0.1,
        weight_decay: 0.1,
        ..AdamConfig::default()
    });
    let mut params: BTreeMap<String, ArrayD<f64>> = BTreeMap::new();
    params.insert("a".to_string(), vecd(&[1.0]));
    params.insert("b".to_string(), vecd(&[1.0]));
    let both: BTreeMap<String, ArrayD<f64>> = [
        ("a".to_string(), vecd(&[1.0])),
        ("b".to_string(), vecd(&[1.0])),
    ]
    .into_iter()
    .collect();
    let only_a: BTreeMap<String, ArrayD<f64>> =
        [("a".to_string(), vecd(&[-1.0]))].into_iter().collect();
    opt.step(&mut params, &both);
    let b1 = params["b"].clone();
    let state_b1 = opt.state("b").cloned().expect("state");
    opt.step(&mut params, &only_a);
    opt.step(&mut params, &only_a);
    assert_eq!(params["b"], b1);
    assert_eq!(opt.state("b"), Some(&state_b1));
    assert_eq!(opt.state("a").expect("a").step, 3);
    assert_eq!(opt.state("b").expect("b").step, 1);
    // b's second real step uses t = 2 (its own count), so it matches the
    // t = 2 value of `adam_coupled_weight_decay_three_steps`.
    let b_second: BTreeMap<String, ArrayD<f64>> =
        [("b".to_string(), vecd(&[-1.0]))].into_iter().collect();
    opt.step(&mut params, &b_second);
    assert!((params["b"][IxDyn(&[0])] - 0.8958288203345847).abs() < 1e-13);
}

//! The weight gradients GAL and TRS train with, against central finite differences of their
//! losses. The losses are built here from first-order pieces only (`input_gradient`, the
//! coherence and alignment values, CE), so the check covers the second-order chain end to
//! end: ∂coh/∂g (`gal::coherence`), ∂L_cos/∂g (`trs::alignment`), the smoothness direction 4g/B,
//! and `second_order::input_gradient_vjp` through train-mode BatchNorm, for 2 and 3 members.
//!
//! Directional derivatives along a random direction over every learnable tensor of every
//! member are compared (relative error 1e-6). The step is [`STEP`] = 1e-7, not the 1e-5 of
//! the single-entry checks: moving every parameter at once shifts every activation, and at
//! 1e-5 some ReLU/LeakyReLU inputs of these tiny batch-normalised nets cross 0 inside ±h, where
//! a difference quotient is meaningless (the CE gradient alone, which the other tests prove
//! exact, measured 5e-4 there; 4e-11 at 1e-7, where round-off, ~1e-16·|L|/h, is still far
//! below the tolerance). A deliberate break
//! (the gradient without its second-order part: the coherence or TRS weights set to zero in
//! the gradient while the loss keeps them) must fail the same check by far.

mod common;
#[path = "common/tiny.rs"]
mod tiny;

use eio_reference::ensemble::member_path;
use eio_reference::gal::{coherence, gal_gradients};
use eio_reference::grad_check::{relative_error, DEFAULT_FLOOR};
use eio_reference::model::Gradients;
use eio_reference::second_order::{input_gradient, InputGradient};
use eio_reference::state::ModelState;
use eio_reference::trs::{alignment, magnitude, trs_gradients};
use eio_spec::config::{Activation, BnMode, Config, Sharing};
use eio_spec::plan::{Plan, Role};
use ndarray::{Array4, ArrayD};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The difference step along a direction over every parameter of every member (see the
/// module docs).
const STEP: f64 = 1e-7;

struct Case {
    plan: Plan,
    members: Vec<ModelState>,
    x: Array4<f64>,
    smooth_x: Array4<f64>,
    labels: Vec<usize>,
}

fn case(members: usize, activation: Activation, seed: u64) -> Case {
    let model = tiny::resnet8(1, Sharing::Independent, activation, 3, 4);
    let plan = tiny::plan(&model);
    let mut r = tiny::rng(seed);
    let members = (0..members)
        .map(|m| tiny::perturbed_state(&plan, seed * 10 + m as u64))
        .collect();
    let x = tiny::images(&mut r, 4, &plan);
    let smooth_x = tiny::images(&mut r, 4, &plan);
    let labels = tiny::labels(&mut r, 4, plan.classes);
    Case {
        plan,
        members,
        x,
        smooth_x,
        labels,
    }
}

fn firsts(c: &Case, members: &[ModelState], x: &Array4<f64>) -> Vec<InputGradient> {
    let path = member_path(&c.plan);
    members
        .iter()
        .map(|s| input_gradient(&c.plan, s, &path, x, &c.labels, BnMode::Train))
        .collect()
}

/// GAL's loss from first-order pieces: (Σ CE_m)/N + coherence·coh.
fn gal_loss(c: &Case, config: &Config, members: &[ModelState]) -> f64 {
    let f = firsts(c, members, &c.x);
    let grads: Vec<&Array4<f64>> = f.iter().map(|f| &f.grad).collect();
    let ce: f64 = f.iter().map(|f| f.loss).sum();
    ce / members.len() as f64 + config.gal.coherence * coherence(&grads, config.gal.log_offset).0
}

/// TRS's loss from first-order pieces, x̃ fixed.
fn trs_loss(c: &Case, config: &Config, members: &[ModelState]) -> f64 {
    let t = &config.trs;
    let f = firsts(c, members, &c.x);
    let s = firsts(c, members, &c.smooth_x);
    let grads: Vec<&Array4<f64>> = f.iter().map(|f| &f.grad).collect();
    let ce: f64 = f.iter().map(|f| f.loss).sum();
    let smooth = s.iter().map(|s| magnitude(&s.grad)).sum::<f64>() / members.len() as f64;
    ce + t.scale * (t.coeff * alignment(&grads).0 + t.lamda * smooth)
}

/// A random direction over every learnable tensor of every member.
fn direction(c: &Case, r: &mut ChaCha8Rng) -> Vec<Vec<(String, ArrayD<f64>)>> {
    c.members
        .iter()
        .map(|_| {
            c.plan
                .params
                .iter()
                .filter(|p| p.role == Role::Learnable)
                .map(|p| {
                    let d =
                        ArrayD::from_shape_fn(p.shape.as_slice(), |_| r.random_range(-1.0..1.0));
                    (p.name.clone(), d)
                })
                .collect()
        })
        .collect()
}

fn moved(c: &Case, d: &[Vec<(String, ArrayD<f64>)>], h: f64) -> Vec<ModelState> {
    c.members
        .iter()
        .zip(d)
        .map(|(s, dm)| {
            let mut s = s.clone();
            for (name, dir) in dm {
                let t = s.tensors.get_mut(name).expect("learnable tensor");
                *t = &*t + &(dir * h);
            }
            s
        })
        .collect()
}

fn along(grads: &[Gradients], d: &[Vec<(String, ArrayD<f64>)>]) -> f64 {
    grads
        .iter()
        .zip(d)
        .map(|(g, dm)| {
            dm.iter()
                .map(|(name, dir)| g.params.get(name).map_or(0.0, |t| (t * dir).sum()))
                .sum::<f64>()
        })
        .sum()
}

/// The relative error between ⟨gradient, d⟩ and the central difference of `loss` along d.
fn error(c: &Case, loss: &dyn Fn(&[ModelState]) -> f64, grads: &[Gradients], seed: u64) -> f64 {
    let d = direction(c, &mut tiny::rng(seed));
    let h = STEP;
    let numeric = (loss(&moved(c, &d, h)) - loss(&moved(c, &d, -h))) / (2.0 * h);
    relative_error(along(grads, &d), numeric, DEFAULT_FLOOR)
}

fn gal_error(c: &Case, loss_config: &Config, grad_config: &Config, seed: u64) -> f64 {
    let f = firsts(c, &c.members, &c.x);
    let (report, grads) = gal_gradients(&c.plan, &c.members, grad_config, &c.labels, &f);
    if loss_config == grad_config {
        let direct = gal_loss(c, loss_config, &c.members);
        assert!((report.loss - direct).abs() < 1e-12 * direct.abs().max(1.0));
    }
    error(c, &|m| gal_loss(c, loss_config, m), &grads, seed)
}

fn trs_error(c: &Case, loss_config: &Config, grad_config: &Config, seed: u64) -> f64 {
    let f = firsts(c, &c.members, &c.x);
    let s = firsts(c, &c.members, &c.smooth_x);
    let (report, grads) = trs_gradients(&c.plan, &c.members, grad_config, &c.labels, &f, &s);
    if loss_config == grad_config {
        let direct = trs_loss(c, loss_config, &c.members);
        assert!((report.loss - direct).abs() < 1e-12 * direct.abs().max(1.0));
    }
    error(c, &|m| trs_loss(c, loss_config, m), &grads, seed)
}

#[test]
fn gal_weight_gradient_matches_finite_differences() {
    for (members, activation, seed) in [
        (2, Activation::LeakyRelu, 1u64),
        (3, Activation::LeakyRelu, 2),
        (3, Activation::Relu, 3),
    ] {
        let c = case(members, activation, seed);
        let mut config = Config::default();
        // A coherence weight large enough that its share of the gradient is not small.
        config.gal.coherence = 5.0;
        for probe in 0..2 {
            let e = gal_error(&c, &config, &config, 100 + probe);
            eprintln!("GAL, {members} members, {activation:?}, probe {probe}: {e:.1e}");
            assert!(
                e < tiny::FD_TOL,
                "GAL, {members} members, {activation:?}, probe {probe}: relative error {e:e}"
            );
        }
    }
}

#[test]
fn trs_weight_gradient_matches_finite_differences() {
    for (members, seed) in [(2, 4u64), (3, 5)] {
        let c = case(members, Activation::Relu, seed);
        let config = Config::default();
        for probe in 0..2 {
            let e = trs_error(&c, &config, &config, 200 + probe);
            eprintln!("TRS, {members} members, probe {probe}: {e:.1e}");
            assert!(
                e < tiny::FD_TOL,
                "TRS, {members} members, probe {probe}: relative error {e:e}"
            );
        }
    }
}

/// Dropping the second-order part of the gradient (the loss keeps its gradient terms) is
/// caught: the error is then of order one, not 1e-6.
#[test]
fn deliberate_break_gradient_without_second_order_part_fails() {
    let c = case(3, Activation::LeakyRelu, 7);
    let mut gal = Config::default();
    gal.gal.coherence = 5.0;
    let mut gal_first_order_only = gal.clone();
    gal_first_order_only.gal.coherence = 0.0;
    let broken = gal_error(&c, &gal, &gal_first_order_only, 300);
    eprintln!("GAL without second order: {broken:.1e}");
    assert!(
        broken > 1e-3,
        "GAL without its second-order part: error only {broken:e}"
    );
    assert!(gal_error(&c, &gal, &gal, 300) < tiny::FD_TOL);

    let trs = Config::default();
    let mut trs_broken = trs.clone();
    trs_broken.trs.coeff = 0.0;
    let broken = trs_error(&c, &trs, &trs_broken, 301);
    eprintln!("TRS without alignment gradient: {broken:.1e}");
    assert!(
        broken > 1e-3,
        "TRS without its alignment gradient: error only {broken:e}"
    );
    let mut trs_broken = trs.clone();
    trs_broken.trs.lamda = 0.0;
    let broken = trs_error(&c, &trs, &trs_broken, 302);
    eprintln!("TRS without smoothness gradient: {broken:.1e}");
    assert!(
        broken > 1e-3,
        "TRS without its smoothness gradient: error only {broken:e}"
    );
}

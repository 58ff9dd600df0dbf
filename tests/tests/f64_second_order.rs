//! The exact second-order gradients of GAL and TRS (`second_order::input_gradient` and
//! `second_order::input_gradient_vjp`) against the reference: for L the batch-mean
//! cross-entropy along a path, g = dL/dx and s = ⟨g, v⟩ with a random direction v, the loss,
//! the logits, g, ds/dx and ds/dθ of every tensor the pass used, in BatchNorm train and eval
//! mode. f64 CPU at 1e-9 relative ([`Tolerance::F64_STRICT`]) over random small ResNets (ReLU
//! and LeakyReLU, both sharing modes) and VGG-16 (max pooling, flatten, gated classifier);
//! f32 CPU at [`Tolerance::F32`] on batches of 2-3 images (`cases::F32_BATCHES`).

use eio_spec::config::{Activation, Arch, BnMode, ModelConfig, Sharing, VggGating};
use eio_spec::{Path, Plan};
use eio_tests::cases::{
    bn_mode, images_like, net_spec, pass_case, pass_case_over, proptest_config, Fixture, NetSpec,
    PassCase, F32_BATCHES,
};
use eio_tests::engine::{or_skip, Engine, Images, Outcome};
use eio_tests::tolerance::{assert_close, assert_close_with_scale, scale_of};
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::prelude::*;

/// A direction v of the images' shape, uniform in [-1, 1), from the fixture's generator.
fn direction(fx: &Fixture) -> Images {
    let mut rng = fx.rng.clone();
    let v = images_like(&mut rng, &fx.images);
    Images {
        dims: v.dims,
        data: v.data.iter().map(|p| 2.0 * p - 1.0).collect(),
    }
}

/// One case's second-order pass in `mode` on both engines, compared under `tol`.
fn check_second_order(
    reference: &dyn Engine,
    candidate: &dyn Engine,
    fx: &Fixture,
    mode: BnMode,
    tol: Tolerance,
) -> Outcome<()> {
    let v = direction(fx);
    let run = |e: &dyn Engine| {
        e.second_order(
            &fx.plan, &fx.values, &fx.path, &fx.images, &fx.labels, &v, mode,
        )
    };
    let r = run(reference)?;
    let c = run(candidate)?;
    let what = format!(
        "{} vs {}: {mode:?} second order along {}",
        reference.name(),
        candidate.name(),
        fx.path
    );
    assert_close(&format!("{what}: logits"), &r.logits, &c.logits, tol);
    // The loss is a mean of terms as large as the logits.
    let scale = r.loss.abs().max(scale_of(&r.logits));
    assert_close_with_scale(&format!("{what}: loss"), &[r.loss], &[c.loss], tol, scale);
    assert_close(
        &format!("{what}: g = dL/dx"),
        &r.input_grad,
        &c.input_grad,
        tol,
    );
    assert_close(&format!("{what}: ds/dx"), &r.input, &c.input, tol);
    assert_eq!(
        r.params.keys().collect::<Vec<_>>(),
        c.params.keys().collect::<Vec<_>>(),
        "{what}: the engines give ds/dθ for different tensors"
    );
    assert!(!r.params.is_empty(), "{what}: no parameter gradients");
    for (name, g) in &r.params {
        assert_close(&format!("{what}: ds/d{name}"), g, &c.params[name], tol);
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config(6))]

    /// Random small ResNets (both sharing modes, ReLU or LeakyReLU), paths and batches of 1-3.
    #[test]
    fn second_order_matches_reference(case in pass_case(), mode in bn_mode()) {
        or_skip(
            "f64_second_order::second_order_matches_reference",
            check_second_order(
                &Reference,
                &Accelerated::f64_cpu(),
                &case.fixture(),
                mode,
                Tolerance::F64_STRICT,
            ),
        );
    }
}

proptest! {
    #![proptest_config(proptest_config(3))]

    /// The f32 engine on batches of 2-3 images, in both BN modes.
    #[test]
    fn f32_second_order_matches_reference(case in pass_case_over(net_spec(), F32_BATCHES)) {
        let fx = case.fixture();
        for mode in [BnMode::Train, BnMode::Eval] {
            or_skip(
                "f64_second_order::f32_second_order_matches_reference",
                check_second_order(&Reference, &Accelerated::f32_cpu(), &fx, mode, Tolerance::F32),
            );
        }
    }
}

/// Both activations and both BN modes on one fixed ResNet-14, independently of the strategy's
/// draws (LeakyReLU is GAL's members' activation).
#[test]
fn both_activations_and_modes() {
    for (activation, sharing, batch, seed) in [
        (Activation::Relu, Sharing::Independent, 2, 21),
        (Activation::LeakyRelu, Sharing::SharedConv, 3, 22),
        (Activation::Relu, Sharing::SharedConv, 1, 23),
    ] {
        let net = NetSpec {
            blocks: 2,
            activation,
            ..NetSpec::tiny(sharing)
        };
        let plan = net.plan();
        let path = Path::new((0..plan.k()).map(|g| (g % 2) as u8).collect());
        let case = PassCase {
            net,
            path,
            layer: 1,
            batch,
            seed,
        };
        for mode in [BnMode::Train, BnMode::Eval] {
            or_skip(
                "f64_second_order::both_activations_and_modes",
                check_second_order(
                    &Reference,
                    &Accelerated::f64_cpu(),
                    &case.fixture(),
                    mode,
                    Tolerance::F64_STRICT,
                ),
            );
        }
    }
}

/// VGG-16 (width 1/16, 32x32): the max-pool tangent and its first-maximum routing, flatten,
/// and a gated classifier.
#[test]
fn vgg16_second_order() {
    for (gating, sharing, mode, seed) in [
        (VggGating::Convs, Sharing::SharedConv, BnMode::Train, 31),
        (
            VggGating::ConvsAndClassifier,
            Sharing::Independent,
            BnMode::Eval,
            32,
        ),
    ] {
        let model = ModelConfig {
            arch: Arch::Vgg16,
            depth: 16,
            width: 1.0 / 16.0,
            n: 2,
            sharing,
            classes: 3,
            in_channels: 3,
            input_size: 32,
            activation: Activation::Relu,
            leaky_slope: 0.1,
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2023, 0.1994, 0.2010],
            vgg_gated: gating,
        };
        let plan = Plan::build(&model).expect("tiny VGG-16");
        let path = Path::new((0..plan.k()).map(|g| (g % 2) as u8).collect());
        let fx = Fixture::new(plan, path, 5, 2, seed);
        or_skip(
            "f64_second_order::vgg16_second_order",
            check_second_order(
                &Reference,
                &Accelerated::f64_cpu(),
                &fx,
                mode,
                Tolerance::F64_STRICT,
            ),
        );
    }
}

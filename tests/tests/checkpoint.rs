//! Checkpoints across engines: every engine reads the safetensors file another wrote (one
//! tensor per plan entry, named as the plan names it, counters as int64 scalars) and writes one
//! the others read. A checkpoint with awkward values (-0.0, a subnormal, f64::MAX, 1/3) and
//! counters beyond 2^53 goes reference -> engine -> reference and must come back bit for bit;
//! an f32 engine's checkpoint must hold the same values rounded to f32.

use std::path::PathBuf;

use eio_accelerated::state::ModelState as AccState;
use eio_reference::state::ModelState;
use eio_spec::config::Sharing;
use eio_spec::plan::Role;
use eio_tests::cases::{perturbed_values, NetSpec};
use eio_tests::engine::{or_skip, Engine};
use eio_tests::{reference, Accelerated, Reference};

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "eio-tests-{}-{name}.safetensors",
        std::process::id()
    ))
}

/// A reference state with awkward values and counters.
fn awkward(plan: &eio_spec::Plan) -> ModelState {
    let mut s = reference::state(plan, &perturbed_values(plan, 77));
    let specials = [-0.0, 5e-324, f64::MAX, -1e300, f64::MIN_POSITIVE, 1.0 / 3.0];
    for (i, t) in s.tensors.values_mut().enumerate() {
        if let Some(v) = t.iter_mut().next() {
            *v = specials[i % specials.len()];
        }
    }
    // 2^53 + 1 is the first integer an f64 cannot hold.
    let extremes = [(1i64 << 53) + 1, i64::MAX, 0, i64::MIN, 123_456_789_012];
    for (i, c) in s.counters.values_mut().enumerate() {
        *c = extremes[i % extremes.len()];
    }
    s
}

fn assert_bit_identical(what: &str, a: &ModelState, b: &ModelState) {
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    for (name, ta) in &a.tensors {
        let tb = &b.tensors[name];
        assert_eq!(ta.shape(), tb.shape(), "{what}: {name} shape");
        for (i, (x, y)) in ta.iter().zip(tb.iter()).enumerate() {
            assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "{what}: {name}[{i}] is {y:e}, written {x:e}"
            );
        }
    }
    assert_eq!(a.counters, b.counters, "{what}: counters");
}

#[test]
fn f64_engines_round_trip_the_reference_checkpoint() {
    for sharing in [Sharing::Independent, Sharing::SharedConv] {
        let plan = NetSpec::tiny(sharing).plan();
        let original = awkward(&plan);
        let written = temp("written");
        original.save(&written).expect("the reference writes");
        let engines: [&dyn Engine; 2] = [&Reference, &Accelerated::f64_cpu()];
        for engine in engines {
            let again = temp(&format!("again-{}", engine.name()));
            if or_skip(
                "checkpoint::f64_engines_round_trip_the_reference_checkpoint",
                engine.reload(&plan, &written, &again),
            )
            .is_none()
            {
                continue;
            }
            let back = ModelState::load(&plan, &again).expect("the reference reads it back");
            assert_bit_identical(
                &format!("{sharing:?}: reference -> {} -> reference", engine.name()),
                &original,
                &back,
            );
            let _ = std::fs::remove_file(&again);
        }
        let _ = std::fs::remove_file(&written);
    }
}

#[test]
fn f32_engine_checkpoint_holds_the_values_rounded() {
    let plan = NetSpec::tiny(Sharing::SharedConv).plan();
    let original = awkward(&plan);
    let written = temp("written-f32");
    original.save(&written).expect("the reference writes");
    let f32_file = temp("f32");
    if or_skip(
        "checkpoint::f32_engine_checkpoint_holds_the_values_rounded",
        Accelerated::f32_cpu().reload(&plan, &written, &f32_file),
    )
    .is_none()
    {
        return;
    }
    let back = AccState::load(
        &plan,
        &f32_file,
        &candle_core::Device::Cpu,
        candle_core::DType::F64,
    )
    .expect("an f32 checkpoint loads as f64");
    for spec in &plan.params {
        if spec.role == Role::Counter {
            assert_eq!(
                back.counters[&spec.name], original.counters[&spec.name],
                "counter {}",
                spec.name
            );
            continue;
        }
        let got = eio_tests::accelerated::host(back.tensor(&spec.name));
        for (i, (x, y)) in original.tensor(&spec.name).iter().zip(&got).enumerate() {
            let rounded = f64::from(*x as f32);
            assert_eq!(
                rounded.to_bits(),
                y.to_bits(),
                "{}[{i}]: {y:e}, expected {x:e} rounded to f32 ({rounded:e})",
                spec.name
            );
        }
    }
    let _ = std::fs::remove_file(&written);
    let _ = std::fs::remove_file(&f32_file);
}

//! The f32 single-pass checks on CUDA against the f64 reference at 1e-4 relative
//! ([`Tolerance::F32`]): run with `--features cuda` and `EIO_DEVICE=cuda`. Otherwise every test
//! here prints `skipped: ... CUDA: ...` (visible in a plain `cargo test`) and returns.

use eio_spec::config::Sharing;
use eio_tests::cases::{net_spec, pass_case_over, proptest_config, NetSpec, PassCase, F32_BATCHES};
use eio_tests::checks::check_single_passes;
use eio_tests::engine::or_skip;
use eio_tests::{Accelerated, Reference, Tolerance};
use proptest::test_runner::TestRunner;

#[test]
fn cuda_single_passes_match_reference() {
    let Some(cuda) = or_skip(
        "cuda::cuda_single_passes_match_reference",
        Accelerated::cuda(),
    ) else {
        return;
    };
    let mut runner = TestRunner::new(proptest_config(16));
    runner
        .run(&pass_case_over(net_spec(), F32_BATCHES), |case| {
            let fx = case.fixture();
            check_single_passes(&Reference, &cuda, &fx, Tolerance::F32)
                .expect("the CUDA engine runs every single pass");
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn cuda_both_sharing_modes() {
    let Some(cuda) = or_skip("cuda::cuda_both_sharing_modes", Accelerated::cuda()) else {
        return;
    };
    for sharing in [Sharing::Independent, Sharing::SharedConv] {
        let case = PassCase {
            net: NetSpec::tiny(sharing),
            path: "0101101".parse().expect("a path"),
            layer: 4,
            batch: 3,
            seed: 31,
        };
        check_single_passes(&Reference, &cuda, &case.fixture(), Tolerance::F32)
            .expect("the CUDA engine runs every single pass");
    }
}

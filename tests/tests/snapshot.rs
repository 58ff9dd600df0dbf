//! One seeded end-to-end run that both f64 engines must reproduce to 6 significant digits:
//! 3 EIO iterations (Algorithm 1 lines 11-24) on the tiny ResNet-8 with the `official` preset's
//! Algorithm 1, distillation and SGD settings, from the plan's initial values, then the
//! white-box all-or-nothing evaluation (PGD, CE, 10 steps, 2 ε, 2 restarts) of the trained RGN
//! deployed with random gates (EOT over 2 paths).
//!
//! Each engine formats its own report; the two strings must be equal, and then the one string
//! is the snapshot. Values are printed with 6 significant digits: the f64 engines agree to
//! ~1e-12 relative, so a rounding boundary between them has probability ~1e-6 per value.
//! Review an intended change with `cargo insta review`.

use std::fmt::Write;

use eio_spec::config::{AttackLoss, BnMode, EvalConfig, Sharing};
use eio_spec::plan::Role;
use eio_spec::rng::Seeds;
use eio_spec::{Path, Preset};
use eio_tests::cases::{images, initial_values, NetSpec};
use eio_tests::checks::eio_iteration;
use eio_tests::engine::{or_skip, Engine, TargetSpec};
use eio_tests::{Accelerated, Reference};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const ITERATIONS: u64 = 3;
const BATCH: usize = 2;
const EVAL_IMAGES: usize = 4;

fn sig(x: f64) -> String {
    format!("{x:.5e}")
}

fn sigs(v: &[f64]) -> String {
    v.iter().map(|&x| sig(x)).collect::<Vec<_>>().join(" ")
}

/// The report of `engine`, or `None` if it cannot run the case.
fn report(engine: &dyn Engine) -> Option<String> {
    let net = NetSpec::tiny(Sharing::SharedConv);
    let plan = net.plan();
    let mut config = Preset::Official.config().expect("shipped preset");
    config.model = net.model();
    let seeds = Seeds::new(config.seed);
    let values = initial_values(&plan, config.seed);
    let mut rng = ChaCha8Rng::seed_from_u64(1000);
    let iterations: Vec<_> = (0..ITERATIONS)
        .map(|i| eio_iteration(&plan, &config, &seeds, i, BATCH, &mut rng))
        .collect();
    let run = or_skip("snapshot", engine.eio(&plan, &config, &values, &iterations))?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "official preset on {}: n = {} {:?}, K = {}, L = {}, p = {}, {:?}, unused {:?}",
        plan.name,
        plan.n,
        plan.sharing,
        plan.k(),
        plan.l(),
        config.eio.p,
        config.eio.loss_scale,
        config.eio.unused_params
    );
    for (i, r) in run.reports.iter().enumerate() {
        let paths: Vec<String> = r.paths.iter().map(Path::to_string).collect();
        let _ = writeln!(
            out,
            "iteration {i}: layer {} paths [{}]",
            r.layer,
            paths.join(" ")
        );
        let _ = writeln!(out, "  path losses    {}", sigs(&r.path_losses));
        let _ = writeln!(out, "  distill losses {}", sigs(&r.distill_losses));
        let _ = writeln!(out, "  sign ties      {}", r.sign_ties);
    }
    for (what, role) in [
        ("parameters", Role::Learnable),
        ("running stats", Role::RunningStat),
    ] {
        let (mut sum, mut squares) = (0.0, 0.0);
        for spec in plan.params.iter().filter(|p| p.role == role) {
            for &v in &run.state[&spec.name] {
                sum += v;
                squares += v * v;
            }
        }
        let _ = writeln!(
            out,
            "{what}: sum {} sum of squares {}",
            sig(sum),
            sig(squares)
        );
    }
    let counters: f64 = plan
        .params
        .iter()
        .filter(|p| p.role == Role::Counter)
        .map(|p| run.state[&p.name][0])
        .sum();
    let _ = writeln!(out, "num_batches_tracked total {counters}");

    // White-box evaluation of the trained RGN with random gates. Labels: the engine's own
    // eval-mode predictions along the all-zeros path, so clean accuracy is informative.
    let mut rng = ChaCha8Rng::seed_from_u64(2000);
    let eval_images = images(&mut rng, EVAL_IMAGES, &plan);
    let zeros = Path::new(vec![0; plan.k()]);
    let labels = or_skip(
        "snapshot",
        engine.predict(
            &TargetSpec::Path {
                plan: &plan,
                values: &run.state,
                path: &zeros,
                mode: BnMode::Eval,
            },
            &eval_images,
            rng.clone(),
        ),
    )?;
    let eval = EvalConfig {
        images: EVAL_IMAGES,
        eps: vec![0.01, 0.03],
        steps: 10,
        restarts: 2,
        losses: vec![AttackLoss::Ce],
        eot_samples: 2,
        batch_size: EVAL_IMAGES,
        ..config.eval.clone()
    };
    let target = TargetSpec::Randomised {
        plan: &plan,
        values: &run.state,
        eot: eval.eot_samples,
    };
    let wb = or_skip(
        "snapshot",
        engine.white_box(&target, &eval_images, &labels, &eval, &seeds),
    )?;
    let _ = writeln!(
        out,
        "white-box: randomised RGN (EOT {}), {} images labelled {:?}, PGD-CE {} steps of eps·{}, {} restarts",
        eval.eot_samples, EVAL_IMAGES, labels, eval.steps, eval.step_fraction, eval.restarts
    );
    let _ = writeln!(out, "  clean accuracy {}", sig(wb.clean_accuracy));
    for (eps, r) in &wb.per_eps {
        let robust: String = r
            .robust
            .iter()
            .map(|&b| if b { '1' } else { '0' })
            .collect();
        let versions: Vec<String> = r
            .per_version
            .iter()
            .map(|(k, v)| format!("{k} {}", sig(*v)))
            .collect();
        let _ = writeln!(
            out,
            "  eps {eps}: robust {robust} ({} images, accuracy {}); {}",
            r.robust_count,
            sig(r.accuracy),
            versions.join(", ")
        );
    }
    Some(out)
}

#[test]
fn official_eio_and_white_box_both_engines() {
    let reference = report(&Reference).expect("the reference runs everything");
    let Some(accelerated) = report(&Accelerated::f64_cpu()) else {
        return;
    };
    assert_eq!(
        reference, accelerated,
        "the reference and the f64 accelerated engine must print the same report"
    );
    insta::assert_snapshot!("official_tiny_resnet8_eio_and_white_box", reference);
}

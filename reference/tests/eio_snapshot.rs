//! Snapshots of seeded 3-iteration EIO runs (Algorithm 1 lines 11-24) on the tiny ResNet-8,
//! with the `official` and the `paper` presets' Algorithm 1, distillation and optimiser
//! settings. Any change to the numbers the reference produces (a new op order, a different
//! random draw, a changed default) shows up here as a diff to review.
//!
//! Each iteration draws (l, paths) with `eio_spec::sampler::draw_iteration` (seeds from the
//! preset's master seed), builds a batch from a seeded ChaCha8 stream, and runs
//! `eq4_iteration` with the SGD of `config.train`; the distillation random starts come from
//! `Stream::DistillStart` split by iteration. The model starts from `ModelState::init` (the
//! initial values every engine starts from).

#[path = "common/tiny.rs"]
mod tiny;

use std::fmt::Write;

use eio_reference::eio::{eq4_iteration, EioBatch};
use eio_reference::state::ModelState;
use eio_spec::plan::Role;
use eio_spec::rng::{Seeds, Stream};
use eio_spec::sampler::draw_iteration;
use eio_spec::Preset;

const ITERATIONS: u64 = 3;
const BATCH: usize = 2;

fn run(preset: Preset) -> String {
    let config = tiny::preset_tiny(preset);
    let plan = tiny::plan(&config.model);
    let seeds = Seeds::new(config.seed);
    let mut state = ModelState::init(&plan, &seeds, 0);
    let mut sgd = tiny::sgd(&config);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "preset {}: {} n = {} {:?}, K = {}, L = {}, p = {}, loss_scale {:?}, unused {:?}",
        preset.name(),
        plan.name,
        plan.n,
        plan.sharing,
        plan.k(),
        plan.l(),
        config.eio.p,
        config.eio.loss_scale,
        config.eio.unused_params
    );
    let _ = writeln!(
        out,
        "distill: eps {} steps {} step {} random_start {} momentum {} bn {:?} feature {:?} first_before_relu {}",
        config.distill.eps,
        config.distill.steps,
        config.distill.step_size(),
        config.distill.random_start,
        config.distill.momentum,
        config.distill.bn_mode,
        config.distill.feature,
        config.distill.first_layer_before_relu
    );
    for iteration in 0..ITERATIONS {
        let draw = draw_iteration(&plan, &config.eio, &seeds, 0, iteration).unwrap();
        let mut r = tiny::rng(1000 + iteration);
        let batch = EioBatch {
            source: tiny::images(&mut r, BATCH, &plan),
            labels: tiny::labels(&mut r, BATCH, plan.classes),
            target: tiny::images(&mut r, BATCH, &plan),
        };
        let mut start = seeds.stream(Stream::DistillStart, iteration);
        let report = eq4_iteration(
            &plan, &mut state, &mut sgd, &config, &batch, &draw, &mut start,
        );
        assert_eq!(report.layer, draw.layer);
        assert_eq!(report.paths, draw.paths);
        let paths: Vec<String> = report.paths.iter().map(|p| p.to_string()).collect();
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.9}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            out,
            "iteration {iteration}: layer {} (d = {}) paths [{}]",
            report.layer,
            plan.layer(report.layer).depth,
            paths.join(" ")
        );
        let _ = writeln!(out, "  path losses    {}", fmt(&report.path_losses));
        let _ = writeln!(out, "  distill losses {}", fmt(&report.distill_losses));
        let _ = writeln!(out, "  sign ties      {}", report.sign_ties);
    }
    let (mut sum, mut squares) = (0.0, 0.0);
    for spec in plan.params.iter().filter(|p| p.role == Role::Learnable) {
        for &v in state.tensor(&spec.name) {
            sum += v;
            squares += v * v;
        }
    }
    let _ = writeln!(out, "parameters: sum {sum:.9} sum of squares {squares:.9}");
    let (mut sum, mut squares) = (0.0, 0.0);
    for spec in plan.params.iter().filter(|p| p.role == Role::RunningStat) {
        for &v in state.tensor(&spec.name) {
            sum += v;
            squares += v * v;
        }
    }
    let _ = writeln!(
        out,
        "running stats: sum {sum:.9} sum of squares {squares:.9}"
    );
    let counters: i64 = state.counters.values().sum();
    let _ = writeln!(out, "num_batches_tracked total {counters}");
    out
}

#[test]
fn official_three_iterations() {
    insta::assert_snapshot!("official_tiny_resnet8", run(Preset::Official));
}

#[test]
fn paper_three_iterations() {
    insta::assert_snapshot!("paper_tiny_resnet8", run(Preset::Paper));
}

//! The authors' released RGN (issue 6, `../shared/notes/official-checkpoint.md`), imported by
//! `eio import` and run on the CIFAR-10 test set (the shared JPEG re-encoding): paths
//! 0000000000000000000 and 1111111111111111111 give the fact sheet's clean accuracies (84.53 %
//! and 84.18 % on all 10,000 images) to within 0.3 points, and the reference and accelerated
//! engines give the same logits (1e-4) and predictions on the same decoded pixels.
//! Skips, with a visible line, when the checkpoint or the data set is not on this machine.
//!
//! The reference engine's own accuracy on all 10,000 images (about 4 minutes per path on 2 cores in
//! release) is the `#[ignore]`d test below; run it with
//! `cargo test --release -p eio-tests --test official_checkpoint -- --ignored --nocapture`.

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;

use candle_core::{DType, Device};
use eio_accelerated::model::logits;
use eio_accelerated::pytorch::import;
use eio_data::DataSplits;
use eio_spec::config::{BnMode, Config, Preset};
use eio_spec::plan::Plan;
use eio_spec::rng::Seeds;
use eio_spec::Path;
use ndarray::Array4;

fn shared() -> PathBuf {
    match std::env::var_os("EIO_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

fn skip(reason: &str) {
    let _ = std::io::stderr()
        .write_all(format!("\nskipped: official_checkpoint: {reason}\n").as_bytes());
}

fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (k, &v)| if v > b.1 { (k, v) } else { b },
        )
        .0
}

/// The fact sheet's clean accuracies on all 10,000 test images, per path.
const FACT_SHEET: [(&str, f64); 2] = [
    ("0000000000000000000", 84.53),
    ("1111111111111111111", 84.18),
];

/// The released RGN imported into both engines, and the CIFAR-10 test set.
struct Released {
    data: DataSplits,
    plan: Plan,
    state: eio_accelerated::state::ModelState,
    reference: eio_reference::state::ModelState,
}

impl Released {
    /// Imports the checkpoint and decodes the test set, or prints a skip line and returns `None`
    /// when either file is not on this machine.
    fn load() -> Option<Self> {
        let checkpoint = shared().join("models/eio-official-resnet20-n2-p3-eps007.pth.tar");
        let jpeg = shared().join("data/cifar10-jpeg.tar.gz");
        for f in [&checkpoint, &jpeg] {
            if !f.is_file() {
                skip(&format!("{} not found (set EIO_SHARED)", f.display()));
                return None;
            }
        }
        let mut config: Config = Preset::Official.config().unwrap();
        config.data.path = Some(jpeg);
        config.data.validation = 0;
        let data = eio_data::load(&config, &Seeds::new(config.seed)).unwrap();
        assert_eq!(data.test.len(), 10_000);
        let (ckpt, summary) =
            import(&checkpoint, &config, false, &Device::Cpu, DType::F32).unwrap();
        let plan = ckpt.plan().unwrap();
        assert_eq!(
            summary.tensors,
            plan.params.len(),
            "every plan tensor is imported"
        );
        let state = ckpt.members[0].clone();
        let values = state.to_values().unwrap();
        let reference =
            eio_reference::state::ModelState::from_values(&plan, &values, "imported").unwrap();
        Some(Self {
            data,
            plan,
            state,
            reference,
        })
    }

    /// The accelerated engine's eval-mode logits of test images `range` along `path`, one row
    /// per image.
    fn accelerated_logits(&self, path: &Path, range: Range<usize>) -> Vec<Vec<f64>> {
        let (x, _) =
            eio_accelerated::train::range_tensors(&self.data.test, range, &Device::Cpu, DType::F32)
                .unwrap();
        let (z, _) = logits(&self.plan, &self.state, path, &x, BnMode::Eval).unwrap();
        z.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
    }

    /// The reference engine's logits on the same decoded pixels (widened to f64), one row per
    /// image.
    fn reference_logits(&self, path: &Path, range: Range<usize>) -> Vec<Vec<f64>> {
        let pixels: Vec<f64> = self
            .data
            .test
            .unit_range(range.clone())
            .iter()
            .map(|&p| f64::from(p))
            .collect();
        let input = Array4::from_shape_vec((range.len(), 3, 32, 32), pixels).unwrap();
        let (z, _) =
            eio_reference::model::logits(&self.plan, &self.reference, path, &input, BnMode::Eval);
        z.rows().into_iter().map(|row| row.to_vec()).collect()
    }
}

#[test]
fn released_rgn_matches_the_fact_sheet_in_both_engines() {
    let Some(released) = Released::load() else {
        return;
    };
    let test = &released.data.test;
    for (gates, expected) in FACT_SHEET {
        let path = released.plan.path_space().parse(gates).unwrap();
        let mut correct = 0;
        for start in (0..test.len()).step_by(500) {
            let z = released.accelerated_logits(&path, start..start + 500);
            correct += z
                .iter()
                .zip(&test.labels[start..start + 500])
                .filter(|(row, &y)| argmax(row) == y as usize)
                .count();
        }
        // The reference on the same decoded pixels: same logits to 1e-4, same classes.
        let checked = 40;
        let z = released.accelerated_logits(&path, 0..checked);
        let zr = released.reference_logits(&path, 0..checked);
        for (i, (row, rrow)) in z.iter().zip(&zr).enumerate() {
            for (k, (&v, &r)) in row.iter().zip(rrow).enumerate() {
                assert!(
                    (v - r).abs() <= 1e-4 * r.abs().max(1.0),
                    "path {gates} image {i} class {k}: accelerated {v}, reference {r}"
                );
            }
            assert_eq!(argmax(row), argmax(rrow));
        }
        let accuracy = 100.0 * correct as f64 / test.len() as f64;
        eprintln!("path {gates}: {accuracy:.2} % on 10,000 test images (fact sheet {expected} %); reference agrees on {checked} images");
        assert!(
            (accuracy - expected).abs() <= 0.3,
            "path {gates}: {accuracy:.2} %, fact sheet {expected} %"
        );
    }
}

/// The reference engine alone, on all 10,000 test images of both paths: its accuracy is the fact
/// sheet's to within 0.3 points, its logits agree with the accelerated engine's to 1e-4 on every
/// image, and the two engines predict the same class for every image. Split over the available
/// cores; about 4 minutes per path on 2 cores in release (8.5 minutes measured), too long for
/// every CI run, so it runs on request (`--ignored`).
#[test]
#[ignore = "about 8.5 minutes on 2 cores in release; run with --ignored"]
fn reference_engine_matches_the_fact_sheet_on_the_full_test_set() {
    let Some(released) = Released::load() else {
        return;
    };
    let test = &released.data.test;
    let n = test.len();
    let chunk = 100;
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    for (gates, expected) in FACT_SHEET {
        let path = released.plan.path_space().parse(gates).unwrap();
        let started = std::time::Instant::now();
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        // Each worker takes every `threads`-th chunk and returns (correct, disagreements, worst).
        let results: Vec<(usize, usize, f64)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let (starts, path) = (&starts, &path);
                    let released = &released;
                    scope.spawn(move || {
                        let mut totals = (0, 0, 0.0f64);
                        for &start in starts.iter().skip(t).step_by(threads) {
                            let range = start..(start + chunk).min(n);
                            let labels = &test.labels[range.clone()];
                            let zr = released.reference_logits(path, range.clone());
                            let z = released.accelerated_logits(path, range);
                            for ((row, rrow), &y) in z.iter().zip(&zr).zip(labels) {
                                for (&v, &r) in row.iter().zip(rrow) {
                                    let err = (v - r).abs() / r.abs().max(1.0);
                                    totals.2 = totals.2.max(err);
                                }
                                let predicted = argmax(rrow);
                                totals.0 += usize::from(predicted == y as usize);
                                totals.1 += usize::from(predicted != argmax(row));
                            }
                        }
                        totals
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let correct: usize = results.iter().map(|r| r.0).sum();
        let disagreements: usize = results.iter().map(|r| r.1).sum();
        let worst = results.iter().map(|r| r.2).fold(0.0, f64::max);
        let accuracy = 100.0 * correct as f64 / n as f64;
        eprintln!(
            "reference engine, path {gates}: {accuracy:.2} % on {n} test images (fact sheet \
             {expected} %); {disagreements} predictions differ from the accelerated engine; \
             worst logit difference {worst:.2e} (relative, floor 1); {:.0} s on {threads} threads",
            started.elapsed().as_secs_f64()
        );
        assert!(worst <= 1e-4, "path {gates}: logits differ by {worst:.2e}");
        assert_eq!(
            disagreements, 0,
            "path {gates}: the engines' predictions differ"
        );
        assert!(
            (accuracy - expected).abs() <= 0.3,
            "path {gates}: reference {accuracy:.2} %, fact sheet {expected} %"
        );
    }
}

//! The authors' released RGN (issue 6, `../shared/notes/official-checkpoint.md`), imported by
//! `eio import` and run on the CIFAR-10 test set (the shared JPEG re-encoding): paths
//! 0000000000000000000 and 1111111111111111111 give the fact sheet's clean accuracies (84.53 %
//! and 84.18 % on all 10,000 images) to within 0.3 points, and the reference and accelerated
//! engines give the same logits (1e-4) and predictions on the same decoded pixels.
//! Skips, with a visible line, when the checkpoint or the data set is not on this machine.

use std::io::Write;
use std::path::PathBuf;

use candle_core::{DType, Device};
use eio_accelerated::model::logits;
use eio_accelerated::pytorch::import;
use eio_spec::config::{BnMode, Config, Preset};
use eio_spec::rng::Seeds;
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

#[test]
fn released_rgn_matches_the_fact_sheet_in_both_engines() {
    let checkpoint = shared().join("models/eio-official-resnet20-n2-p3-eps007.pth.tar");
    let jpeg = shared().join("data/cifar10-jpeg.tar.gz");
    for f in [&checkpoint, &jpeg] {
        if !f.is_file() {
            return skip(&format!("{} not found (set EIO_SHARED)", f.display()));
        }
    }
    let mut config: Config = Preset::Official.config().unwrap();
    config.data.path = Some(jpeg);
    config.data.validation = 0;
    let data = eio_data::load(&config, &Seeds::new(config.seed)).unwrap();
    assert_eq!(data.test.len(), 10_000);
    let (ckpt, summary) = import(&checkpoint, &config, false, &Device::Cpu, DType::F32).unwrap();
    let plan = ckpt.plan().unwrap();
    assert_eq!(
        summary.tensors,
        plan.params.len(),
        "every plan tensor is imported"
    );
    let state = &ckpt.members[0];
    let space = plan.path_space();
    let values = state.to_values().unwrap();
    let reference =
        eio_reference::state::ModelState::from_values(&plan, &values, "imported").unwrap();
    for (gates, expected) in [
        ("0000000000000000000", 84.53),
        ("1111111111111111111", 84.18),
    ] {
        let path = space.parse(gates).unwrap();
        let mut correct = 0;
        let mut checked = 0;
        for start in (0..data.test.len()).step_by(500) {
            let idx: Vec<usize> = (start..start + 500).collect();
            let part = data.test.subset(&idx);
            let (x, _) = eio_accelerated::train::to_tensors(
                part.pixels.clone(),
                part.labels.clone(),
                &data.test,
                &Device::Cpu,
                DType::F32,
            )
            .unwrap();
            let (z, _) = logits(&plan, state, &path, &x, BnMode::Eval).unwrap();
            let z = z.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
            correct += z
                .iter()
                .zip(&part.labels)
                .filter(|(row, &y)| argmax(row) == y as usize)
                .count();
            if start == 0 {
                // The reference on the same decoded pixels: same logits to 1e-4, same classes.
                let n = 40;
                let pixels: Vec<f64> = part.pixels[..n * 3072]
                    .iter()
                    .map(|&p| f64::from(p))
                    .collect();
                let input = Array4::from_shape_vec((n, 3, 32, 32), pixels).unwrap();
                let (zr, _) =
                    eio_reference::model::logits(&plan, &reference, &path, &input, BnMode::Eval);
                for (i, row) in z.iter().take(n).enumerate() {
                    for (k, &v) in row.iter().enumerate() {
                        let r = zr[[i, k]];
                        assert!(
                            (v - r).abs() <= 1e-4 * r.abs().max(1.0),
                            "path {gates} image {i} class {k}: accelerated {v}, reference {r}"
                        );
                    }
                    let rrow: Vec<f64> = (0..row.len()).map(|k| zr[[i, k]]).collect();
                    assert_eq!(argmax(row), argmax(&rrow));
                    checked += 1;
                }
            }
        }
        let accuracy = 100.0 * correct as f64 / data.test.len() as f64;
        eprintln!("path {gates}: {accuracy:.2} % on 10,000 test images (fact sheet {expected} %); reference agrees on {checked} images");
        assert!(
            (accuracy - expected).abs() <= 0.3,
            "path {gates}: {accuracy:.2} %, fact sheet {expected} %"
        );
    }
}

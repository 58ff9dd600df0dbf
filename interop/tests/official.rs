//! The authors' released RGN (shared/notes/official-checkpoint.md): container facts, import into
//! the official ResNet-20 plan (shared-conv and independent), and a reference forward along two
//! paths. Skipped, with a visible line, where the file is not present.

mod common;

use std::path::PathBuf;

use eio_interop::torch::{Container, TorchDtype};
use eio_interop::{import_state_dict, read_state_dict_file, ImportOptions, NormalizerSource};
use eio_reference::state::ModelState;
use eio_spec::config::{BnMode, Config, Sharing};
use eio_spec::plan::Plan;
use eio_spec::Path;
use ndarray::Array4;

fn official_plan(sharing: Sharing) -> Plan {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/official.toml");
    let mut config = Config::load(&path).expect("configs/official.toml loads");
    config.model.sharing = sharing;
    config.plan().expect("the official plan builds")
}

/// Formula-defined pixels in [0, 1].
fn pixels(n: usize) -> Array4<f64> {
    Array4::from_shape_fn((n, 3, 32, 32), |(b, c, h, w)| {
        0.5 + 0.45 * (((b * 131 + c * 37 + h * 7 + w * 3) as f64) * 0.1).sin()
    })
}

#[test]
fn released_checkpoint_container_facts() {
    let path = match common::official_checkpoint() {
        Ok(p) => p,
        Err(reason) => return common::skip("released_checkpoint_container_facts", &reason),
    };
    let dict = read_state_dict_file(&path).unwrap();
    assert_eq!(dict.container, Container::Legacy);
    assert_eq!(dict.nesting.as_deref(), Some("state_dict"));
    assert_eq!(dict.entries.len(), 244);
    assert_eq!(dict.storage_count(), 225);
    let counters: Vec<&str> = dict
        .entries
        .iter()
        .filter(|(_, t)| t.dtype() == TorchDtype::I64)
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(counters.len(), 40);
    assert!(counters.iter().all(|n| n.ends_with("num_batches_tracked")));
    assert!(dict
        .entries
        .iter()
        .all(|(_, t)| t.dtype() == TorchDtype::I64 || t.dtype() == TorchDtype::F32));
    assert!(dict
        .entries
        .iter()
        .all(|(_, t)| t.storage.location == "cuda:0"));
    let listed: usize = dict.entries.iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(listed, 544_536);
    // 19 shared groups: candidate 0 and 1 conv weights of every gated module.
    let shared = dict.shared_storages();
    assert_eq!(shared.len(), 19);
    for names in shared.values() {
        assert_eq!(names.len(), 2);
        assert!(names[0].ends_with(".candidate_ops.0.0.weight"), "{names:?}");
        assert_eq!(
            names[1],
            names[0].replace(".candidate_ops.0.0.weight", ".candidate_ops.1.0.weight")
        );
    }
    let stored: usize = {
        let mut seen = std::collections::BTreeSet::new();
        dict.entries
            .iter()
            .filter(|(_, t)| seen.insert(t.storage.key.clone()))
            .map(|(_, t)| t.storage.numel)
            .sum()
    };
    assert_eq!(stored, 276_840);
    let stem = dict
        .get("net.model.conv1.candidate_ops.0.0.weight")
        .unwrap();
    assert_eq!(stem.shape, vec![16, 3, 3, 3]);
    assert_eq!(
        dict.get("net.model.layer3.0.downsample.0.weight")
            .unwrap()
            .shape,
        vec![64, 32, 1, 1]
    );
    let counter = dict
        .get("net.model.layer2.0.downsample.1.num_batches_tracked")
        .unwrap();
    assert!(counter.shape.is_empty());
    assert_eq!(counter.to_f64().unwrap(), vec![531_512.0]);
    let mean = dict.get("net.normalizer.mean").unwrap().to_f64().unwrap();
    let std = dict.get("net.normalizer.std").unwrap().to_f64().unwrap();
    let f32s = |v: [f32; 3]| v.map(f64::from).to_vec();
    assert_eq!(mean, f32s([0.4914, 0.4822, 0.4465]));
    assert_eq!(std, f32s([0.2023, 0.1994, 0.2010]));
}

#[test]
fn released_checkpoint_imports_into_both_sharing_modes_and_runs() {
    let path = match common::official_checkpoint() {
        Ok(p) => p,
        Err(reason) => {
            return common::skip(
                "released_checkpoint_imports_into_both_sharing_modes_and_runs",
                &reason,
            )
        }
    };
    let dict = read_state_dict_file(&path).unwrap();
    let shared_plan = official_plan(Sharing::SharedConv);
    let shared = import_state_dict(&dict, &shared_plan, &ImportOptions::default()).unwrap();
    assert_eq!(shared.values.len(), shared_plan.params.len());
    assert_eq!(shared.normalizer_source, NormalizerSource::File);
    assert!(shared.ignored.is_empty());
    let conv = "net.model.layer1.0.conv1.candidate_ops.0.0.weight";
    assert_eq!(shared.sources[conv].len(), 2);
    assert_eq!(
        shared.values[conv],
        dict.get(conv).unwrap().to_f64().unwrap()
    );

    let independent_plan = official_plan(Sharing::Independent);
    let independent =
        import_state_dict(&dict, &independent_plan, &ImportOptions::default()).unwrap();
    assert_eq!(independent.values.len(), 244);
    assert_eq!(
        independent.values[conv],
        independent.values["net.model.layer1.0.conv1.candidate_ops.1.0.weight"]
    );

    // Reference forward along the all-0 and all-1 paths, on both plans.
    let x = pixels(1);
    let mut logits_by_path = Vec::new();
    for gates in ["0000000000000000000", "1111111111111111111"] {
        let p: Path = gates.parse().unwrap();
        let (a, _) = eio_reference::model::logits(
            &shared_plan,
            &ModelState::from_values(&shared_plan, &shared.values, "imported").unwrap(),
            &p,
            &x,
            BnMode::Eval,
        );
        if gates.starts_with('1') {
            // (one path is enough: the reference forward is slow at opt-level 1)
            let (b, _) = eio_reference::model::logits(
                &independent_plan,
                &ModelState::from_values(&independent_plan, &independent.values, "imported")
                    .unwrap(),
                &p,
                &x,
                BnMode::Eval,
            );
            assert_eq!(a, b, "shared-conv and independent imports agree on {gates}");
        }
        assert!(a.iter().all(|v| v.is_finite()), "{gates}: {a}");
        assert!(a.iter().any(|v| v.abs() > 1e-3), "{gates}: logits all ~0");
        logits_by_path.push(a);
    }
    let diff = (&logits_by_path[0] - &logits_by_path[1])
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        diff > 1e-3,
        "paths 0…0 and 1…1 give the same logits ({diff})"
    );
}

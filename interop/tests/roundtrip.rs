//! Export then re-import: the authors' layout (whole RGN) and DVERGE's (one path), in float32
//! and float64, on a synthetic RGN and on the released checkpoint.

mod common;

use std::collections::BTreeMap;

use common::{authors_checkpoint, tiny_model, Nesting};
use eio_interop::torch::{Container, TorchDtype};
use eio_interop::{
    export_authors, export_dverge, import_state_dict, read_state_dict, read_state_dict_file,
    DvergeNames, ExportDtype, ExportOptions, ImportOptions, InteropError, NormalizerSource,
    SourceLayout,
};
use eio_spec::config::Sharing;
use eio_spec::plan::Plan;

fn plan(n: usize, sharing: Sharing) -> Plan {
    Plan::build(&tiny_model(n, sharing)).unwrap()
}

/// Values that are not float32-exact, to show float64 export loses nothing.
fn irrational(plan: &Plan) -> BTreeMap<String, Vec<f64>> {
    let base = import_state_dict(
        &read_state_dict(&authors_checkpoint(plan).legacy(Nesting::Top), "t").unwrap(),
        plan,
        &ImportOptions::default(),
    )
    .unwrap();
    base.values
        .into_iter()
        .map(|(k, v)| {
            let v = if k.ends_with("num_batches_tracked") || k.contains("normalizer") {
                v
            } else {
                v.iter().map(|x| x + std::f64::consts::PI * 1e-9).collect()
            };
            (k, v)
        })
        .collect()
}

#[test]
fn authors_export_round_trips_in_both_sharing_modes() {
    for sharing in [Sharing::SharedConv, Sharing::Independent] {
        let plan = plan(2, sharing);
        let values = irrational(&plan);
        let options = ExportOptions {
            dtype: ExportDtype::F64,
            ..ExportOptions::default()
        };
        let bytes = export_authors(&values, &plan, &options).unwrap();
        let dict = read_state_dict(&bytes, "export").unwrap();
        assert_eq!(dict.container, Container::Safetensors);
        // the conv is repeated per candidate, as the authors' module holds it
        assert!(dict
            .get("net.model.layer1.0.conv1.candidate_ops.1.0.weight")
            .is_some());
        assert_eq!(
            dict.get("net.model.fc.weight").unwrap().dtype(),
            TorchDtype::F64
        );
        assert_eq!(
            dict.get("net.model.fc.weight").unwrap().shape,
            plan.param("net.model.fc.weight").unwrap().shape
        );
        assert_eq!(
            dict.get("net.model.conv1.candidate_ops.1.1.num_batches_tracked")
                .unwrap()
                .dtype(),
            TorchDtype::I64
        );
        let back = import_state_dict(&dict, &plan, &ImportOptions::default()).unwrap();
        assert_eq!(back.values, values, "{sharing:?}");
        // float32 export rounds each value to float32 and nothing else
        let bytes = export_authors(&values, &plan, &ExportOptions::default()).unwrap();
        let dict = read_state_dict(&bytes, "export").unwrap();
        let back = import_state_dict(&dict, &plan, &ImportOptions::default()).unwrap();
        for (k, v) in &values {
            let rounded: Vec<f64> = v.iter().map(|&x| f64::from(x as f32)).collect();
            assert_eq!(back.values[k], rounded, "{k}");
        }
    }
}

#[test]
fn dverge_export_holds_one_path_under_dverge_names() {
    let rgn = plan(2, Sharing::SharedConv);
    let values = irrational(&rgn);
    let gates = [1, 0, 1, 1, 0, 0, 1];
    assert_eq!(gates.len(), rgn.k());
    let options = ExportOptions {
        dtype: ExportDtype::F64,
        dverge_names: DvergeNames::Module,
    };
    let bytes = export_dverge(&values, &rgn, &gates, &options).unwrap();
    let dict = read_state_dict(&bytes, "dverge").unwrap();
    let mut names: Vec<&str> = dict.entries.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut expected = vec![
        "conv1.weight".to_string(),
        "fc.weight".to_string(),
        "fc.bias".to_string(),
    ];
    let bn = [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ];
    expected.extend(bn.iter().map(|f| format!("bn1.{f}")));
    for s in 1..=3 {
        for k in 1..=2 {
            expected.push(format!("layer{s}.0.conv{k}.weight"));
            expected.extend(bn.iter().map(|f| format!("layer{s}.0.bn{k}.{f}")));
        }
        if s > 1 {
            expected.push(format!("layer{s}.0.downsample.0.weight"));
            expected.extend(bn.iter().map(|f| format!("layer{s}.0.downsample.1.{f}")));
        }
    }
    expected.sort_unstable();
    assert_eq!(names, expected);
    assert_eq!(dict.metadata["eio.gates"], "1,0,1,1,0,0,1");
    assert!(dict.metadata.contains_key("eio.normalizer.mean"));
    // layer1.0.conv2 is RGB 3 (gates[2] = 1): its BN is candidate 1's
    assert_eq!(
        dict.get("layer1.0.bn2.running_mean")
            .unwrap()
            .to_f64()
            .unwrap(),
        values["net.model.layer1.0.conv2.candidate_ops.1.1.running_mean"]
    );
    assert_eq!(
        dict.get("layer1.0.bn1.weight").unwrap().to_f64().unwrap(),
        values["net.model.layer1.0.conv1.candidate_ops.0.1.weight"]
    );
    // Re-import into a single-path (n = 1) plan: exactly the chosen candidates.
    let single = plan(1, Sharing::SharedConv);
    let back = import_state_dict(&dict, &single, &ImportOptions::default()).unwrap();
    assert_eq!(back.layout, SourceLayout::Dverge);
    // (the module names carry no normaliser tensors: it comes from the plan's config)
    assert_eq!(back.normalizer_source, NormalizerSource::Config);
    for p in single
        .params
        .iter()
        .filter(|p| !p.name.contains("normalizer"))
    {
        let source = match p.candidate {
            Some((g, _)) => p.name.replace(
                ".candidate_ops.0.",
                &format!(".candidate_ops.{}.", gates[g]),
            ),
            None => p.name.clone(),
        };
        assert_eq!(back.values[&p.name], values[&source], "{}", p.name);
    }
    // The wrapper names: model. prefix and the normaliser as tensors.
    let options = ExportOptions {
        dverge_names: DvergeNames::Wrapper,
        ..options
    };
    let bytes = export_dverge(&values, &rgn, &gates, &options).unwrap();
    let dict = read_state_dict(&bytes, "wrapper").unwrap();
    assert!(dict.get("model.layer3.0.downsample.1.bias").is_some());
    assert_eq!(
        dict.get("normalizer.std").unwrap().to_f64().unwrap(),
        values["net.normalizer.std"]
    );
    assert_eq!(dict.entries.len(), expected.len() + 2);
    let back = import_state_dict(&dict, &single, &ImportOptions::default()).unwrap();
    assert_eq!(
        back.values["net.normalizer.std"],
        values["net.normalizer.std"]
    );
}

#[test]
fn export_rejects_bad_paths_and_missing_values() {
    let rgn = plan(2, Sharing::Independent);
    let mut values = irrational(&rgn);
    let options = ExportOptions::default();
    let err = export_dverge(&values, &rgn, &[0, 1], &options).unwrap_err();
    assert!(
        matches!(err, InteropError::BadPath { k: 7, n: 2, .. }),
        "{err}"
    );
    let err = export_dverge(&values, &rgn, &[0, 1, 2, 0, 0, 0, 0], &options).unwrap_err();
    assert!(matches!(err, InteropError::BadPath { .. }), "{err}");
    values.remove("net.model.fc.bias");
    let err = export_authors(&values, &rgn, &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("net.model.fc.bias") && err.contains("missing"),
        "{err}"
    );
    values.insert("net.model.fc.bias".into(), vec![0.0; 3]);
    let err = export_dverge(&values, &rgn, &[0; 7], &options)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 values"), "{err}");
}

#[test]
fn released_checkpoint_round_trips_through_float32_exports() {
    let path = match common::official_checkpoint() {
        Ok(p) => p,
        Err(reason) => {
            return common::skip(
                "released_checkpoint_round_trips_through_float32_exports",
                &reason,
            )
        }
    };
    let plan = eio_spec::Preset::Official.config().unwrap().plan().unwrap();
    let dict = read_state_dict_file(&path).unwrap();
    let imported = import_state_dict(&dict, &plan, &ImportOptions::default()).unwrap();
    let bytes = export_authors(&imported.values, &plan, &ExportOptions::default()).unwrap();
    let again = read_state_dict(&bytes, "export").unwrap();
    assert_eq!(again.entries.len(), 244);
    for (name, t) in &dict.entries {
        let e = again.get(name).unwrap();
        assert_eq!(e.shape, t.shape, "{name}");
        assert_eq!(e.dtype(), t.dtype(), "{name}");
        assert_eq!(e.to_f64().unwrap(), t.to_f64().unwrap(), "{name}");
    }
    let back = import_state_dict(&again, &plan, &ImportOptions::default()).unwrap();
    assert_eq!(back.values, imported.values);
    let gates = [0usize; 19];
    let bytes = export_dverge(&imported.values, &plan, &gates, &ExportOptions::default()).unwrap();
    let single = read_state_dict(&bytes, "dverge").unwrap();
    assert_eq!(single.entries.len(), 19 + 19 * 5 + 2 * 6 + 2);
}

/// Writes the released checkpoint's exports when EIO_WRITE_EXPORTS names a folder (for a
/// by-hand check that Python's safetensors loads them; not part of CI).
#[test]
fn write_exports_on_request() {
    let Some(dir) = std::env::var_os("EIO_WRITE_EXPORTS") else {
        return;
    };
    let Ok(path) = common::official_checkpoint() else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let plan = eio_spec::Preset::Official.config().unwrap().plan().unwrap();
    let dict = read_state_dict_file(&path).unwrap();
    let values = import_state_dict(&dict, &plan, &ImportOptions::default())
        .unwrap()
        .values;
    let o = ExportOptions::default();
    std::fs::write(
        dir.join("authors.safetensors"),
        export_authors(&values, &plan, &o).unwrap(),
    )
    .unwrap();
    let gates: Vec<usize> = "0111001100100100110"
        .bytes()
        .map(|b| usize::from(b - b'0'))
        .collect();
    std::fs::write(
        dir.join("dverge-module.safetensors"),
        export_dverge(&values, &plan, &gates, &o).unwrap(),
    )
    .unwrap();
    let w = ExportOptions {
        dverge_names: DvergeNames::Wrapper,
        ..o
    };
    std::fs::write(
        dir.join("dverge-wrapper.safetensors"),
        export_dverge(&values, &plan, &gates, &w).unwrap(),
    )
    .unwrap();
}

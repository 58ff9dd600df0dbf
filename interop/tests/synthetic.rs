//! Checkpoints written byte by byte (tests/common): both containers, nesting, dtypes, strided
//! views, malformed files, and every import check (shapes, missing/unexpected keys, shared conv
//! copies, normaliser, key layouts).

mod common;

use common::{authors_checkpoint, dverge_checkpoint, tiny_model, Checkpoint, Nesting, Ty};
use eio_interop::torch::{check_bytes, Container, TorchDtype};
use eio_interop::{
    import_state_dict, read_state_dict, ImportOptions, InteropError, NormalizerPolicy,
    NormalizerSource, SourceLayout,
};
use eio_spec::config::Sharing;
use eio_spec::plan::Plan;

fn plan(n: usize, sharing: Sharing) -> Plan {
    Plan::build(&tiny_model(n, sharing)).unwrap()
}

fn import(bytes: &[u8], plan: &Plan) -> Result<eio_interop::Imported, InteropError> {
    let dict = read_state_dict(bytes, "test")?;
    import_state_dict(&dict, plan, &ImportOptions::default())
}

fn mismatch(err: InteropError) -> (Vec<String>, Vec<String>, Vec<eio_interop::ShapeMismatch>) {
    match err {
        InteropError::Mismatch(m) => (m.missing, m.unexpected, m.shapes),
        other => panic!("expected a key mismatch, got {other}"),
    }
}

#[test]
fn both_containers_and_every_nesting_read_the_same_tensors() {
    let plan = plan(2, Sharing::SharedConv);
    let ck = authors_checkpoint(&plan);
    for nesting in [Nesting::Top, Nesting::StateDict, Nesting::Model] {
        for (bytes, container) in [
            (ck.legacy(nesting), Container::Legacy),
            (ck.zip(nesting), Container::Zip),
        ] {
            let dict = read_state_dict(&bytes, "test").unwrap();
            assert_eq!(dict.container, container);
            let expected_nesting = match nesting {
                Nesting::Top => None,
                Nesting::StateDict => Some("state_dict"),
                Nesting::Model => Some("model"),
            };
            assert_eq!(dict.nesting.as_deref(), expected_nesting);
            assert_eq!(dict.entries.len(), ck.entries.len());
            // shared-conv aliases: one storage per gated conv
            assert_eq!(dict.shared_storages().len(), plan.k());
            assert_eq!(dict.storage_count(), ck.storages.len());
            for (e, (name, t)) in ck.entries.iter().zip(&dict.entries) {
                assert_eq!(&e.name, name);
                assert_eq!(e.shape, t.shape);
                let s = ck.storages.iter().find(|s| s.key == e.storage).unwrap();
                let want: Vec<f64> = match s.ty {
                    Ty::F32 => s.values.iter().map(|&v| f64::from(v as f32)).collect(),
                    _ => s.values.clone(),
                };
                assert_eq!(t.to_f64().unwrap(), want, "{name}");
                assert_eq!(t.storage.location, "cuda:0");
            }
            let imported = import_state_dict(&dict, &plan, &ImportOptions::default()).unwrap();
            assert_eq!(imported.values.len(), plan.params.len());
            assert_eq!(imported.layout, SourceLayout::Authors);
            assert_eq!(imported.normalizer_source, NormalizerSource::File);
            assert_eq!(check_bytes(&bytes).unwrap(), ck.entries.len());
        }
    }
}

#[test]
fn float64_int64_half_and_strided_views() {
    let mut ck = Checkpoint::default();
    ck.add("a", Ty::F64, &[2, 3], vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
    ck.add("n", Ty::I64, &[], vec![123_456_789.0]);
    ck.add("h", Ty::F16, &[3], vec![1.0, -2.0, 0.5]);
    // a transposed view of a's storage: shape [3, 2], stride [1, 3]
    ck.alias("a_t", "a");
    let e = ck.entries.last_mut().unwrap();
    e.shape = vec![3, 2];
    e.stride = Some(vec![1, 3]);
    // a view with an offset: the last row
    ck.alias("a_row1", "a");
    let e = ck.entries.last_mut().unwrap();
    e.shape = vec![3];
    e.offset = 3;
    for bytes in [ck.legacy(Nesting::Top), ck.zip(Nesting::Top)] {
        let d = read_state_dict(&bytes, "test").unwrap();
        assert_eq!(d.get("a").unwrap().dtype(), TorchDtype::F64);
        assert_eq!(d.get("n").unwrap().dtype(), TorchDtype::I64);
        assert_eq!(d.get("h").unwrap().dtype(), TorchDtype::F16);
        assert_eq!(d.get("n").unwrap().to_f64().unwrap(), vec![123_456_789.0]);
        assert_eq!(d.get("h").unwrap().to_f64().unwrap(), vec![1.0, -2.0, 0.5]);
        assert_eq!(
            d.get("a_t").unwrap().to_f64().unwrap(),
            vec![0.1, 0.4, 0.2, 0.5, 0.3, 0.6]
        );
        assert_eq!(
            d.get("a_row1").unwrap().to_f64().unwrap(),
            vec![0.4, 0.5, 0.6]
        );
    }
}

#[test]
fn parameters_and_the_rank_limit() {
    let plan = plan(2, Sharing::SharedConv);
    let mut ck = authors_checkpoint(&plan);
    let plain = import(&ck.legacy(Nesting::Top), &plan).unwrap();
    ck.parameters = true;
    for bytes in [ck.legacy(Nesting::Top), ck.zip(Nesting::StateDict)] {
        assert_eq!(import(&bytes, &plan).unwrap().values, plain.values);
    }
    let mut ck = Checkpoint::default();
    ck.add("deep", Ty::F32, &[1; 65], vec![1.0]);
    let err = read_state_dict(&ck.legacy(Nesting::Top), "t")
        .unwrap_err()
        .to_string();
    assert!(err.contains("65 dimensions"), "{err}");
    let mut ck = Checkpoint::default();
    ck.add("ok", Ty::F32, &[1; 64], vec![2.0]);
    let d = read_state_dict(&ck.zip(Nesting::Top), "t").unwrap();
    assert_eq!(d.get("ok").unwrap().to_f64().unwrap(), vec![2.0]);
}

#[test]
fn a_view_outside_its_storage_is_an_error() {
    let mut ck = Checkpoint::default();
    ck.add("a", Ty::F32, &[4], vec![1.0; 4]);
    ck.entries[0].offset = 2;
    for bytes in [ck.legacy(Nesting::Top), ck.zip(Nesting::Top)] {
        let err = read_state_dict(&bytes, "test").unwrap_err().to_string();
        assert!(
            err.contains("\"a\"") && err.contains("reaches element 5"),
            "{err}"
        );
    }
}

#[test]
fn truncated_files_are_errors_at_every_length() {
    let plan = plan(1, Sharing::SharedConv);
    let ck = authors_checkpoint(&plan);
    for bytes in [ck.legacy(Nesting::StateDict), ck.zip(Nesting::StateDict)] {
        let step = (bytes.len() / 300).max(1);
        for len in (0..bytes.len()).step_by(step) {
            assert!(
                read_state_dict(&bytes[..len], "test").is_err(),
                "a file cut to {len} of {} bytes was accepted",
                bytes.len()
            );
        }
    }
    // Cut inside the last storage's data: a truncation error that says so.
    let legacy = ck.legacy(Nesting::Top);
    let err = read_state_dict(&legacy[..legacy.len() - 3], "cut.pth").unwrap_err();
    assert!(matches!(err, InteropError::Truncated { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with("cut.pth: truncated: data of storage"),
        "{text}"
    );
}

#[test]
fn corrupted_magic_and_foreign_files_are_rejected() {
    let plan = plan(1, Sharing::SharedConv);
    let mut legacy = authors_checkpoint(&plan).legacy(Nesting::Top);
    legacy[6] ^= 0x01;
    let err = read_state_dict(&legacy, "bad.pth").unwrap_err().to_string();
    assert!(err.contains("bad magic number"), "{err}");
    let err = read_state_dict(b"hello world, not a checkpoint", "t.txt").unwrap_err();
    assert!(matches!(err, InteropError::NotACheckpoint { .. }), "{err}");
    let mut zip = authors_checkpoint(&plan).zip(Nesting::Top);
    let n = zip.len();
    zip[n - 6..n - 2].copy_from_slice(&[0xff; 4]); // central directory offset
    assert!(read_state_dict(&zip, "bad.zip").is_err());
    // A zip that is not a PyTorch archive.
    let other = common::zip_stored(&[("readme.txt".into(), b"hi".to_vec())]);
    let err = read_state_dict(&other, "other.zip")
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.pkl"), "{err}");
}

#[test]
fn wrong_architecture_names_the_key_and_both_shapes() {
    let file_plan = plan(2, Sharing::SharedConv); // width 0.25: stem has 4 channels
    let bytes = authors_checkpoint(&file_plan).legacy(Nesting::StateDict);
    let mut wide = tiny_model(2, Sharing::SharedConv);
    wide.width = 0.5;
    let wide = Plan::build(&wide).unwrap();
    let err = import(&bytes, &wide).unwrap_err();
    let text = err.to_string();
    let (missing, unexpected, shapes) = mismatch(err);
    assert!(missing.is_empty() && unexpected.is_empty());
    let stem = shapes
        .iter()
        .find(|s| s.key == "net.model.conv1.candidate_ops.0.0.weight")
        .expect("stem conv reported");
    assert_eq!(stem.file, vec![4, 3, 3, 3]);
    assert_eq!(stem.plan, vec![8, 3, 3, 3]);
    assert!(
        text.contains("net.model.conv1.candidate_ops.0.0.weight is [4, 3, 3, 3] in the file")
            && text.contains("[8, 3, 3, 3]"),
        "{text}"
    );
}

#[test]
fn every_missing_and_unexpected_key_is_reported_at_once() {
    let plan = plan(2, Sharing::SharedConv);
    let mut ck = authors_checkpoint(&plan);
    ck.remove("net.model.fc.bias");
    ck.remove("net.model.layer1.0.conv2.candidate_ops.1.1.running_var");
    ck.add("net.model.extra.weight", Ty::F32, &[2], vec![1.0, 2.0]);
    ck.add("net.model.fc.weight_orig", Ty::F32, &[1], vec![1.0]);
    let err = import(&ck.zip(Nesting::Model), &plan).unwrap_err();
    let text = err.to_string();
    let (missing, unexpected, shapes) = mismatch(err);
    assert_eq!(
        missing,
        vec![
            "net.model.layer1.0.conv2.candidate_ops.1.1.running_var".to_string(),
            "net.model.fc.bias".to_string()
        ]
    );
    assert_eq!(
        unexpected,
        vec![
            "net.model.extra.weight".to_string(),
            "net.model.fc.weight_orig".to_string()
        ]
    );
    assert!(shapes.is_empty());
    for name in missing.iter().chain(&unexpected) {
        assert!(text.contains(name.as_str()), "{text}");
    }
}

#[test]
fn a_different_candidate_count_reports_the_extra_or_missing_candidates() {
    let two = plan(2, Sharing::SharedConv);
    let bytes = authors_checkpoint(&two).legacy(Nesting::Top);
    let three = plan(3, Sharing::SharedConv);
    let (missing, unexpected, _) = mismatch(import(&bytes, &three).unwrap_err());
    assert!(unexpected.is_empty());
    // per RGB: conv copy 2 and its 5 BN tensors
    assert_eq!(missing.len(), three.k() * 6);
    assert!(missing.iter().all(|m| m.contains(".candidate_ops.2.")));
    let one = plan(1, Sharing::SharedConv);
    let (missing, unexpected, _) = mismatch(import(&bytes, &one).unwrap_err());
    assert!(missing.is_empty());
    assert_eq!(unexpected.len(), one.k() * 6);
}

#[test]
fn shared_conv_copies_must_be_identical_for_shared_conv_and_are_kept_for_independent() {
    let shared = plan(2, Sharing::SharedConv);
    let mut ck = authors_checkpoint(&shared);
    let name = "net.model.layer2.0.conv1.candidate_ops.1.0.weight";
    let first = "net.model.layer2.0.conv1.candidate_ops.0.0.weight";
    ck.remove(name);
    let mut values = ck.values_mut(first).clone();
    let shape = ck
        .entries
        .iter()
        .find(|e| e.name == first)
        .unwrap()
        .shape
        .clone();
    values[5] += 0.25;
    ck.add(name, Ty::F32, &shape, values);
    let bytes = ck.legacy(Nesting::StateDict);
    match import(&bytes, &shared).unwrap_err() {
        InteropError::SharedConvDiffers {
            first: f,
            other,
            max_abs_diff,
            index,
        } => {
            assert_eq!(f, first);
            assert_eq!(other, name);
            assert_eq!(index, 5);
            assert!((max_abs_diff - 0.25).abs() < 1e-6);
        }
        other => panic!("expected SharedConvDiffers, got {other}"),
    }
    let independent = plan(2, Sharing::Independent);
    let imported = import(&bytes, &independent).unwrap();
    assert_ne!(imported.values[first], imported.values[name]);
    assert_eq!(
        imported.values[name][5] - imported.values[first][5],
        0.25,
        "both copies kept as they are"
    );
}

#[test]
fn data_parallel_and_missing_net_prefixes_and_gate_parameters() {
    let plan = plan(2, Sharing::SharedConv);
    let reference = import(&authors_checkpoint(&plan).legacy(Nesting::Top), &plan).unwrap();
    let mut ck = authors_checkpoint(&plan);
    ck.rename(|n| format!("module.{}", n.trim_start_matches("net.")));
    ck.add(
        "module.model.conv1.AP_path_alpha",
        Ty::F32,
        &[2],
        vec![0.0, 0.0],
    );
    ck.add(
        "module.model.conv1.AP_path_wb",
        Ty::F32,
        &[2],
        vec![1.0, 0.0],
    );
    let imported = import(&ck.zip(Nesting::StateDict), &plan).unwrap();
    assert_eq!(imported.values, reference.values);
    assert_eq!(
        imported.ignored,
        vec![
            "module.model.conv1.AP_path_alpha".to_string(),
            "module.model.conv1.AP_path_wb".to_string()
        ]
    );
}

#[test]
fn the_normaliser_is_checked_or_taken_from_the_file() {
    let plan = plan(2, Sharing::SharedConv);
    let mut ck = authors_checkpoint(&plan);
    *ck.values_mut("net.normalizer.std") = vec![0.2470, 0.2435, 0.2616];
    let dict = read_state_dict(&ck.legacy(Nesting::StateDict), "test").unwrap();
    let err = import_state_dict(&dict, &plan, &ImportOptions::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, InteropError::NormalizerMismatch { .. }),
        "{text}"
    );
    assert!(
        text.contains("0.24699") && text.contains("0.2023"),
        "{text}"
    );
    let options = ImportOptions {
        normalizer: NormalizerPolicy::FromFile,
        ..ImportOptions::default()
    };
    let imported = import_state_dict(&dict, &plan, &options).unwrap();
    let f = |v: f64| f64::from(v as f32);
    assert_eq!(
        imported.normalizer.std,
        vec![f(0.2470), f(0.2435), f(0.2616)]
    );
    assert_eq!(
        imported.values["net.normalizer.std"],
        imported.normalizer.std
    );
}

#[test]
fn dverge_resnet_initialises_every_candidate() {
    let (ck, single) = dverge_checkpoint(false);
    let names: Vec<&str> = ck.entries.iter().map(|e| e.name.as_str()).collect();
    assert!(names.contains(&"conv1.weight") && names.contains(&"bn1.running_mean"));
    assert!(names.contains(&"layer2.0.bn2.num_batches_tracked"));
    assert!(names.contains(&"layer2.0.downsample.0.weight") && names.contains(&"fc.bias"));
    let bytes = ck.legacy(Nesting::Top);
    let one = import(&authors_checkpoint(&single).legacy(Nesting::Top), &single).unwrap();
    for sharing in [Sharing::SharedConv, Sharing::Independent] {
        let target = plan(2, sharing);
        let imported = import(&bytes, &target).unwrap();
        assert_eq!(imported.layout, SourceLayout::Dverge);
        assert_eq!(imported.normalizer_source, NormalizerSource::Config);
        assert_eq!(
            imported.values["net.normalizer.mean"],
            vec![0.4914, 0.4822, 0.4465]
        );
        for p in target
            .params
            .iter()
            .filter(|p| !p.name.contains("normalizer"))
        {
            let source = p.name.replace(".candidate_ops.1.", ".candidate_ops.0.");
            assert_eq!(imported.values[&p.name], one.values[&source], "{}", p.name);
        }
    }
    // DVERGE's ModelWrapper keys, in a {'model_0': ...} file.
    let (ck, _) = dverge_checkpoint(true);
    let names: Vec<&str> = ck.entries.iter().map(|e| e.name.as_str()).collect();
    assert!(names.contains(&"model.conv1.weight") && names.contains(&"normalizer.mean"));
    let imported = import(&ck.zip(Nesting::Top), &plan(2, Sharing::SharedConv)).unwrap();
    assert_eq!(imported.normalizer_source, NormalizerSource::File);
}

#[test]
fn dverge_layout_with_a_missing_bn_is_reported_by_dverge_name() {
    let (mut ck, _) = dverge_checkpoint(false);
    ck.remove("layer1.0.bn2.running_var");
    let (missing, unexpected, _) =
        mismatch(import(&ck.legacy(Nesting::Top), &plan(2, Sharing::SharedConv)).unwrap_err());
    assert_eq!(missing, vec!["layer1.0.bn2.running_var".to_string()]);
    assert!(unexpected.is_empty());
}

/// Writes the fuzz seed corpus when EIO_WRITE_FUZZ_SEEDS names a folder.
#[test]
fn write_fuzz_seeds_on_request() {
    let Some(dir) = std::env::var_os("EIO_WRITE_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ck = Checkpoint::default();
    ck.add("w", Ty::F32, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]);
    ck.alias("w2", "w");
    ck.add("n", Ty::I64, &[], vec![7.0]);
    ck.add("d", Ty::F64, &[1], vec![0.5]);
    std::fs::write(dir.join("seed-legacy-top"), ck.legacy(Nesting::Top)).unwrap();
    std::fs::write(
        dir.join("seed-legacy-nested"),
        ck.legacy(Nesting::StateDict),
    )
    .unwrap();
    std::fs::write(dir.join("seed-zip-top"), ck.zip(Nesting::Top)).unwrap();
    std::fs::write(dir.join("seed-zip-model"), ck.zip(Nesting::Model)).unwrap();
    // DVERGE's ensemble file: model_0 and model_1 sharing the storage of "w".
    let mut other = ck.clone();
    other.storages.retain(|s| s.key == ck.entries[0].storage);
    other.entries.retain(|e| e.storage == ck.entries[0].storage);
    let ensemble = common::Ensemble::of(vec![ck.clone(), other]);
    assert_eq!(check_bytes(&ensemble.legacy()).unwrap(), 4 + 2);
    std::fs::write(dir.join("seed-legacy-ensemble"), ensemble.legacy()).unwrap();
    std::fs::write(dir.join("seed-zip-ensemble"), ensemble.zip()).unwrap();
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend(header);
    st.extend(1.5f32.to_le_bytes());
    st.extend((-2.0f32).to_le_bytes());
    assert_eq!(check_bytes(&st).unwrap(), 1);
    std::fs::write(dir.join("seed-safetensors"), st).unwrap();
}

/// The fuzz target's check (`check_bytes`) as a seeded smoke test: mutated legacy, zip (also
/// DVERGE ensemble files) and safetensors files give results or errors, never panics.
#[test]
fn seeded_mutations_are_errors_not_panics() {
    let plan = plan(1, Sharing::SharedConv);
    let ck = authors_checkpoint(&plan);
    let mut seeds = vec![ck.legacy(Nesting::StateDict), ck.zip(Nesting::Model)];
    let ensemble = common::Ensemble::of(vec![ck.clone(), ck.clone()]);
    seeds.extend([ensemble.legacy(), ensemble.zip()]);
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend(header);
    st.extend([0u8; 8]);
    seeds.push(st);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for seed in &seeds {
        for _ in 0..700 {
            let mut bytes = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                match next() % 4 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes[at] = next() as u8,
                    2 => bytes.insert(at, next() as u8),
                    _ => bytes.truncate(at.max(1)),
                }
            }
            if check_bytes(&bytes).is_ok() {
                accepted += 1;
            }
        }
    }
    // Some mutations land in tensor data and still parse.
    assert!(accepted > 0);
}

/// PyTorch's `load_state_dict` loads a 1-element, 1-dimensional tensor into a 0-dimensional
/// parameter or buffer (its "loading 1-dim tensor from 0.3.*" rule), which is how safetensors
/// conversions store `num_batches_tracked`; the importer accepts the same, and nothing else.
#[test]
fn a_counter_stored_with_shape_one_loads_as_pytorch_loads_it() {
    let p = plan(2, Sharing::SharedConv);
    let counter = p
        .params
        .iter()
        .find(|s| s.name.ends_with("num_batches_tracked"))
        .expect("a BatchNorm counter")
        .name
        .clone();
    let mut ck = authors_checkpoint(&p);
    ck.remove(&counter);
    ck.add(&counter, Ty::I64, &[1], vec![531_500.0]);
    let imported = import(&ck.legacy(Nesting::StateDict), &p).expect("[1] loads into []");
    assert_eq!(imported.values[&counter], vec![531_500.0]);

    let mut two = authors_checkpoint(&p);
    two.remove(&counter);
    two.add(&counter, Ty::I64, &[2], vec![1.0, 2.0]);
    let (_, _, shapes) = mismatch(import(&two.legacy(Nesting::StateDict), &p).unwrap_err());
    assert_eq!(shapes.len(), 1, "{shapes:?}");
    assert_eq!(
        (shapes[0].file.clone(), shapes[0].plan.clone()),
        (vec![2], vec![])
    );
}

//! The safetensors form of `ModelState`: exact round trips in memory and through files, and
//! errors that name what is wrong (the tensor, the plan, both shapes, the file).

#[path = "common/tiny.rs"]
mod tiny;

use std::path::PathBuf;

use eio_reference::state::{ModelState, StateError};
use eio_spec::config::{Activation, Sharing};
use eio_spec::plan::Plan;
use safetensors::tensor::{Dtype, TensorView};

/// A perturbed state with awkward values: -0.0, a subnormal, the largest finite f64, and
/// extreme counters.
fn awkward_state(plan: &Plan, seed: u64) -> ModelState {
    let mut state = tiny::perturbed_state(plan, seed);
    let specials = [-0.0, 5e-324, f64::MAX, -1e300, f64::MIN_POSITIVE, 1.0 / 3.0];
    for (i, t) in state.tensors.values_mut().enumerate() {
        if let Some(v) = t.iter_mut().next() {
            *v = specials[i % specials.len()];
        }
    }
    let extremes = [i64::MAX, 0, 1, i64::MIN, 123_456_789_012];
    for (i, c) in state.counters.values_mut().enumerate() {
        *c = extremes[i % extremes.len()];
    }
    state
}

fn assert_identical(what: &str, a: &ModelState, b: &ModelState) {
    let changed = tiny::changed(a, b);
    assert!(changed.is_empty(), "{what}: differs in {changed:?}");
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    assert_eq!(a.counters, b.counters, "{what}: counters");
}

/// A fresh directory under the system temp dir, unique to this process and test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "eio-reference-state-io-{}-{test}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn safetensors_round_trip_preserves_every_tensor_and_counter() {
    for (i, model) in [
        tiny::tiny(Sharing::Independent),
        tiny::tiny(Sharing::SharedConv),
        tiny::resnet8(1, Sharing::Independent, Activation::LeakyRelu, 1, 3),
        tiny::tiny_vgg(2, Sharing::Independent, 10),
    ]
    .iter()
    .enumerate()
    {
        let plan = tiny::plan(model);
        let state = awkward_state(&plan, 200 + i as u64);
        assert_eq!(
            state.tensors.len() + state.counters.len(),
            plan.params.len(),
            "one entry per plan tensor"
        );
        let bytes = state.to_safetensors();
        let back = ModelState::from_safetensors(&plan, &bytes, "memory").unwrap();
        assert_identical(&plan.name, &state, &back);
        // Serialisation is deterministic: the same state gives the same bytes.
        assert_eq!(back.to_safetensors(), bytes, "{}: bytes differ", plan.name);
        // Counters are int64 scalars, everything else f64 in the plan's shapes.
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for spec in &plan.params {
            let view = file.tensor(&spec.name).unwrap();
            assert_eq!(view.shape(), spec.shape.as_slice(), "{}", spec.name);
            let dtype = if spec.role == eio_spec::plan::Role::Counter {
                Dtype::I64
            } else {
                Dtype::F64
            };
            assert_eq!(view.dtype(), dtype, "{}", spec.name);
        }
    }
}

#[test]
fn save_and_load_through_a_file() {
    let dir = TempDir::new("save-load");
    let plan = tiny::plan(&tiny::tiny(Sharing::SharedConv));
    let path = dir.0.join("model.safetensors");
    let first = awkward_state(&plan, 210);
    first.save(&path).unwrap();
    let loaded = ModelState::load(&plan, &path).unwrap();
    assert_identical("first save", &first, &loaded);
    // Saving again replaces the file; no temporary file is left beside it.
    let second = tiny::perturbed_state(&plan, 211);
    second.save(&path).unwrap();
    let loaded = ModelState::load(&plan, &path).unwrap();
    assert_identical("second save", &second, &loaded);
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["model.safetensors".to_string()]);
    // A file that does not exist is a read error naming it.
    let missing = dir.0.join("absent.safetensors");
    let err = ModelState::load(&plan, &missing).unwrap_err();
    assert!(matches!(err, StateError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
    // Saving into a folder that does not exist is a write error naming the path.
    let nowhere = dir.0.join("no-such-folder").join("model.safetensors");
    let err = first.save(&nowhere).unwrap_err();
    assert!(matches!(err, StateError::Write { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&nowhere.display().to_string()),
        "{err}"
    );
}

#[test]
fn loading_for_a_different_plan_names_the_tensor() {
    let independent = tiny::plan(&tiny::tiny(Sharing::Independent));
    let shared = tiny::plan(&tiny::tiny(Sharing::SharedConv));
    let single = tiny::plan(&tiny::resnet8(
        1,
        Sharing::Independent,
        Activation::Relu,
        3,
        4,
    ));
    let bytes_of = |plan: &Plan| tiny::perturbed_state(plan, 220).to_safetensors();

    // Extra tensors: the second candidates' convs have no place in a shared-conv plan, and
    // no second candidate has a place in an n = 1 plan.
    for (from, to, origin) in [
        (&independent, &shared, "independent.safetensors"),
        (&independent, &single, "n2.safetensors"),
    ] {
        let err = ModelState::from_safetensors(to, &bytes_of(from), origin).unwrap_err();
        let StateError::Unexpected { name, plan, .. } = &err else {
            panic!("expected an unexpected-tensor error, got {err:?}");
        };
        assert!(
            to.param(name).is_none() && from.param(name).is_some(),
            "{name}"
        );
        assert!(name.contains(".candidate_ops.1."), "{name}");
        assert_eq!(plan, &to.name);
        let message = err.to_string();
        assert!(
            message.contains(name.as_str()) && message.contains(origin),
            "{message}"
        );
    }

    // Missing tensors: the first one in plan order is named.
    for (from, to, expected) in [
        (
            &shared,
            &independent,
            "net.model.conv1.candidate_ops.1.0.weight",
        ),
        (
            &single,
            &independent,
            "net.model.conv1.candidate_ops.1.0.weight",
        ),
        (&single, &shared, "net.model.conv1.candidate_ops.1.1.weight"),
    ] {
        let err =
            ModelState::from_safetensors(to, &bytes_of(from), "small.safetensors").unwrap_err();
        let StateError::Missing { name, plan, .. } = &err else {
            panic!("expected a missing-tensor error, got {err:?}");
        };
        assert_eq!(name, expected);
        assert_eq!(plan, "resnet8");
        let message = err.to_string();
        assert!(
            message.contains(expected) && message.contains("small.safetensors"),
            "{message}"
        );
    }
}

#[test]
fn a_truncated_file_is_a_format_error() {
    let plan = tiny::plan(&tiny::tiny(Sharing::Independent));
    let bytes = tiny::perturbed_state(&plan, 230).to_safetensors();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in [
        0,
        4,
        8,
        8 + header / 2,
        8 + header,
        (8 + header + bytes.len()) / 2,
        bytes.len() - 1,
    ] {
        let err =
            ModelState::from_safetensors(&plan, &bytes[..cut], "cut.safetensors").unwrap_err();
        assert!(
            matches!(err, StateError::Format { .. }),
            "cut at {cut} of {}: {err:?}",
            bytes.len()
        );
        assert!(err.to_string().contains("cut.safetensors"), "{err}");
    }
    // The same through a file: the error names the file.
    let dir = TempDir::new("truncated");
    let path = dir.0.join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = ModelState::load(&plan, &path).unwrap_err();
    assert!(matches!(err, StateError::Format { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_shape_mismatch_names_the_tensor_and_both_shapes() {
    // Three classes saved, four expected: the classifier's weight is the first tensor (in
    // plan order) whose shape differs.
    let three = tiny::plan(&tiny::resnet8(
        2,
        Sharing::Independent,
        Activation::Relu,
        3,
        3,
    ));
    let four = tiny::plan(&tiny::resnet8(
        2,
        Sharing::Independent,
        Activation::Relu,
        3,
        4,
    ));
    let bytes = tiny::perturbed_state(&three, 240).to_safetensors();
    let err = ModelState::from_safetensors(&four, &bytes, "three.safetensors").unwrap_err();
    let StateError::Shape {
        name,
        got,
        expected,
        ..
    } = &err
    else {
        panic!("expected a shape error, got {err:?}");
    };
    assert_eq!(name, "net.model.fc.weight");
    assert_eq!(got, &vec![3, 16]);
    assert_eq!(expected, &vec![4, 16]);
    let message = err.to_string();
    for part in [
        "net.model.fc.weight",
        "[3, 16]",
        "[4, 16]",
        "three.safetensors",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
}

#[test]
fn a_wrong_dtype_names_the_tensor() {
    // A counter stored as f64 and, separately, a weight stored as f32.
    let plan = tiny::plan(&tiny::tiny(Sharing::SharedConv));
    let state = tiny::perturbed_state(&plan, 250);
    let bytes = state.to_safetensors();
    let counter = "net.model.conv1.candidate_ops.0.1.num_batches_tracked";
    let weight = "net.model.fc.weight";
    for (victim, dtype, expected) in [(counter, Dtype::F64, "I64"), (weight, Dtype::F32, "F64")] {
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut buffers: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
        for (name, view) in file.tensors() {
            if name == victim {
                let data: Vec<u8> = match dtype {
                    Dtype::F32 => state
                        .tensor(&name)
                        .iter()
                        .flat_map(|&v| (v as f32).to_le_bytes())
                        .collect(),
                    _ => (state.counters[&name] as f64).to_le_bytes().to_vec(),
                };
                buffers.push((name, view.shape().to_vec(), dtype, data));
            } else {
                buffers.push((
                    name,
                    view.shape().to_vec(),
                    view.dtype(),
                    view.data().to_vec(),
                ));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let forged = safetensors::serialize(views, None).unwrap();
        let err = ModelState::from_safetensors(&plan, &forged, "forged.safetensors").unwrap_err();
        let StateError::Dtype {
            name,
            got,
            expected: want,
            ..
        } = &err
        else {
            panic!("expected a dtype error, got {err:?}");
        };
        assert_eq!(name, victim);
        assert_eq!(*got, dtype);
        assert_eq!(*want, expected);
        assert!(err.to_string().contains(victim), "{err}");
    }
}

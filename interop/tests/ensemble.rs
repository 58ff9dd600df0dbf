//! DVERGE's ensemble files, `torch.save({'model_0': m0.state_dict(), 'model_1': ...})` (its
//! trainers' `save`), written byte by byte in both containers: every member read and imported
//! in index order with its own values, and the key errors (a gap, a model that is not a state
//! dict, a member that does not fit) named.

mod common;

use common::{dverge_key, dverge_member, stored_values, Checkpoint, Ensemble, Nesting};
use eio_interop::torch::Container;
use eio_interop::{
    import_members, import_state_dict, read_models, read_state_dict, ImportOptions, InteropError,
    NormalizerSource, SourceLayout,
};
use eio_spec::plan::Plan;

/// Both containers of `e`, with their names.
fn containers(e: &Ensemble) -> [(Vec<u8>, Container); 2] {
    [(e.legacy(), Container::Legacy), (e.zip(), Container::Zip)]
}

/// Checks that `imported` holds exactly member `m`'s source values for every plan tensor.
fn assert_member(
    imported: &eio_interop::Imported,
    plan: &Plan,
    source: &Checkpoint,
    wrapper: bool,
) {
    assert_eq!(imported.values.len(), plan.params.len());
    for p in &plan.params {
        let got = &imported.values[&p.name];
        match dverge_key(&p.name) {
            Some(k) => {
                let key = if wrapper { format!("model.{k}") } else { k };
                assert_eq!(got, &stored_values(source, &key), "{} <- {key}", p.name);
            }
            None if wrapper => {
                let key = p.name.trim_start_matches("net.");
                assert_eq!(got, &stored_values(source, key), "{}", p.name);
            }
            // no normaliser in a bare ResNet: the plan's (config's) values
            None => assert_eq!(imported.normalizer_source, NormalizerSource::Config),
        }
    }
}

#[test]
fn every_member_imports_in_index_order_with_its_own_values() {
    for wrapper in [false, true] {
        let members: Vec<Checkpoint> = (0..3).map(|m| dverge_member(wrapper, m)).collect();
        let (_, plan) = common::dverge_checkpoint(wrapper);
        // the members really differ
        let fc = if wrapper { "model.fc.bias" } else { "fc.bias" };
        assert_ne!(
            stored_values(&members[0], fc),
            stored_values(&members[1], fc)
        );
        let in_order = Ensemble::of(members.clone());
        // the same models written model_2, model_0, model_1, with an epoch entry
        let mut shuffled = in_order.clone();
        shuffled.models.rotate_right(1);
        shuffled.extra.push(("epoch".into(), 200));
        for file in [&in_order, &shuffled] {
            for (bytes, container) in containers(file) {
                let dicts = read_models(&bytes, "epoch_200.pth").unwrap();
                assert_eq!(dicts.len(), 3);
                for (m, dict) in dicts.iter().enumerate() {
                    assert_eq!(dict.container, container);
                    assert_eq!(dict.nesting, Some(format!("model_{m}")));
                    assert_eq!(dict.entries.len(), members[m].entries.len());
                }
                if wrapper {
                    // one normaliser storage, shared by every member
                    let key = |d: &eio_interop::StateDict| {
                        d.get("normalizer.mean").unwrap().storage.key.clone()
                    };
                    assert!(dicts.iter().all(|d| key(d) == key(&dicts[0])));
                }
                let imported = import_members(&dicts, &plan, &ImportOptions::default()).unwrap();
                assert_eq!(imported.len(), 3);
                for (m, one) in imported.iter().enumerate() {
                    assert_eq!(one.layout, SourceLayout::Dverge);
                    assert_member(one, &plan, &members[m], wrapper);
                }
                // exactly what each member imports to on its own
                for (m, one) in imported.iter().enumerate() {
                    let alone = read_state_dict(&members[m].legacy(Nesting::Top), "alone").unwrap();
                    let alone = import_state_dict(&alone, &plan, &ImportOptions::default());
                    assert_eq!(one.values, alone.unwrap().values, "member {m}");
                }
                assert_eq!(
                    eio_interop::torch::check_bytes(&bytes).unwrap(),
                    members.iter().map(|m| m.entries.len()).sum::<usize>()
                );
                // read_state_dict wants one model and says what the file is
                let err = read_state_dict(&bytes, "epoch_200.pth")
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.starts_with("epoch_200.pth: ")
                        && err.contains("3 models")
                        && err.contains("read_models"),
                    "{err}"
                );
            }
        }
    }
}

#[test]
fn a_gap_in_the_model_keys_names_the_missing_key() {
    let mut e = Ensemble::of(vec![dverge_member(true, 0), dverge_member(true, 2)]);
    e.models[1].0 = "model_2".into();
    for (bytes, _) in containers(&e) {
        let err = read_models(&bytes, "gap.pth").unwrap_err();
        assert!(matches!(err, InteropError::Format { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.starts_with("gap.pth: ")
                && text.contains("(model_0, model_2) but no model_1")
                && text.contains("model_0 to model_1"),
            "{text}"
        );
    }
    // an ensemble that does not start at model_0
    let mut e = Ensemble::of(vec![dverge_member(false, 1), dverge_member(false, 2)]);
    e.models[0].0 = "model_1".into();
    e.models[1].0 = "model_2".into();
    let text = read_models(&e.zip(), "late.pth").unwrap_err().to_string();
    assert!(text.contains("but no model_0"), "{text}");
}

#[test]
fn a_model_that_is_not_a_state_dict_is_named() {
    let mut e = Ensemble::of(vec![dverge_member(false, 0), dverge_member(false, 2)]);
    e.models[1].0 = "model_2".into();
    e.extra.push(("model_1".into(), 7));
    for (bytes, _) in containers(&e) {
        let text = read_models(&bytes, "odd.pth").unwrap_err().to_string();
        assert!(
            text.starts_with("odd.pth: ") && text.contains("\"model_1\" is not a dict (an int)"),
            "{text}"
        );
    }
}

#[test]
fn a_member_that_does_not_fit_is_named_with_its_keys() {
    let mut broken = dverge_member(false, 1);
    broken.remove("layer1.0.bn2.running_var");
    let e = Ensemble::of(vec![dverge_member(false, 0), broken]);
    let (_, plan) = common::dverge_checkpoint(false);
    let dicts = read_models(&e.legacy(), "t").unwrap();
    match import_members(&dicts, &plan, &ImportOptions::default()).unwrap_err() {
        InteropError::Member { key, error } => {
            assert_eq!(key, "model_1");
            let text = error.to_string();
            assert!(matches!(*error, InteropError::Mismatch(_)), "{text}");
            assert!(text.contains("layer1.0.bn2.running_var"), "{text}");
        }
        other => panic!("expected a member error, got {other}"),
    }
}

#[test]
fn a_lone_model_key_is_still_one_model() {
    let mut e = Ensemble::of(vec![dverge_member(true, 0)]);
    e.models[0].0 = "model_3".into();
    e.extra.push(("epoch".into(), 200));
    for (bytes, _) in containers(&e) {
        let models = read_models(&bytes, "one.pth").unwrap();
        let single = read_state_dict(&bytes, "one.pth").unwrap();
        assert_eq!(models, vec![single]);
        assert_eq!(models[0].nesting.as_deref(), Some("model_3"));
    }
}

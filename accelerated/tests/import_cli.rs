//! `eio import` on DVERGE's ensemble files (`torch.save({'model_0': ..., 'model_1': ...})`,
//! written byte by byte by interop's test writer): one checkpoint of every member in order,
//! which `eio eval --clean` runs; `--member I` imports model I alone; a gap names the key.

use std::path::Path;

use candle_core::Device;
use eio_accelerated::checkpoint::Checkpoint;
use eio_spec::config::Method;

mod common;
#[path = "../../interop/tests/common/mod.rs"]
mod torch_files;

use common::{eio, ok, scratch, write_cifar};
use torch_files::{dverge_key, dverge_member, stored_values, Ensemble, Nesting};

/// The tiny ResNet-8 (width 0.25) the writer's members have.
const TINY: [&str; 4] = ["--arch", "resnet8", "--set", "model.width=0.25"];

fn import(file: &Path, out: &Path, more: &[&str]) -> std::process::Output {
    eio()
        .arg("import")
        .arg(file)
        .arg("--out")
        .arg(out)
        .args(TINY)
        .args(more)
        .output()
        .unwrap()
}

/// Asserts that `values` (a stored eio model) holds exactly `member`'s source values, every
/// candidate of every RGB from the one DVERGE tensor.
fn assert_member(values: &std::collections::BTreeMap<String, Vec<f64>>, member: usize) {
    let source = dverge_member(true, member);
    for (name, got) in values {
        let name0 = name
            .replace(".candidate_ops.1.", ".candidate_ops.0.")
            .replace(".candidate_ops.2.", ".candidate_ops.0.");
        let key = match dverge_key(&name0) {
            Some(k) => format!("model.{k}"),
            None => name.trim_start_matches("net.").to_string(),
        };
        assert_eq!(
            got,
            &stored_values(&source, &key),
            "member {member}: {name} <- {key}"
        );
    }
}

#[test]
fn a_dverge_ensemble_file_imports_as_one_checkpoint_of_every_member() {
    let dir = scratch("import-ensemble");
    let file = Ensemble::of((0..3).map(|m| dverge_member(true, m)).collect());
    for (name, bytes) in [("legacy.pth", file.legacy()), ("zip.pth", file.zip())] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = dir.join(format!("{name}.safetensors"));
        let output = import(&path, &out, &[]);
        ok(&output);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("3 members (model_0, model_1, model_2; DVERGE layout"),
            "{stderr}"
        );
        let ck = Checkpoint::load(&out, &Device::Cpu, None).unwrap();
        assert_eq!(ck.members.len(), 3);
        assert_eq!(ck.meta.members, 3);
        let c = &ck.meta.config;
        assert_eq!((c.model.n, c.model.depth), (1, 8));
        assert_eq!(c.train.method, Method::Baseline);
        assert_eq!(c.train.ensemble_size, 3);
        for (m, state) in ck.members.iter().enumerate() {
            let values = state.to_values().unwrap();
            assert_eq!(values.len(), ck.plan().unwrap().params.len());
            assert_member(&values, m);
        }
    }

    // The user's settings win: another ensemble method is kept.
    let path = dir.join("legacy.pth");
    let out = dir.join("adp.safetensors");
    ok(&import(&path, &out, &["--set", "train.method=\"adp\""]));
    let ck = Checkpoint::load(&out, &Device::Cpu, None).unwrap();
    assert_eq!(ck.meta.config.train.method, Method::Adp);
    assert_eq!(ck.members.len(), 3);
    // ... but the file decides how many members there are.
    let wrong = import(
        &path,
        &dir.join("no.safetensors"),
        &["--set", "train.ensemble_size=5"],
    );
    assert!(!wrong.status.success());
    let e = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        e.contains("legacy.pth") && e.contains("ensemble_size = 5"),
        "{e}"
    );
    let rgn = import(&path, &dir.join("no.safetensors"), &["--set", "model.n=2"]);
    assert!(!rgn.status.success());
    let e = String::from_utf8_lossy(&rgn.stderr);
    assert!(
        e.contains("an ensemble of 3 models") && e.contains("model.n"),
        "{e}"
    );

    // eio eval runs on it (clean accuracy of the 3-member ensemble).
    write_cifar(&dir, 8);
    let data = format!("data.path=\"{}\"", dir.display());
    let eval = eio()
        .args(["eval", "--quiet", "--clean", "--set", &data, "--set"])
        .arg("eval.batch_size=8")
        .arg("--model")
        .arg(dir.join("zip.pth.safetensors"))
        .arg("--out")
        .arg(dir.join("eval"))
        .output()
        .unwrap();
    let table = ok(&eval);
    assert!(dir.join("eval").join("eval.json").exists(), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn member_imports_one_model_and_a_gap_names_the_missing_key() {
    let dir = scratch("import-member");
    let path = dir.join("epoch_200.pth");
    let file = Ensemble::of((0..3).map(|m| dverge_member(true, m)).collect());
    std::fs::write(&path, file.zip()).unwrap();
    // --member 1: model_1 alone, as a single model of the default config (an n = 2 RGN, both
    // candidates from it).
    let out = dir.join("one.safetensors");
    let output = import(&path, &out, &["--member", "1"]);
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("imported model_1 of"), "{stderr}");
    let ck = Checkpoint::load(&out, &Device::Cpu, None).unwrap();
    assert_eq!(ck.members.len(), 1);
    assert_eq!(ck.meta.config.model.n, 2);
    assert_eq!(ck.meta.config.train.method, Method::Eio);
    assert_member(&ck.members[0].to_values().unwrap(), 1);

    let past = import(&path, &dir.join("no.safetensors"), &["--member", "3"]);
    assert!(!past.status.success());
    let e = String::from_utf8_lossy(&past.stderr);
    assert!(
        e.contains("--member 3") && e.contains("epoch_200.pth holds 3 models"),
        "{e}"
    );

    // A plain state dict and a lone model_<i> are one model, as before.
    let mut one = Ensemble::of(vec![dverge_member(true, 1)]);
    one.models[0].0 = "model_1".into();
    for (bytes, name) in [
        (dverge_member(true, 1).legacy(Nesting::Top), "plain.pth"),
        (one.legacy(), "lone.pth"),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let out = dir.join(format!("{name}.safetensors"));
        let output = import(&p, &out, &[]);
        ok(&output);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!(
                "imported {} (DVERGE layout, 93 tensors) -> ",
                p.display()
            )),
            "{stderr}"
        );
        let ck = Checkpoint::load(&out, &Device::Cpu, None).unwrap();
        assert_eq!((ck.members.len(), ck.meta.config.model.n), (1, 2));
        assert_member(&ck.members[0].to_values().unwrap(), 1);
    }

    // model_0 and model_2 only: the error names the file and model_1.
    let mut gap = Ensemble::of(vec![dverge_member(true, 0), dverge_member(true, 2)]);
    gap.models[1].0 = "model_2".into();
    let gap_path = dir.join("gap.pth");
    std::fs::write(&gap_path, gap.legacy()).unwrap();
    let failed = import(&gap_path, &dir.join("no.safetensors"), &[]);
    assert!(!failed.status.success());
    let e = String::from_utf8_lossy(&failed.stderr);
    assert!(e.contains("gap.pth") && e.contains("no model_1"), "{e}");
    assert!(!dir.join("no.safetensors").exists());

    // A member that does not fit: the error names the file, the member and the key.
    let mut broken = dverge_member(true, 1);
    broken.remove("model.fc.bias");
    let bad = Ensemble::of(vec![dverge_member(true, 0), broken]);
    let bad_path = dir.join("bad.pth");
    std::fs::write(&bad_path, bad.legacy()).unwrap();
    let failed = import(&bad_path, &dir.join("no.safetensors"), &[]);
    assert!(!failed.status.success());
    let e = String::from_utf8_lossy(&failed.stderr);
    assert!(
        e.contains("bad.pth") && e.contains("model_1: ") && e.contains("missing (1): fc.bias"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

//! `eio blackbox` end to end on a tiny CIFAR-10-format data set: surrogates are trained, the
//! suite is generated in two shards by two concurrent processes and equals an unsharded run
//! bit for bit, a rerun skips finished jobs and redoes only a missing one, a folder of another
//! suite is refused, and `eio eval --blackbox` scores a model all-or-nothing over every
//! version (and refuses the suite's own surrogate).

mod common;

use std::path::Path;
use std::process::Stdio;

use common::{eio, ok, scratch, tiny_config, write_cifar};

fn job_files(suite: &Path) -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(suite.join("manifest.json")).unwrap())
            .unwrap();
    manifest["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            format!(
                "eps_{}/{}.safetensors",
                j["eps"].as_f64().unwrap(),
                j["version"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// The adversarial pixels of a job file (its tensor bytes; the metadata holds wall times).
fn job_pixels(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("images").unwrap().data().to_vec()
}

#[test]
fn a_suite_is_generated_in_shards_resumed_and_scored() {
    let dir = scratch("blackbox");
    write_cifar(&dir, 8);
    let config = tiny_config(&dir, &dir, 1);
    let c = config.to_str().unwrap();
    let surrogates = dir.join("surrogates");
    ok(&eio()
        .args(["blackbox", "surrogates", "--quiet", "--config", c, "--out"])
        .arg(&surrogates)
        .output()
        .unwrap());
    for f in ["baseline1/model.safetensors", "baseline2/model.safetensors"] {
        assert!(surrogates.join(f).exists(), "{f}");
    }
    let generate = |out: &Path, extra: &[&str]| {
        let mut cmd = eio();
        cmd.args([
            "blackbox",
            "generate",
            "--quiet",
            "--config",
            c,
            "--surrogates",
        ])
        .arg(&surrogates)
        .arg("--out")
        .arg(out)
        .args(extra);
        cmd
    };

    // Two shards as two concurrent processes, then the whole suite in one process.
    let sharded = dir.join("sharded");
    let spawn = |shard: &str| {
        generate(&sharded, &["--shard", shard])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("0/2"), spawn("1/2"));
    ok(&a.wait_with_output().unwrap());
    ok(&b.wait_with_output().unwrap());
    let whole = dir.join("whole");
    let first = generate(&whole, &[]).output().unwrap();
    ok(&first);
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("32 jobs, 0 done before, 32 generated"),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let files = job_files(&whole);
    assert_eq!(files.len(), 2 * 16, "2 radii x 16 versions");
    assert_eq!(files, job_files(&sharded));
    for f in &files {
        assert_eq!(
            job_pixels(&sharded.join(f)),
            job_pixels(&whole.join(f)),
            "{f}: the sharded suite differs from the unsharded one"
        );
    }
    assert_eq!(
        std::fs::read(sharded.join("manifest.json")).unwrap(),
        std::fs::read(whole.join("manifest.json")).unwrap()
    );
    let status = eio()
        .args(["blackbox", "status"])
        .arg(&whole)
        .output()
        .unwrap();
    assert!(ok(&status).contains("32 of 32 jobs done"));

    // A rerun skips everything; a missing job is redone, alone, to the same pixels.
    let again = generate(&whole, &[]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("32 done before, 0 generated"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Without --config: the surrogates found in the folder, smallest first, and the first
    // one's config (its seed too); one job is enough to see the manifest.
    let found = dir.join("found");
    ok(&eio()
        .args([
            "blackbox",
            "generate",
            "--quiet",
            "--shard",
            "0/32",
            "--surrogates",
        ])
        .arg(&surrogates)
        .arg("--out")
        .arg(&found)
        .output()
        .unwrap());
    let surrogates_of = |suite: &Path| -> (Vec<String>, u64) {
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(suite.join("manifest.json")).unwrap())
                .unwrap();
        let names = m["surrogates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        (names, m["seed"].as_u64().unwrap())
    };
    assert_eq!(surrogates_of(&found).0, surrogates_of(&whole).0);
    assert_eq!(surrogates_of(&found).1, 11, "the first surrogate's seed");
    assert_eq!(surrogates_of(&whole).1, 3, "--config's seed");
    let victim = whole.join(&files[7]);
    let before = job_pixels(&victim);
    std::fs::remove_file(&victim).unwrap();
    let status = eio()
        .args(["blackbox", "status"])
        .arg(&whole)
        .output()
        .unwrap();
    assert!(!status.status.success(), "an incomplete suite is reported");
    assert!(String::from_utf8_lossy(&status.stdout).contains(&format!("missing: {}", files[7])));
    let redo = generate(&whole, &[]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&redo.stderr).contains("31 done before, 1 generated"),
        "{}",
        String::from_utf8_lossy(&redo.stderr)
    );
    assert_eq!(job_pixels(&victim), before);

    // Other settings into the same folder are refused, naming what differs.
    let other = generate(&whole, &["--set", "blackbox.steps=3"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("blackbox settings"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );

    // Scoring: a separately trained baseline (seed 3), all-or-nothing over 16 versions.
    let model_dir = dir.join("model");
    ok(&eio()
        .args([
            "train",
            "--quiet",
            "--config",
            c,
            "--set",
            "model.n=1",
            "--set",
        ])
        .arg("train.method=\"baseline\"")
        .arg("--out")
        .arg(&model_dir)
        .output()
        .unwrap());
    let model = model_dir.join("model.safetensors");
    let eval_dir = dir.join("eval");
    let scored = eio()
        .args(["eval", "--quiet", "--model"])
        .arg(&model)
        .arg("--blackbox")
        .arg(&whole)
        .args(["--eps", "0.02,0.05", "--out"])
        .arg(&eval_dir)
        .output()
        .unwrap();
    let table = ok(&scored);
    assert!(table.contains("black-box suite (16 versions)"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_dir.join("eval.json")).unwrap())
            .unwrap();
    let suite = json["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["protocol"]["kind"] == "suite")
        .expect("a suite report");
    for e in suite["report"]["per_eps"].as_array().unwrap() {
        let r = &e["robustness"];
        let versions = r["per_version"].as_object().unwrap();
        assert_eq!(versions.len(), 16);
        let worst = versions
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(1.0, f64::min);
        let all = r["accuracy"].as_f64().unwrap();
        assert!(
            all <= worst + 1e-12,
            "all-or-nothing {all} above a version's {worst}"
        );
    }
    let checks: Vec<&str> = json["sanity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    for check in [
        "non-increasing in eps",
        "white-box <= black-box",
        "zero input gradients (gradient masking)",
        "model disjoint from the surrogates",
    ] {
        assert!(checks.contains(&check), "{check} missing from {checks:?}");
    }

    // The suite's own surrogate is refused.
    let own = eio()
        .args(["eval", "--quiet", "--model"])
        .arg(surrogates.join("baseline1/model.safetensors"))
        .arg("--blackbox")
        .arg(&whole)
        .output()
        .unwrap();
    assert!(!own.status.success());
    assert!(String::from_utf8_lossy(&own.stderr).contains("own surrogate"));

    // Without an attack, eval measures clean accuracy on every test image.
    let clean = eio()
        .args(["eval", "--quiet", "--model"])
        .arg(&model)
        .arg("--out")
        .arg(dir.join("clean"))
        .output()
        .unwrap();
    let t = ok(&clean);
    assert!(t.contains("| clean |"), "{t}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! The `eio` command end to end on a tiny CIFAR-10-format data set written by the test:
//! `eio run` produces its report, `eio eval` and `eio derive` work on its models, a training
//! process killed with SIGKILL resumes to the same weights, and bad input gets clear errors.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use eio_accelerated::checkpoint::Checkpoint;

mod common;

use common::{eio, ok, scratch, tiny_config, write_cifar};

#[test]
fn eio_run_trains_derives_evaluates_and_reports() {
    let dir = scratch("run");
    write_cifar(&dir, 8);
    let config = tiny_config(&dir, &dir, 1);
    let out = dir.join("out");
    let output = eio()
        .args(["run", config.to_str().unwrap(), "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let table = ok(&output);
    assert!(table.contains("| Baseline-1 | white-box PGD |"), "{table}");
    assert!(
        table.contains("| Baseline-2 | black-box suite (16 versions) |"),
        "{table}"
    );
    assert!(
        table.contains("| model | clean (%) | black-box eps 0.03 (%)"),
        "{table}"
    );
    assert!(table.contains("EIO-derived"), "{table}");
    for f in [
        "report.md",
        "eval.json",
        "eval.csv",
        "config.toml",
        "baseline/model.safetensors",
        "baseline/metrics.jsonl",
        "eio/model.safetensors",
        "eio/metrics.jsonl",
        "derived/model.safetensors",
        "derived/folded.safetensors",
        "surrogates/baseline1/model.safetensors",
        "surrogates/baseline2/model.safetensors",
        "suite/manifest.json",
        "suite/clean.safetensors",
        "suite/eps_0.05/from_baseline2_cw_sgm_0.2_steps_2.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} is missing");
    }
    let csv = std::fs::read_to_string(out.join("eval.csv")).unwrap();
    // 3 models (Baseline-1, Baseline-2, EIO-derived) x (white-box, suite) x 2 radii.
    assert_eq!(csv.lines().count(), 1 + 3 * 2 * 2, "{csv}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("REDUCED suite"), "{report}");
    assert!(report.contains("## Sanity checks"), "{report}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert!(!json["sanity"].as_array().unwrap().is_empty());
    let versions = &json["reports"][1]["report"]["per_eps"][0]["robustness"]["per_version"];
    assert_eq!(versions.as_object().unwrap().len(), 16, "{versions}");
    let eio_metrics = std::fs::read_to_string(out.join("eio/metrics.jsonl")).unwrap();
    assert_eq!(eio_metrics.lines().count(), 2, "pre-training + 1 EIO epoch");
    let derived =
        Checkpoint::load(&out.join("derived/model.safetensors"), &Device::Cpu, None).unwrap();
    assert_eq!(derived.meta.config.model.n, 1);

    // Running again without --resume refuses; with --resume it reuses every stage.
    let again = eio()
        .args(["run", config.to_str().unwrap(), "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = eio()
        .args([
            "run",
            config.to_str().unwrap(),
            "--quiet",
            "--resume",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let without_time = |t: &str| -> String {
        t.lines()
            .filter(|l| !l.starts_with("wall time"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        without_time(&ok(&resumed)),
        without_time(&table),
        "a resumed finished run reports the same table"
    );

    // A rival added to the finished run trains alone: every other stage is reused (the stage
    // configs leave out `run.rivals`), and it is judged with the others.
    let baseline_metrics = std::fs::read_to_string(out.join("baseline/metrics.jsonl")).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[run.rivals]]\nname = \"ADP-2\"\npreset = \"adp-3\"\n\
         set = [\"train.epochs=1\", \"train.ensemble_size=2\", \"train.milestones=[]\"]\n",
    );
    std::fs::write(&config, text).unwrap();
    let with_rival = eio()
        .args([
            "run",
            config.to_str().unwrap(),
            "--quiet",
            "--resume",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let table = ok(&with_rival);
    assert!(table.contains("| ADP-2 | white-box PGD |"), "{table}");
    assert_eq!(
        std::fs::read_to_string(out.join("baseline/metrics.jsonl")).unwrap(),
        baseline_metrics,
        "the baseline was not retrained"
    );
    let adp = Checkpoint::load(&out.join("ADP-2/model.safetensors"), &Device::Cpu, None).unwrap();
    assert_eq!(adp.members.len(), 2);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Methods and training cost"), "{report}");
    assert!(report.contains("| ADP-2 | adp | 2 | 1 |"), "{report}");

    // eval on the RGN: a path must be chosen; random gates with EOT work.
    let rgn = out.join("eio/model.safetensors");
    let no_path = eio()
        .args(["eval", "--quiet", "--model"])
        .arg(&rgn)
        .output()
        .unwrap();
    assert!(!no_path.status.success());
    assert!(String::from_utf8_lossy(&no_path.stderr).contains("--random-gates"));
    let eval_dir = dir.join("eval");
    let random = eio()
        .args([
            "eval",
            "--quiet",
            "--random-gates",
            "--eot",
            "2",
            "--eps",
            "0.03",
            "--images",
            "8",
            "--model",
        ])
        .arg(&rgn)
        .arg("--transfer-from")
        .arg(out.join("baseline/model.safetensors"))
        .arg("--out")
        .arg(&eval_dir)
        .output()
        .unwrap();
    let t = ok(&random);
    assert!(t.contains("random gates, EOT 2"), "{t}");
    assert!(eval_dir.join("eval.json").exists());

    // derive with explicit paths (an ensemble of two) and folding.
    let derived_dir = dir.join("derived2");
    let d = eio()
        .args([
            "derive",
            "--quiet",
            "--path",
            "0000000",
            "--path",
            "1111111",
            "--finetune-epochs",
            "0",
            "--fold-bn",
            "--from",
        ])
        .arg(&rgn)
        .arg("--out")
        .arg(&derived_dir)
        .output()
        .unwrap();
    ok(&d);
    let two = Checkpoint::load(&derived_dir.join("model.safetensors"), &Device::Cpu, None).unwrap();
    assert_eq!(two.members.len(), 2);
    let bad_path = eio()
        .args(["derive", "--quiet", "--path", "01", "--from"])
        .arg(&rgn)
        .arg("--out")
        .arg(dir.join("derived3"))
        .output()
        .unwrap();
    assert!(!bad_path.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_training_process_resumes_to_the_same_weights() {
    let dir = scratch("kill");
    write_cifar(&dir, 8);
    let config = tiny_config(&dir, &dir, 3);
    let train = |out: &Path, resume: bool| {
        let mut c = eio();
        c.args([
            "train",
            "--quiet",
            "--config",
            config.to_str().unwrap(),
            "--out",
        ])
        .arg(out);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let whole = dir.join("whole");
    ok(&train(&whole, false).output().unwrap());

    let killed = dir.join("killed");
    let mut child = train(&killed, false).spawn().unwrap();
    let metrics = killed.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no epoch finished"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to write anything more
    child.wait().unwrap();
    let again = train(&killed, false).output().unwrap();
    assert!(!again.status.success(), "an existing run needs --resume");
    ok(&train(&killed, true).output().unwrap());

    let a = Checkpoint::load(
        &whole.join("model.safetensors"),
        &Device::Cpu,
        Some(DType::F32),
    )
    .unwrap();
    let b = Checkpoint::load(
        &killed.join("model.safetensors"),
        &Device::Cpu,
        Some(DType::F32),
    )
    .unwrap();
    for (name, t) in &a.members[0].tensors {
        let u = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let v = b.members[0].tensors[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            u.iter().zip(&v).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} differs after kill and resume"
        );
    }
    assert_eq!(a.members[0].counters, b.members[0].counters);
    let lines = |p: &Path| {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(
        lines(&whole),
        lines(&killed),
        "metrics.jsonl has one line per epoch"
    );

    // Resuming under another config is refused, naming the setting.
    let other = train(&killed, true)
        .args(["--set", "distill.eps=0.05"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = scratch("bad");
    let missing = eio()
        .args(["train", "--config"])
        .arg(dir.join("absent.toml"))
        .arg("--out")
        .arg(dir.join("o"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("absent.toml"));

    let bad_set = eio()
        .args([
            "train",
            "--preset",
            "quick",
            "--set",
            "distill.eps=-1",
            "--out",
        ])
        .arg(dir.join("o"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&bad_set.stderr);
    assert!(!bad_set.status.success());
    assert!(e.contains("distill.eps"), "{e}");

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let eval = eio().args(["eval", "--model"]).arg(&junk).output().unwrap();
    let e = String::from_utf8_lossy(&eval.stderr);
    assert!(!eval.status.success());
    assert!(e.contains("junk.safetensors"), "{e}");

    let no_data = dir.join("nodata.toml");
    std::fs::write(
        &no_data,
        "[data]\ndataset = \"cifar10\"\npath = \"/nonexistent/cifar\"\n",
    )
    .unwrap();
    let r = eio()
        .args(["train", "--quiet", "--config"])
        .arg(&no_data)
        .arg("--out")
        .arg(dir.join("o2"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(e.contains("/nonexistent/cifar"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

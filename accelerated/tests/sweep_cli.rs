//! `eio sweep` and `eio plot` end to end on a tiny CIFAR-10-format data set: a figure split over
//! two shards run as two processes at once draws the same figure as one unsharded process; a
//! sweep killed mid-run restarts without redoing its finished runs and ends where an
//! uninterrupted sweep ends; a figure with a missing run is drawn with what exists.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

mod common;

use common::{eio, ok, scratch, tiny_config, write_cifar};

/// A figure over the tiny config (`base` relative to the figure file): two EIO runs deriving
/// paths 0 and 1 of one RGN (one shared stage), judged on a reduced black-box suite.
fn write_figure(dir: &Path, evaluate: &str, runs: &str, panels: &str) -> PathBuf {
    let text = format!(
        r#"title = "tiny figure"
evaluate = {evaluate}
[scales.cpu]
base = "tiny.toml"
set = ["blackbox.surrogate_sizes=[1]", "blackbox.surrogate_seeds=[11]", "blackbox.mpgd_starts=1", "blackbox.attacks=[\"mpgd\"]"]
note = "a test's scale"
{runs}
{panels}"#
    );
    let path = dir.join("figure.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn sweep(figure: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = eio();
    c.args(["sweep", figure.to_str().unwrap(), "--quiet", "--out"])
        .arg(out)
        .args(extra);
    c
}

fn plot(dir: &Path) -> Output {
    eio()
        .args(["plot", dir.to_str().unwrap()])
        .output()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_sharded_sweep_draws_the_same_figure_as_an_unsharded_one() {
    let dir = scratch("sweep-shards");
    write_cifar(&dir, 8);
    tiny_config(&dir, &dir, 1);
    let figure = write_figure(
        &dir,
        r#"["black-box"]"#,
        r#"[[runs]]
id = "a"
label = "path 0"
method = "eio"
[[runs]]
id = "b"
label = "path 1"
method = "eio"
path = 1"#,
        r#"[[panels]]
name = "acc"
title = "black-box accuracy"
kind = "accuracy"
protocol = "black-box"
runs = ["a", "b"]
[[panels]]
name = "spread"
title = "spread"
kind = "spread"
protocol = "black-box"
runs = ["a", "b"]
[[panels]]
name = "curves"
title = "curves"
kind = "curves"
runs = ["a", "b"]
[[panels]]
name = "cost"
title = "cost"
kind = "cost"
runs = ["a", "b"]"#,
    );
    let sharded = dir.join("sharded");
    let tasks: Vec<_> = (0..2)
        .map(|t| {
            sweep(
                &figure,
                &sharded,
                &["--task", &t.to_string(), "--tasks", "2"],
            )
            .spawn()
            .unwrap()
        })
        .collect();
    for t in tasks {
        ok(&t.wait_with_output().unwrap());
    }
    let whole = dir.join("whole");
    let listed = ok(&sweep(&figure, &whole, &["--list"]).output().unwrap());
    assert!(
        listed.contains("| 1 | b | path 1 | Eio | 0 | Pending |"),
        "{listed}"
    );
    ok(&sweep(&figure, &whole, &[]).output().unwrap());

    // The two runs share one RGN and one suite, each built once (the second task waited).
    let stages: Vec<String> = std::fs::read_dir(sharded.join("stages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(
        stages.iter().filter(|n| n.starts_with("eio-")).count(),
        1,
        "{stages:?}"
    );
    assert_eq!(
        stages.iter().filter(|n| n.starts_with("derived-")).count(),
        2,
        "{stages:?}"
    );
    assert_eq!(
        stages.iter().filter(|n| n.starts_with("suite-")).count(),
        1,
        "{stages:?}"
    );

    // `eio verify` reads the sweep folder: every stage complete, nothing corrupt; a flipped
    // byte of the shared RGN is named.
    let verified = eio().arg("verify").arg(&sharded).output().unwrap();
    let report = ok(&verified);
    assert!(report.contains(" 0 partial, 0 corrupt"), "{report}");
    let rgn = stages.iter().find(|n| n.starts_with("eio-")).unwrap();
    let model = sharded.join("stages").join(rgn).join("model.safetensors");
    let pristine = std::fs::read(&model).unwrap();
    let mut bytes = pristine.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    let damaged = eio().arg("verify").arg(&sharded).output().unwrap();
    assert!(!damaged.status.success());
    let stdout = String::from_utf8_lossy(&damaged.stdout);
    assert!(
        stdout.contains("corrupt") && stdout.contains(rgn.as_str()),
        "{stdout}"
    );
    std::fs::write(&model, pristine).unwrap();

    ok(&plot(&sharded));
    ok(&plot(&whole));
    for file in ["results.csv", "curves.csv"] {
        let (a, b) = (read(&sharded.join(file)), read(&whole.join(file)));
        assert_eq!(
            a, b,
            "{file} differs between the sharded and the whole sweep"
        );
        assert!(a.lines().count() > 2, "{file}: {a}");
    }
    let results = read(&whole.join("results.csv"));
    // Each run: a clean row and one black-box row per eps of the tiny config (0.02, 0.05).
    assert_eq!(results.lines().count(), 1 + 2 * 3, "{results}");
    assert!(
        results.contains("a,path 0,EIO,black-box,0.05,"),
        "{results}"
    );
    let md = read(&whole.join("figure.md"));
    assert!(md.contains("2 of 2 runs finished"), "{md}");
    assert!(md.contains("![black-box accuracy](acc.svg)"), "{md}");
    assert!(md.contains("Spread over the 2 sub-models"), "{md}");
    for panel in ["acc", "spread", "curves", "cost"] {
        let svg = read(&whole.join(format!("{panel}.svg")));
        assert!(svg.starts_with("<svg"), "{panel}.svg");
        let png = image::open(whole.join(format!("{panel}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (760, 480));
    }

    // A missing run: the figure is drawn with what exists and says what is missing.
    std::fs::remove_file(whole.join("runs/b/result.json")).unwrap();
    let printed = ok(&plot(&whole));
    assert!(printed.contains("missing (not finished): b"), "{printed}");
    let md = read(&whole.join("figure.md"));
    assert!(md.contains("1 of 2 runs finished"), "{md}");
    assert!(
        md.contains("**Missing runs** (drawn without them): b."),
        "{md}"
    );
}

#[test]
fn a_killed_sweep_restarts_without_redoing_finished_runs() {
    let dir = scratch("sweep-kill");
    write_cifar(&dir, 8);
    tiny_config(&dir, &dir, 2);
    let figure = write_figure(
        &dir,
        "[]",
        r#"[[runs]]
id = "base"
label = "baseline"
method = "baseline"
[[runs]]
id = "eio"
label = "EIO"
method = "eio"
set = ["train.epochs=10"]"#,
        r#"[[panels]]
name = "curves"
title = "curves"
kind = "curves"
runs = ["base", "eio"]"#,
    );
    let whole = dir.join("whole");
    ok(&sweep(&figure, &whole, &[]).output().unwrap());

    let killed = dir.join("killed");
    let mut child = sweep(&figure, &killed, &[]).spawn().unwrap();
    let first = killed.join("runs/base/result.json");
    let started = Instant::now();
    while !first.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the first run never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL, in the middle of the second run (seconds of EIO epochs)
    child.wait().unwrap();
    assert!(
        !killed.join("runs/eio/result.json").exists(),
        "the kill came too late to interrupt the second run"
    );
    let before = read(&first);
    let modified = std::fs::metadata(&first).unwrap().modified().unwrap();

    let printed = ok(&sweep(&figure, &killed, &[]).output().unwrap());
    assert!(printed.contains("already finished: base"), "{printed}");
    assert!(!printed.contains("finished base in"), "{printed}");
    assert_eq!(read(&first), before);
    assert_eq!(
        std::fs::metadata(&first).unwrap().modified().unwrap(),
        modified
    );
    ok(&plot(&whole));
    ok(&plot(&killed));
    for file in ["results.csv", "curves.csv"] {
        assert_eq!(
            read(&whole.join(file)),
            read(&killed.join(file)),
            "{file}: the restarted sweep ends elsewhere than the uninterrupted one"
        );
    }

    // A figure drawn differently (a panel's title) takes over the folder's runs.
    let redrawn = std::fs::read_to_string(&figure).unwrap().replace(
        "title = \"curves\"",
        "title = \"accuracy through training\"",
    );
    std::fs::write(&figure, redrawn).unwrap();
    let printed = ok(&sweep(&figure, &killed, &[]).output().unwrap());
    assert!(printed.contains("already finished: base, eio"), "{printed}");
    ok(&plot(&killed));
    assert!(read(&killed.join("figure.md")).contains("## accuracy through training"));

    // The folder holds this sweep: another one is refused, naming the folder.
    let other = sweep(&figure, &killed, &["--set", "seed=4"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("holds another sweep"), "{stderr}");
    let unknown = eio().args(["sweep", "fig99", "--list"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("fig3, fig4"), "{stderr}");
}

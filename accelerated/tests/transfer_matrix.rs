//! `eio eval --transfer-matrix` end to end on a tiny CIFAR-10-format data set written by the
//! test: an ensemble of plain networks (member 0 and two jittered copies) and the paths of one
//! RGN, with the test labels set to member 0's (path 0's) predictions so that some images are
//! correct for every source. The table, `transfer-matrix.csv` and `transfer-matrix.json`;
//! ε = 0 fools nobody; more restarts never lower a rate; and every misuse gets an error
//! naming the flag. Also: the spec's subset draw is the data crate's partial Fisher-Yates.

use std::collections::HashMap;
use std::path::Path as FsPath;

use candle_core::{DType, Device, Tensor};
use eio_accelerated::checkpoint::Checkpoint;
use eio_accelerated::state::ModelState;
use eio_spec::plan::Role;
use eio_spec::rng::{Seeds, Stream};
use eio_spec::{Config, Path, Plan};
use rand::{Rng, SeedableRng};

mod common;

use common::{eio, ok, scratch, tiny_config, write_cifar};

/// `state` with every learnable entry multiplied by a factor in [0.8, 1.2).
fn jittered(plan: &Plan, state: &ModelState, seed: u64) -> ModelState {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut values: HashMap<String, Vec<f64>> = state.to_values().unwrap().into_iter().collect();
    for spec in plan.params.iter().filter(|s| s.role == Role::Learnable) {
        for v in values.get_mut(&spec.name).unwrap().iter_mut() {
            *v *= rng.random_range(0.8..1.2);
        }
    }
    ModelState::from_values(plan, values, &Device::Cpu, DType::F32).unwrap()
}

/// The test images of the fixture, in file order.
fn test_images(dir: &FsPath) -> eio_data::Images {
    let bytes = std::fs::read(dir.join("test_batch.bin")).unwrap();
    eio_data::parse_cifar_records(&bytes, "test_batch.bin", 1).unwrap()
}

/// The first-maximum class of every test image under `path` of `state`.
fn predictions(plan: &Plan, state: &ModelState, path: &Path, images: &eio_data::Images) -> Vec<u8> {
    let s = &images.shape;
    let x = Tensor::from_vec(
        images.unit_pixels(),
        (images.len(), s.channels, s.height, s.width),
        &Device::Cpu,
    )
    .unwrap();
    let z = eio_accelerated::model::eval_logits(plan, state, path, &x).unwrap();
    z.to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap()
        .iter()
        .map(|row| {
            let mut best = 0;
            for (k, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = k;
                }
            }
            best as u8
        })
        .collect()
}

/// Rewrites the label byte of every record of `test_batch.bin`.
fn relabel(dir: &FsPath, labels: &[u8]) {
    let file = dir.join("test_batch.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len(), labels.len() * 3073);
    for (k, &y) in labels.iter().enumerate() {
        bytes[k * 3073] = y;
    }
    std::fs::write(&file, bytes).unwrap();
}

/// A data folder with 24 test images and the tiny config over it, with `overrides`.
fn fixture(name: &str, overrides: &[&str]) -> (std::path::PathBuf, Config) {
    let dir = scratch(name);
    write_cifar(&dir, 24);
    let config = Config::load(&tiny_config(&dir, &dir, 1))
        .unwrap()
        .with_overrides(overrides)
        .unwrap();
    (dir, config)
}

/// `eio eval --model MODEL --transfer-matrix --quiet ARGS…`.
fn transfer_matrix(model: &FsPath, args: &[&str]) -> std::process::Output {
    eio()
        .args(["eval", "--quiet", "--transfer-matrix", "--model"])
        .arg(model)
        .args(args)
        .output()
        .unwrap()
}

fn fails_with(output: &std::process::Output, needle: &str) {
    let e = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected a failure: {e}");
    assert!(e.contains(needle), "{needle:?} not in: {e}");
}

fn report(out: &FsPath) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("transfer-matrix.json")).unwrap())
        .unwrap()
}

fn success(report: &serde_json::Value) -> Vec<Vec<f64>> {
    serde_json::from_value(report["matrix"]["success"].clone()).unwrap()
}

#[test]
fn ensemble_matrix_from_the_command_line() {
    let (dir, config) = fixture(
        "tm-ensemble",
        &[
            "model.n=1",
            "train.method=baseline",
            "train.ensemble_size=3",
        ],
    );
    let plan = config.plan().unwrap();
    let mut ck = eio_accelerated::train::start(&config, &Device::Cpu, DType::F32).unwrap();
    ck.members[1] = jittered(&plan, &ck.members[0], 1);
    ck.members[2] = jittered(&plan, &ck.members[0], 2);
    let model = dir.join("model.safetensors");
    ck.save(&model).unwrap();
    let labels = predictions(
        &plan,
        &ck.members[0],
        &Checkpoint::plain_path(&plan),
        &test_images(&dir),
    );
    relabel(&dir, &labels);

    let out = dir.join("out");
    let run = |extra: &[&str]| {
        let mut args = vec!["--steps", "2", "--images", "6", "--out"];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        let stdout = ok(&transfer_matrix(&model, &args));
        (stdout, report(&out))
    };
    let (table, json) = run(&["--eps", "0.05", "--restarts", "2"]);
    eprintln!("{table}");
    assert!(
        table.contains("| source \\ target | member 0 | member 1 | member 2 | ensemble |"),
        "{table}"
    );
    assert!(table.contains("| member 2 |"), "{table}");
    let csv = std::fs::read_to_string(out.join("transfer-matrix.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "source,member 0,member 1,member 2,ensemble");
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[1].starts_with("member 0,"));
    assert!(
        !out.join("eval.json").exists(),
        "the matrix has its own files"
    );
    let s = &json["settings"];
    assert_eq!(s["eps"], 0.05);
    assert_eq!(s["steps"], 2);
    assert_eq!(s["restarts"], 2);
    assert_eq!(s["images"], 6);
    assert_eq!(s["batch_size"], 8, "eval.batch_size of the config");
    assert_eq!(json["seed"], 3);
    assert_eq!(json["pool"], 24);
    let subset: Vec<usize> = serde_json::from_value(json["subset"].clone()).unwrap();
    let all_correct = json["all_correct"].as_u64().unwrap() as usize;
    assert!(all_correct > 0);
    assert_eq!(subset.len(), all_correct.min(6));
    assert!(subset.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(json["sources"][2]["member"], 2);
    assert_eq!(json["matrix"]["targets"][3], "ensemble");
    let two = success(&json);
    assert_eq!(two.len(), 3);
    assert!(two
        .iter()
        .all(|row| row.len() == 4 && row.iter().all(|v| (0.0..=1.0).contains(v))));

    // More restarts: restarts 0 and 1 are the same draws, so no rate drops.
    let (_, json) = run(&["--eps", "0.05", "--restarts", "3"]);
    for (r3, r2) in success(&json).iter().zip(&two) {
        for (a, b) in r3.iter().zip(r2) {
            assert!(a >= b, "3 restarts {a} < 2 restarts {b}");
        }
    }
    // ε = 0 leaves the images as they are: correct for everyone.
    let (_, json) = run(&["--eps", "0", "--restarts", "1"]);
    assert!(success(&json).iter().flatten().all(|&v| v == 0.0));

    let m = model.to_str().unwrap();
    fails_with(
        &transfer_matrix(&model, &["--eps", "0.01,0.02"]),
        "one --eps",
    );
    fails_with(&transfer_matrix(&model, &["--eps", "2"]), "--eps");
    fails_with(&transfer_matrix(&model, &["--restarts", "0"]), "--restarts");
    fails_with(
        &transfer_matrix(&model, &["--blackbox", "suite"]),
        "--blackbox does not apply",
    );
    fails_with(
        &transfer_matrix(&model, &["--loss", "cw"]),
        "--loss does not apply",
    );
    fails_with(
        &transfer_matrix(&model, &["--paths", "2"]),
        "--paths and --path choose paths of a random gated network",
    );
    fails_with(
        &eio()
            .args(["eval", "--quiet", "--paths", "2", "--model", m])
            .output()
            .unwrap(),
        "add --transfer-matrix",
    );

    // One plain network is no ensemble.
    let single = dir.join("single.safetensors");
    let one = config
        .clone()
        .with_overrides(&["train.ensemble_size=1"])
        .unwrap();
    eio_accelerated::train::start(&one, &Device::Cpu, DType::F32)
        .unwrap()
        .save(&single)
        .unwrap();
    fails_with(&transfer_matrix(&single, &[]), "at least 2 sources");
    // … but two files of one network each are.
    let stdout = ok(&eio()
        .args(["eval", "--quiet", "--transfer-matrix", "--steps", "1"])
        .args(["--restarts", "1", "--images", "3", "--eps", "0", "--out"])
        .arg(dir.join("pair"))
        .args(["--model", m, "--model"])
        .arg(&single)
        .output()
        .unwrap());
    assert!(stdout.contains("member 0 |"), "{stdout}");
    assert!(stdout.contains("single.safetensors |"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rgn_paths_matrix_from_the_command_line() {
    let (dir, config) = fixture("tm-rgn", &[]);
    let plan = config.plan().unwrap();
    assert!(config.model.n > 1);
    let mut ck = eio_accelerated::train::start(&config, &Device::Cpu, DType::F32).unwrap();
    // Different BatchNorm candidates, so that the paths differ.
    ck.members[0] = jittered(&plan, &ck.members[0], 7);
    let model = dir.join("rgn.safetensors");
    ck.save(&model).unwrap();
    let zeros = Path::new(vec![0; plan.k()]);
    let ones = Path::new(vec![1; plan.k()]);
    let labels = predictions(&plan, &ck.members[0], &zeros, &test_images(&dir));
    relabel(&dir, &labels);
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let common = [
        "--steps",
        "2",
        "--restarts",
        "1",
        "--images",
        "5",
        "--out",
        o,
    ];

    let stdout = ok(&transfer_matrix(
        &model,
        &[&common[..], &["--paths", "3"]].concat(),
    ));
    eprintln!("{stdout}");
    let json = report(&out);
    assert_eq!(
        json["settings"]["eps"], 0.03,
        "DVERGE's radius without --eps"
    );
    let expected =
        eio_spec::transfer_matrix::random_paths(&plan.path_space(), 3, &Seeds::new(config.seed))
            .unwrap();
    for (i, p) in expected.iter().enumerate() {
        assert_eq!(json["sources"][i]["path"], p.to_string());
        assert!(stdout.contains(&format!("| path {p} |")), "{stdout}");
    }
    assert_eq!(success(&json).len(), 3);

    let stdout = ok(&transfer_matrix(
        &model,
        &[
            &common[..],
            &["--path", &zeros.to_string(), "--path", &ones.to_string()],
        ]
        .concat(),
    ));
    assert!(
        stdout.contains(&format!(
            "| source \\ target | path {zeros} | path {ones} | ensemble |"
        )),
        "{stdout}"
    );

    fails_with(&transfer_matrix(&model, &common), "--paths K");
    fails_with(
        &transfer_matrix(
            &model,
            &[&common[..], &["--paths", "2", "--path", &zeros.to_string()]].concat(),
        ),
        "not both",
    );
    fails_with(
        &transfer_matrix(&model, &[&common[..], &["--paths", "1"]].concat()),
        "at least 2 sources",
    );
    fails_with(
        &transfer_matrix(
            &model,
            &[&common[..], &["--path", "012", "--path", "0"]].concat(),
        ),
        "--path 012",
    );
    fails_with(
        &eio()
            .args(["eval", "--quiet", "--model"])
            .arg(&model)
            .args(["--path", &zeros.to_string(), "--path", &ones.to_string()])
            .output()
            .unwrap(),
        "--transfer-matrix",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The spec draws the transfer subset with the data crate's partial Fisher-Yates, from its
/// own split of `Stream::EvalSubset`.
#[test]
fn subset_draw_is_the_data_crates_algorithm() {
    let seeds = Seeds::new(11);
    let correct: Vec<bool> = (0..50).map(|k| k % 3 != 0).collect();
    let pool: Vec<usize> = (0..50).filter(|k| k % 3 != 0).collect();
    let chosen = eio_spec::transfer_matrix::choose_subset(&correct, 9, &seeds);
    let mut rng = seeds.stream(
        Stream::EvalSubset,
        eio_spec::transfer_matrix::SUBSET_STREAM_INDEX,
    );
    let mut expected: Vec<usize> = eio_data::split::sample(pool.len(), 9, &mut rng)
        .into_iter()
        .map(|i| pool[i])
        .collect();
    expected.sort_unstable();
    assert_eq!(chosen, expected);
}

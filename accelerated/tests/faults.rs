//! Fault injection, through the same write path every artifact takes
//! (`eio_accelerated::safe_write`): a write that fails after N bytes, for every artifact kind,
//! leaves the old version and no temporary file; training stopped by a full disk or killed
//! with SIGKILL at seeded moments (mid-write included) resumes to bit-identical weights; a
//! damaged checkpoint and a torn `metrics.jsonl` line are detected and named (the line
//! repaired); an interrupted black-box generation keeps its finished jobs and redoes the rest.
//!
//! The `#[ignore]`d variants sweep every byte and many more kill points; they print their
//! counts:
//! `cargo test -p eio-accelerated --test faults -- --ignored --nocapture`

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device};
use eio_accelerated::blackbox::{self, GenerateProgress, SuiteImages, Surrogate};
use eio_accelerated::checkpoint::{Checkpoint, Phase};
use eio_accelerated::evaluate::WhiteBoxReport;
use eio_accelerated::experiment::{self, EvalReport, Protocol, RunDir};
use eio_accelerated::safe_write::fault::{self, Action, Fault, Step};
use eio_accelerated::train::{self, EpochRecord};
use eio_accelerated::verify::{self, Status};
use eio_spec::config::{AttackLoss, Config, Method};
use eio_spec::rng::Seeds;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::{eio, ok, scratch, tiny_config, write_cifar};

/// Every `.tmp` file under `dir`.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(temporaries(&p));
        } else if p.extension().is_some_and(|x| x == "tmp") {
            out.push(p);
        }
    }
    out
}

fn tiny(dir: &Path, epochs: usize) -> Config {
    Config::load(&tiny_config(dir, dir, epochs)).unwrap()
}

/// The byte counts to fail a write of `len` bytes after: all of them (`every`), or 0, 1, the
/// last two and ~40 spread over the file.
fn points(len: usize, every: bool) -> Vec<u64> {
    let len = len as u64;
    if every || len <= 64 {
        return (0..=len).collect();
    }
    let mut p: Vec<u64> = (0..=40).map(|i| i * len / 40).collect();
    p.extend([1, len - 1]);
    p.sort_unstable();
    p.dedup();
    p
}

/// Fails `write` of `target` after each byte count of [`points`] and at the create, sync and
/// rename steps: each time the error names the file, the previous bytes stay and no temporary
/// file is left; then `write` succeeds. Returns the faults injected.
fn sweep(target: &Path, every: bool, write: &mut dyn FnMut() -> Result<(), String>) -> usize {
    let name = target.file_name().unwrap().to_string_lossy().into_owned();
    let old = std::fs::read(target).ok();
    write().unwrap();
    let new = std::fs::read(target).unwrap();
    assert_ne!(
        old.as_deref(),
        Some(new.as_slice()),
        "{name}: the new version must differ"
    );
    match &old {
        Some(bytes) => std::fs::write(target, bytes).unwrap(),
        None => std::fs::remove_file(target).unwrap(),
    }
    let folder = target.parent().unwrap();
    let mut steps: Vec<Step> = points(new.len(), every)
        .into_iter()
        .map(|n| Step::Write { after_bytes: n })
        .collect();
    steps.extend([Step::Create, Step::Sync, Step::Rename]);
    let fired = fault::fired();
    for &step in &steps {
        let _guard = fault::arm(Fault {
            file_name: Some(name.clone()),
            skip: 0,
            step,
            action: Action::Fail(libc::ENOSPC),
        });
        let e = write().expect_err("the injected fault fails the write");
        assert!(
            e.contains(&name),
            "{name} {step:?}: the error names the file: {e}"
        );
        assert!(
            e.contains("No space left on device"),
            "{name} {step:?}: {e}"
        );
        assert_eq!(
            std::fs::read(target).ok(),
            old,
            "{name} {step:?}: the old version changed"
        );
        assert!(
            temporaries(folder).is_empty(),
            "{name} {step:?}: {:?}",
            temporaries(folder)
        );
    }
    assert_eq!(
        fault::fired() - fired,
        steps.len(),
        "{name}: every fault struck"
    );
    write().unwrap();
    assert_eq!(
        std::fs::read(target).unwrap(),
        new,
        "{name}: the write after the faults"
    );
    steps.len()
}

fn record(global_epoch: usize) -> EpochRecord {
    EpochRecord {
        phase: Phase::Main,
        epoch: global_epoch,
        global_epoch,
        lr: 0.1,
        loss: 2.0 - global_epoch as f64 * 0.1,
        train_accuracy: Some(0.25),
        distill_loss: None,
        sign_ties: 0,
        validation_accuracy: Some(0.5),
        test_accuracy: None,
        images: 64,
        seconds: 1.5,
        images_per_second: 42.0,
    }
}

fn eval_report(accuracy: f64) -> EvalReport {
    EvalReport {
        model: "m".into(),
        attack: "clean".into(),
        images: 12,
        protocol: Protocol::Clean,
        report: WhiteBoxReport {
            clean_accuracy: accuracy,
            per_eps: Vec::new(),
        },
    }
}

/// Every artifact kind of a run folder, each through the function eio writes it with.
fn every_artifact(every: bool) -> usize {
    let dir = scratch(if every {
        "artifacts-every"
    } else {
        "artifacts"
    });
    let config = tiny(&dir, 1);
    let run = RunDir::new(dir.join("run"));
    std::fs::create_dir_all(&run.root).unwrap();
    let cpu = Device::Cpu;
    let mut faults = 0;

    run.write_config(&config).unwrap();
    let mut other = config.clone();
    other.seed = 4;
    faults += sweep(&run.config(), every, &mut || {
        run.write_config(&other)
            .map_err(|e| eio_accelerated::error_chain(&e))
    });

    let first = train::start(&config, &cpu, DType::F32).unwrap();
    first.save(&run.checkpoint()).unwrap();
    let mut later = first.clone();
    later.meta.progress.epoch = 1;
    later.meta.progress.global_epoch = 1;
    faults += sweep(&run.checkpoint(), every, &mut || {
        later
            .save(&run.checkpoint())
            .map_err(|e| eio_accelerated::error_chain(&e))
    });

    let model = experiment::first_members(&first, 1);
    model.save(&run.model()).unwrap();
    let model_later = experiment::first_members(&later, 1);
    faults += sweep(&run.model(), every, &mut || {
        model_later
            .save(&run.model())
            .map_err(|e| eio_accelerated::error_chain(&e))
    });

    run.append_metrics(&record(0)).unwrap();
    faults += sweep(&run.metrics(), every, &mut || {
        run.append_metrics(&record(1))
            .map_err(|e| eio_accelerated::error_chain(&e))
    });

    for file in ["eval.json", "eval.csv"] {
        EvalReport::write(&[eval_report(0.5)], &[], &run.root).unwrap();
        faults += sweep(&run.root.join(file), every, &mut || {
            EvalReport::write(&[eval_report(0.75)], &[], &run.root)
                .map_err(|e| eio_accelerated::error_chain(&e))
        });
    }

    let report = run.root.join("report.md");
    eio_accelerated::safe_write::write_atomically(&report, b"# old report\n").unwrap();
    faults += sweep(&report, every, &mut || {
        eio_accelerated::safe_write::write_atomically(&report, b"# Table 1\n| a | b |\n")
            .map_err(|e| e.to_string())
    });

    let mut plain = config.clone();
    plain.model.n = 1;
    plain.train.method = Method::Baseline;
    let plan = plain.plan().unwrap();
    let states: Vec<_> = [3, 4]
        .iter()
        .map(|&seed| {
            let mut c = plain.clone();
            c.seed = seed;
            train::start(&c, &cpu, DType::F32)
                .unwrap()
                .members
                .remove(0)
        })
        .collect();
    let folded =
        |i: usize| eio_accelerated::derive::FoldedNetwork::fold(&plan, &states[i]).unwrap();
    folded(0).save(&run.folded()).unwrap();
    let next = folded(1);
    faults += sweep(&run.folded(), every, &mut || {
        next.save(&run.folded())
            .map_err(|e| eio_accelerated::error_chain(&e))
    });
    let state_file = run.root.join("state.safetensors");
    states[0].save(&state_file).unwrap();
    faults += sweep(&state_file, every, &mut || {
        states[1]
            .save(&state_file)
            .map_err(|e| eio_accelerated::error_chain(&e))
    });

    // Everything written is intact and named as such by `eio verify`'s checks.
    let report = verify::verify(&run.root).unwrap();
    assert!(!report.has_corrupt(), "{}", report.render());
    let _ = std::fs::remove_dir_all(&dir);
    faults
}

#[test]
fn a_failed_write_of_any_artifact_keeps_the_old_version_and_leaves_no_temporary() {
    let faults = every_artifact(false);
    assert!(faults > 9 * 40, "{faults}");
}

#[test]
#[ignore = "every byte of every artifact; run with: cargo test -p eio-accelerated --test faults -- --ignored --nocapture"]
fn a_failed_write_of_any_artifact_at_every_byte() {
    let faults = every_artifact(true);
    println!("artifact sweep: {faults} injected write faults, every one left the old version and no temporary file");
}

// ---------------------------------------------------------------------------------------------
// Black-box suite generation.

struct Quiet;

impl GenerateProgress for Quiet {
    fn job(&mut self, _: &eio_spec::blackbox::Job, _: usize, _: usize, _: bool) {}
    fn finished(&mut self, _: &eio_spec::blackbox::Job, _: f64) {}
    fn note(&mut self, _: &str) {}
}

struct SuiteSetup {
    config: Config,
    surrogates: Vec<Surrogate>,
    images: SuiteImages,
}

fn suite_setup(dir: &Path) -> SuiteSetup {
    write_cifar(dir, 8);
    let mut config = tiny(dir, 1);
    config.blackbox.eps = vec![0.05];
    config.blackbox.mpgd_starts = 1;
    config.blackbox.losses = vec![AttackLoss::Ce];
    let mut plain = config.clone();
    plain.model.n = 1;
    plain.train.method = Method::Baseline;
    plain.seed = 11;
    let file = dir.join("surrogate.safetensors");
    train::start(&plain, &Device::Cpu, DType::F32)
        .unwrap()
        .save(&file)
        .unwrap();
    let surrogates = vec![Surrogate::load("baseline1", &file, &Device::Cpu, DType::F32).unwrap()];
    let data = eio_data::load(&config, &Seeds::new(config.seed)).unwrap();
    let images = experiment::suite_images(&config, &data);
    SuiteSetup {
        config,
        surrogates,
        images,
    }
}

fn generate(
    s: &SuiteSetup,
    out: &Path,
) -> Result<blackbox::GenerateSummary, blackbox::BlackboxError> {
    blackbox::generate(
        out,
        &s.config,
        &s.surrogates,
        &s.images,
        eio_spec::blackbox::Shard::ALL,
        &Device::Cpu,
        DType::F32,
        &mut Quiet,
        &AtomicBool::new(false),
    )
}

fn job_pixels(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("images").unwrap().data().to_vec()
}

/// Fails the k-th write of a generation (manifest, clean images, then the jobs) after a seeded
/// byte count, for each k in `writes`: the finished jobs stay (and are skipped by the rerun),
/// no temporary file is left, and the rerun gives the uninterrupted suite. Returns the faults.
fn interrupted_generations(every: bool) -> usize {
    let dir = scratch(if every { "suite-every" } else { "suite" });
    let setup = suite_setup(&dir);
    let whole = dir.join("whole");
    let summary = generate(&setup, &whole).unwrap();
    let jobs = summary.jobs;
    assert!(jobs >= 3, "{jobs}");
    let files: Vec<String> = blackbox::read_manifest(&whole)
        .unwrap()
        .jobs
        .iter()
        .map(|j| j.file())
        .collect();
    let writes = 2 + jobs;
    let ks: Vec<usize> = if every {
        (0..writes).collect()
    } else {
        vec![0, 1, 3, writes - 1]
    };
    let tries = if every { 3 } else { 1 };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut faults = 0;
    for &k in &ks {
        for t in 0..tries {
            let out = dir.join(format!("cut-{k}-{t}"));
            let after_bytes = rng.random_range(0..60_000);
            let _guard = fault::arm(Fault {
                file_name: None,
                skip: k,
                step: Step::Write { after_bytes },
                action: Action::Fail(libc::ENOSPC),
            });
            let e = generate(&setup, &out).expect_err("the injected fault stops the generation");
            assert!(!fault::pending(), "write {k} struck");
            faults += 1;
            let text = eio_accelerated::error_chain(&e);
            assert!(text.contains("No space left on device"), "{text}");
            assert!(
                temporaries(&out).is_empty(),
                "write {k}: {:?}",
                temporaries(&out)
            );
            let report = verify::verify(&out).unwrap();
            assert!(!report.has_corrupt(), "write {k}: {}", report.render());
            let finished = k.saturating_sub(2);
            for (j, f) in files.iter().enumerate() {
                assert_eq!(out.join(f).exists(), j < finished, "write {k}: {f}");
            }
            let again = generate(&setup, &out).unwrap();
            assert_eq!(again.skipped, finished, "write {k}: finished jobs are kept");
            assert_eq!(again.generated.len(), jobs - finished);
            for f in &files {
                assert_eq!(
                    job_pixels(&out.join(f)),
                    job_pixels(&whole.join(f)),
                    "write {k}: {f}"
                );
            }
            let report = verify::verify(&out).unwrap();
            assert_eq!(
                report.items[0].status,
                Status::Complete,
                "{}",
                report.render()
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    faults
}

#[test]
fn an_interrupted_suite_generation_keeps_finished_jobs_and_redoes_the_rest() {
    assert_eq!(interrupted_generations(false), 4);
}

#[test]
#[ignore = "every write of a generation, three byte counts each; run with: cargo test -p eio-accelerated --test faults -- --ignored --nocapture"]
fn an_interrupted_suite_generation_at_every_write() {
    let faults = interrupted_generations(true);
    println!("suite generation: {faults} injected write faults, every rerun kept the finished jobs and gave the uninterrupted suite");
}

// ---------------------------------------------------------------------------------------------
// Training killed, stopped by a full disk, damaged.

struct Training {
    dir: PathBuf,
    config: PathBuf,
}

impl Training {
    fn new(name: &str) -> Self {
        let dir = scratch(name);
        write_cifar(&dir, 8);
        let config = tiny_config(&dir, &dir, 3);
        Training { dir, config }
    }

    fn command(&self, out: &Path, resume: bool) -> Command {
        let mut c = eio();
        c.args(["train", "--quiet", "--config"])
            .arg(&self.config)
            .arg("--out")
            .arg(out);
        if resume {
            c.arg("--resume");
        }
        c
    }

    fn with_fault(&self, out: &Path, resume: bool, fault: &str) -> Output {
        self.command(out, resume)
            .env("EIO_TEST_FAULT", fault)
            .output()
            .unwrap()
    }
}

/// The model's tensors as bits, and its counters.
fn weights(run: &Path) -> (Vec<(String, Vec<u32>)>, String) {
    let c = Checkpoint::load(
        &run.join("model.safetensors"),
        &Device::Cpu,
        Some(DType::F32),
    )
    .unwrap();
    let mut out = Vec::new();
    for (m, state) in c.members.iter().enumerate() {
        for (name, t) in &state.tensors {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            out.push((
                format!("{m}.{name}"),
                v.iter().map(|x| x.to_bits()).collect(),
            ));
        }
    }
    let counters = format!(
        "{:?}",
        c.members.iter().map(|s| &s.counters).collect::<Vec<_>>()
    );
    (out, counters)
}

/// The epochs recorded in `metrics.jsonl` (every line must parse).
fn epochs(run: &Path) -> Vec<usize> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<EpochRecord>(l).unwrap().global_epoch)
        .collect()
}

/// Resumes `run` to the end and checks it against the uninterrupted `whole`: bit-identical
/// weights, one record per epoch, no temporary file.
fn resume_and_compare(t: &Training, run: &Path, whole: &Path, what: &str) {
    let out = t.command(run, true).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        weights(run) == weights(whole),
        "{what}: the weights differ from the uninterrupted run"
    );
    assert_eq!(epochs(run), epochs(whole), "{what}: metrics.jsonl");
    assert!(
        temporaries(run).is_empty(),
        "{what}: {:?}",
        temporaries(run)
    );
}

/// Kills `eio train` with SIGKILL at `mid_write` seeded points inside a write (a file, which of
/// its writes, after how many bytes) and at `timed` seeded moments, resuming each run; returns
/// the kill points that struck.
fn kill_points(t: &Training, whole: &Path, mid_write: usize, timed: usize, seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Writes per run of each file (1 pre-training + 3 epochs) and its final size.
    let files = [
        ("config.toml", 1),
        ("metrics.jsonl", 4),
        ("checkpoint.safetensors", 4),
        ("model.safetensors", 1),
    ];
    let mut struck = 0;
    for i in 0..mid_write {
        let (name, writes) = files[rng.random_range(0..files.len())];
        let k = rng.random_range(0..writes);
        let size = std::fs::metadata(whole.join(name)).unwrap().len();
        let bytes = rng.random_range(0..=size);
        let run = t.dir.join(format!("mid-{seed}-{i}"));
        let fault = format!("kill:{k}:{bytes}:{name}");
        let out = t.with_fault(&run, false, &fault);
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{fault}: the process was not killed"
        );
        struck += 1;
        resume_and_compare(t, &run, whole, &fault);
        let _ = std::fs::remove_dir_all(&run);
    }
    let started = Instant::now();
    ok(&t.command(&t.dir.join("timing"), false).output().unwrap());
    let span = started.elapsed();
    for i in 0..timed {
        let run = t.dir.join(format!("timed-{seed}-{i}"));
        let at = span.mul_f64(rng.random_range(0.05..1.0));
        let mut child = t.command(&run, false).spawn().unwrap();
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            struck += 1;
        }
        child.wait().unwrap();
        resume_and_compare(t, &run, whole, &format!("SIGKILL after {at:?}"));
        let _ = std::fs::remove_dir_all(&run);
    }
    struck
}

#[test]
fn training_resumes_bit_identically_after_a_full_disk_kills_and_damage() {
    let t = Training::new("train-faults");
    let whole = t.dir.join("whole");
    ok(&t.command(&whole, false).output().unwrap());
    let checked = verify::verify(&whole).unwrap();
    assert_eq!(
        checked.items[0].status,
        Status::Complete,
        "{}",
        checked.render()
    );

    // A full disk at the second checkpoint: a clear error naming the file, the first
    // checkpoint intact, no temporary file; resuming finishes the same model.
    let full = t.dir.join("full");
    let out = t.with_fault(&full, false, "fail:1:100:checkpoint.safetensors");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("checkpoint.safetensors"), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(temporaries(&full).is_empty(), "{:?}", temporaries(&full));
    let kept = Checkpoint::load(&full.join("checkpoint.safetensors"), &Device::Cpu, None).unwrap();
    assert_eq!(kept.meta.progress.global_epoch, 1);

    // A flipped byte in the checkpoint: `eio verify` and `--resume` name the file.
    let file = full.join("checkpoint.safetensors");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x10;
    std::fs::write(&file, &bad).unwrap();
    let v = eio().arg("verify").arg(&full).output().unwrap();
    let report = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "{report}");
    assert!(
        report.contains("CORRUPT") && report.contains("checkpoint.safetensors"),
        "{report}"
    );
    assert!(report.contains("checksum mismatch"), "{report}");
    let refused = t.command(&full, true).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("checkpoint.safetensors") && stderr.contains("checksum"),
        "{stderr}"
    );
    std::fs::write(&file, &good).unwrap();

    // A torn last metrics line (a half-copied file: epoch 0's line cut, epoch 1's gone): verify
    // calls it partial, resume cuts it, restores epoch 0's record from the checkpoint and
    // re-runs epoch 1.
    let metrics = full.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let first = text.lines().next().unwrap();
    std::fs::write(&metrics, &first[..first.len() - 9]).unwrap();
    let v = eio().arg("verify").arg(&full).output().unwrap();
    let report = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success(), "{report}");
    assert!(
        report.contains("partial") && report.contains("torn last line"),
        "{report}"
    );
    let out = t.command(&full, true).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("torn last line") && stderr.contains("restored the record"),
        "{stderr}"
    );
    assert!(
        weights(&full) == weights(&whole),
        "the weights differ after a full disk"
    );
    assert_eq!(epochs(&full), epochs(&whole));

    // SIGKILL inside two seeded writes and at one seeded moment.
    assert!(kill_points(&t, &whole, 2, 1, 1) >= 2);
    let _ = std::fs::remove_dir_all(&t.dir);
}

#[test]
#[ignore = "60 seeded kill points; run with: cargo test -p eio-accelerated --test faults -- --ignored --nocapture"]
fn training_killed_at_many_seeded_moments_resumes_bit_identically() {
    let t = Training::new("train-kills");
    let whole = t.dir.join("whole");
    ok(&t.command(&whole, false).output().unwrap());
    let (mid, timed) = (40, 20);
    let struck = kill_points(&t, &whole, mid, timed, 2024);
    println!(
        "training: {struck} SIGKILLs struck ({mid} mid-write, {} of {timed} timed; the rest finished first), every resumed run bit-identical to the uninterrupted one",
        struck - mid
    );
    let _ = std::fs::remove_dir_all(&t.dir);
}

// ---------------------------------------------------------------------------------------------
// A killed and a damaged black-box generation, through the command.

#[test]
fn a_killed_or_damaged_suite_generation_is_detected_and_redone() {
    let dir = scratch("suite-kill");
    write_cifar(&dir, 8);
    let config = tiny_config(&dir, &dir, 1);
    let c = config.to_str().unwrap();
    let surrogates = dir.join("surrogates");
    ok(&eio()
        .args([
            "blackbox",
            "surrogates",
            "--quiet",
            "--config",
            c,
            "--set",
            "blackbox.surrogate_sizes=[1]",
            "--set",
            "blackbox.surrogate_seeds=[11]",
            "--out",
        ])
        .arg(&surrogates)
        .output()
        .unwrap());
    let generate = |out: &Path| {
        let mut cmd = eio();
        cmd.args(["blackbox", "generate", "--config", c])
            .args([
                "--set",
                "blackbox.surrogate_sizes=[1]",
                "--set",
                "blackbox.surrogate_seeds=[11]",
            ])
            .args(["--set", "blackbox.eps=[0.05]", "--surrogates"])
            .arg(&surrogates)
            .arg("--out")
            .arg(out);
        cmd
    };
    let whole = dir.join("whole");
    ok(&generate(&whole).output().unwrap());
    let jobs = blackbox::read_manifest(&whole).unwrap().jobs;
    let files: Vec<String> = jobs.iter().map(|j| j.file()).collect();

    // SIGKILL half-way through the fourth job file.
    let cut = dir.join("cut");
    let out = generate(&cut)
        .env("EIO_TEST_FAULT", "kill:5:20000")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        temporaries(&cut).len(),
        1,
        "the killed write's temporary file"
    );
    let v = eio().arg("verify").arg(&cut).output().unwrap();
    let report = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success(), "{report}");
    assert!(
        report.contains(&format!("3 of {} job files intact", jobs.len())),
        "{report}"
    );
    assert!(report.contains("stale"), "{report}");
    let rerun = generate(&cut).output().unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(stderr.contains("removed 1 temporary file"), "{stderr}");
    assert!(
        stderr.contains(&format!("{} jobs, 3 done before", jobs.len())),
        "{stderr}"
    );
    assert!(temporaries(&cut).is_empty());

    // A flipped byte in a finished job file: named by verify, redone by generate.
    let damaged = cut.join(&files[1]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&damaged, &bytes).unwrap();
    let v = eio().arg("verify").arg(&cut).output().unwrap();
    let report = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success(), "{report}");
    assert!(
        report.contains("CORRUPT") && report.contains(&files[1]),
        "{report}"
    );
    let rerun = generate(&cut).output().unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{} done before, 1 generated", jobs.len() - 1)),
        "{stderr}"
    );
    for f in &files {
        assert_eq!(job_pixels(&cut.join(f)), job_pixels(&whole.join(f)), "{f}");
    }
    let v = eio().arg("verify").arg(&cut).output().unwrap();
    let report = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success() && report.contains("complete"),
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

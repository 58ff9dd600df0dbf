//! Training runs, checkpoints and derivation: a run stopped at any point and resumed from its
//! checkpoint ends bit-identical to an uninterrupted one (CPU, every method); checkpoints
//! reject damaged files and other configs with errors that say what is wrong; a derived path
//! computes what the RGN computes on that path; folded conv+BN gives the unfolded logits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use eio_accelerated::checkpoint::{phase_sgd_config, Checkpoint, CheckpointError, Phase};
use eio_accelerated::derive::{derive_path, FoldedNetwork};
use eio_accelerated::model::logits;
use eio_accelerated::optim::Optimiser;
use eio_accelerated::state::ModelState;
use eio_accelerated::train::{self, BatchEvent, EpochRecord, Flow, Observer, Outcome, TrainError};
use eio_data::feed::augment_stream_index;
use eio_data::{Augment, DataSplits, EpochPlan, ImageShape, Images};
use eio_spec::config::{BnMode, Config, Method, PretrainSchedule, Sharing};
use eio_spec::rng::{Seeds, Stream};
use eio_spec::Path;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A tiny config: ResNet-8 at width 0.25 on 3x8x8 images, 4 classes, batch 8.
fn tiny(method: Method) -> Config {
    let mut c = Config {
        seed: 7,
        ..Config::default()
    };
    c.model.depth = 8;
    c.model.width = 0.25;
    c.model.classes = 4;
    c.model.input_size = 8;
    c.model.sharing = Sharing::Independent;
    c.model.n = if method.is_ensemble() { 1 } else { 2 };
    if matches!(method, Method::Adp | Method::Gal | Method::Trs) {
        c.train.optimizer = eio_spec::config::Optimizer::Adam;
        c.train.lr = 1e-3;
    }
    c.trs.pgd_steps = 2;
    c.train.method = method;
    c.train.epochs = 2;
    c.train.batch_size = 8;
    c.train.milestones = vec![1];
    c.train.ensemble_size = 2;
    c.train.adv.steps = 2;
    c.eio.p = 2;
    c.eio.pretrain_epochs = 1;
    c.distill.steps = 2;
    c.data.validation = 6;
    c.data.crop_padding = 2;
    c.eval.batch_size = 5;
    c.derive.finetune_epochs = 2;
    c.validate().expect("the tiny config is valid");
    c
}

/// Seeded random pixel bytes (20 train — the last batch is partial —, 6 validation, 10 test); no
/// validation images when `data.validation = 0`.
fn data(config: &Config) -> DataSplits {
    let shape = ImageShape::new(3, config.model.input_size, config.model.input_size);
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut images = |n: usize| {
        let pixels = (0..n * shape.len()).map(|_| rng.random::<u8>()).collect();
        let labels = (0..n).map(|i| (i % config.model.classes) as u32).collect();
        Images::new(shape, pixels, labels).expect("consistent sizes")
    };
    let train = images(20);
    let validation = images(6);
    let test = images(10);
    DataSplits {
        train,
        validation: if config.data.validation == 0 {
            Images::new(shape, Vec::new(), Vec::new()).expect("an empty set")
        } else {
            validation
        },
        test,
        classes: (0..config.model.classes).map(|c| format!("c{c}")).collect(),
        source: "synthetic".into(),
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eio-training-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Stops after a given number of epochs or batches (a simulated kill, with the checkpoint the
/// run itself wrote), and collects the epoch records.
struct StopAt {
    epochs: Option<usize>,
    batches: Option<usize>,
    seen_batches: usize,
    flag: AtomicBool,
    records: Vec<EpochRecord>,
}

impl StopAt {
    fn never() -> Self {
        StopAt {
            epochs: None,
            batches: None,
            seen_batches: 0,
            flag: AtomicBool::new(false),
            records: Vec::new(),
        }
    }
}

impl Observer for StopAt {
    fn phase(&mut self, _: Phase, _: usize, _: usize, _: usize) {}
    fn batch(&mut self, _: &BatchEvent) {
        self.seen_batches += 1;
        if Some(self.seen_batches) == self.batches {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
    fn epoch(&mut self, record: &EpochRecord) -> Result<Flow, TrainError> {
        self.records.push(record.clone());
        Ok(if Some(self.records.len()) == self.epochs {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
}

fn run(
    checkpoint: &mut Checkpoint,
    data: &DataSplits,
    file: &std::path::Path,
    observer: &mut StopAt,
) -> Outcome {
    let mut persist = file.to_path_buf();
    let flag = AtomicBool::new(false);
    // The observer raises its own flag mid-epoch; mirror it into the interrupt the loop polls.
    struct Relay<'a> {
        inner: &'a mut StopAt,
        flag: &'a AtomicBool,
    }
    impl Observer for Relay<'_> {
        fn phase(&mut self, p: Phase, e: usize, n: usize, b: usize) {
            self.inner.phase(p, e, n, b);
        }
        fn batch(&mut self, event: &BatchEvent) {
            self.inner.batch(event);
            if self.inner.flag.load(Ordering::SeqCst) {
                self.flag.store(true, Ordering::SeqCst);
            }
        }
        fn epoch(&mut self, r: &EpochRecord) -> Result<Flow, TrainError> {
            self.inner.epoch(r)
        }
    }
    let mut relay = Relay {
        inner: observer,
        flag: &flag,
    };
    train::train(
        checkpoint,
        data,
        &Device::Cpu,
        &mut relay,
        &mut persist,
        &flag,
    )
    .expect("training runs")
}

fn assert_bit_identical(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.members.len(), b.members.len());
    for (x, y) in a.members.iter().zip(&b.members) {
        assert_eq!(x.counters, y.counters, "BatchNorm counters differ");
        for (name, t) in &x.tensors {
            let u = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v = y.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let same = u.iter().zip(&v).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "tensor {name} differs after resume");
        }
    }
    for (x, y) in a.optimisers.iter().zip(&b.optimisers) {
        let (u, v) = (optimiser_tensors(x), optimiser_tensors(y));
        assert_eq!(
            u.len(),
            v.len(),
            "optimiser state sizes differ after resume"
        );
        for ((name, bu), (other, bv)) in u.iter().zip(&v) {
            assert_eq!(name, other);
            assert_eq!(bu, bv, "optimiser state {name} differs after resume");
        }
    }
    assert_eq!(a.meta.progress, b.meta.progress);
}

/// Every tensor of an optimiser's state as (name, f32 bits): SGD momentum buffers, or Adam's
/// moments and step counts.
fn optimiser_tensors(o: &Optimiser) -> Vec<(String, Vec<u32>)> {
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    match o {
        Optimiser::Sgd(sgd) => sgd
            .buffers()
            .iter()
            .map(|(name, t)| (name.clone(), bits(t)))
            .collect(),
        Optimiser::Adam(adam) => adam
            .states()
            .iter()
            .flat_map(|(name, st)| {
                [
                    (format!("{name}.exp_avg"), bits(&st.exp_avg)),
                    (format!("{name}.exp_avg_sq"), bits(&st.exp_avg_sq)),
                    (format!("{name}.step"), vec![st.step as u32]),
                ]
            })
            .collect(),
    }
}

fn sgd(o: &mut Optimiser) -> &mut eio_accelerated::optim::Sgd {
    match o {
        Optimiser::Sgd(sgd) => sgd,
        Optimiser::Adam(_) => panic!("expected SGD"),
    }
}

/// Uninterrupted vs stopped (after `epochs` epochs or `batches` batches), reloaded from the
/// file the run wrote, and resumed.
fn kill_and_resume(method: Method, epochs: Option<usize>, batches: Option<usize>) {
    kill_and_resume_with(tiny(method), epochs, batches);
}

fn kill_and_resume_with(config: Config, epochs: Option<usize>, batches: Option<usize>) {
    let method = config.train.method;
    let data = data(&config);
    let dir = scratch(&format!(
        "{method:?}-{epochs:?}-{batches:?}-v{}",
        config.data.validation
    ));
    let whole_file = dir.join("whole.safetensors");
    let mut whole = train::start(&config, &Device::Cpu, DType::F32).unwrap();
    let mut observer = StopAt::never();
    assert_eq!(
        run(&mut whole, &data, &whole_file, &mut observer),
        Outcome::Finished
    );
    let whole_records = observer.records;

    let file = dir.join("killed.safetensors");
    let mut first = train::start(&config, &Device::Cpu, DType::F32).unwrap();
    let mut stopper = StopAt {
        epochs,
        batches,
        ..StopAt::never()
    };
    assert_eq!(
        run(&mut first, &data, &file, &mut stopper),
        Outcome::Interrupted
    );
    drop(first); // everything continues from the file alone
    let mut resumed = Checkpoint::load(&file, &Device::Cpu, None).unwrap();
    resumed.check_config(&config, &file).unwrap();
    let mut rest = StopAt::never();
    assert_eq!(
        run(&mut resumed, &data, &file, &mut rest),
        Outcome::Finished
    );
    assert_bit_identical(&whole, &resumed);
    let mut records = stopper.records;
    records.extend(rest.records);
    let strip = |r: &[EpochRecord]| -> Vec<(Phase, usize, String, String, String)> {
        r.iter()
            .map(|r| {
                (
                    r.phase,
                    r.global_epoch,
                    format!("{:.6}", r.loss),
                    format!("{:?}", r.validation_accuracy),
                    format!("{:?}", r.test_accuracy),
                )
            })
            .collect()
    };
    assert_eq!(
        strip(&whole_records),
        strip(&records),
        "epoch metrics differ"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eio_resumes_bit_identically_after_an_epoch() {
    kill_and_resume(Method::Eio, Some(1), None);
}

#[test]
fn eio_resumes_bit_identically_mid_epoch() {
    // 20 images at batch 8: 3 batches an epoch; stop after batch 2 of the second (main) epoch.
    kill_and_resume(Method::Eio, None, Some(5));
}

#[test]
fn eio_without_a_holdout_resumes_bit_identically_mid_epoch() {
    // data.validation = 0 (every training image, the CIFAR presets): test accuracy per epoch;
    // x_t augmented from its own stream (eio.target_augment, the default).
    let mut config = tiny(Method::Eio);
    config.data.validation = 0;
    assert!(config.eio.target_augment && config.data.augment);
    kill_and_resume_with(config, None, Some(5));
}

#[test]
fn baseline_ensemble_resumes_bit_identically() {
    kill_and_resume(Method::Baseline, None, Some(2));
}

#[test]
fn advt_resumes_bit_identically() {
    kill_and_resume(Method::Advt, Some(1), None);
}

#[test]
fn rival_ensembles_resume_bit_identically_mid_epoch() {
    // One Adam over the members (ADP, GAL, TRS: moments and step counts in the checkpoint),
    // per-member SGD (DVERGE: the layer drawn per epoch, x_t paired and augmented); GAL's
    // noise and TRS's PGD starts come from their seeded streams.
    for method in [Method::Adp, Method::Gal, Method::Trs, Method::Dverge] {
        kill_and_resume(method, None, Some(4));
    }
}

#[test]
fn dverge_starts_from_the_ensemble_named_by_init_from() {
    let baseline_config = tiny(Method::Baseline);
    let dir = scratch("dverge-init");
    let init = dir.join("baseline.safetensors");
    let mut baseline = train::start(&baseline_config, &Device::Cpu, DType::F32).unwrap();
    run(
        &mut baseline,
        &data(&baseline_config),
        &init,
        &mut StopAt::never(),
    );
    let mut config = tiny(Method::Dverge);
    config.dverge.init_from = init.display().to_string();
    let started = train::start(&config, &Device::Cpu, DType::F32).unwrap();
    for (a, b) in started.members.iter().zip(&baseline.members) {
        for (name, t) in &a.tensors {
            let (u, v) = (
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.tensors[name]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            assert_eq!(u, v, "member tensor {name} is not the baseline's");
        }
    }
    // A different ensemble size is refused, naming the file and both sizes.
    config.train.ensemble_size = 3;
    let err = train::start(&config, &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("baseline.safetensors") && err.contains("2 member") && err.contains('3'),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn phases_run_in_order_with_their_learning_rates() {
    let config = tiny(Method::Eio);
    let data = data(&config);
    let dir = scratch("phases");
    let mut c = train::start(&config, &Device::Cpu, DType::F32).unwrap();
    let mut observer = StopAt::never();
    run(&mut c, &data, &dir.join("c.safetensors"), &mut observer);
    let seen: Vec<(Phase, usize, f64)> = observer
        .records
        .iter()
        .map(|r| (r.phase, r.epoch, r.lr))
        .collect();
    let lr = config.train.lr;
    assert_eq!(
        seen,
        vec![
            (Phase::Pretrain, 0, lr),
            (Phase::Main, 0, lr),
            (Phase::Main, 1, lr * config.train.lr_gamma),
        ]
    );
    assert!(observer.records.iter().all(|r| r.images == 20));
    assert!(observer.records[1].distill_loss.is_some());
    assert!(observer.records[0].train_accuracy.is_some());
    assert_eq!(c.meta.progress.phase, Phase::Done);
    assert_eq!(c.meta.progress.iteration, 9);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_baseline_must_be_a_plain_network() {
    let mut config = tiny(Method::Baseline);
    config.model.n = 2;
    let err = train::start(&config, &Device::Cpu, DType::F32).unwrap_err();
    assert!(err.to_string().contains("model.n = 1"), "{err}");
}

#[test]
fn checkpoints_round_trip_and_reject_damage() {
    let config = tiny(Method::Eio);
    let dir = scratch("damage");
    let file = dir.join("c.safetensors");
    let mut c = train::start(&config, &Device::Cpu, DType::F32).unwrap();
    let mut observer = StopAt {
        epochs: Some(1),
        ..StopAt::never()
    };
    run(&mut c, &data(&config), &file, &mut observer);
    let back = Checkpoint::load(&file, &Device::Cpu, None).unwrap();
    assert_bit_identical(&c, &back);
    assert_eq!(back.meta, c.meta);

    // Another config.
    let mut other = config.clone();
    other.distill.eps = 0.05;
    match back.check_config(&other, &file) {
        Err(CheckpointError::ConfigMismatch { differences, .. }) => {
            assert!(differences.contains("distill.eps"), "{differences}")
        }
        r => panic!("expected a config mismatch, got {r:?}"),
    }

    // Truncated.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Checkpoint::load(&cut, &Device::Cpu, None).unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("cut.safetensors"), "{err}");

    // A plain safetensors file without eio metadata.
    let plain = dir.join("plain.safetensors");
    c.members[0].save(&plain).unwrap();
    let err = Checkpoint::load(&plain, &Device::Cpu, None).unwrap_err();
    assert!(matches!(err, CheckpointError::NoMetadata { .. }), "{err}");

    // A missing tensor.
    let mut missing = c.clone();
    let name = missing.members[0].tensors.keys().nth(3).unwrap().clone();
    missing.members[0].tensors.remove(&name);
    let holed = dir.join("holed.safetensors");
    missing.save(&holed).unwrap();
    match Checkpoint::load(&holed, &Device::Cpu, None).unwrap_err() {
        CheckpointError::MissingTensor { name: n, .. } => assert_eq!(n, name),
        e => panic!("expected a missing tensor, got {e}"),
    }

    // No file at all.
    let err = Checkpoint::load(&dir.join("absent.safetensors"), &Device::Cpu, None).unwrap_err();
    assert!(matches!(err, CheckpointError::Read { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An RGN state whose BatchNorm statistics and affine parameters are not the initial 0/1
/// (so that a wrong candidate or a wrong fold would show).
fn perturbed_state(config: &Config, dtype: DType) -> ModelState {
    let plan = config.plan().unwrap();
    let mut state = ModelState::init(&plan, &Seeds::new(3), 0, &Device::Cpu, dtype).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (name, t) in state.tensors.iter_mut() {
        if name.contains("running_var") || name.ends_with(".1.weight") {
            let n = t.elem_count();
            let v: Vec<f64> = (0..n).map(|_| rng.random_range(0.5..1.5)).collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
        } else if name.contains("running_mean") || name.ends_with(".1.bias") {
            let n = t.elem_count();
            let v: Vec<f64> = (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
            *t = Tensor::from_vec(v, t.dims(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
        }
    }
    state
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn a_derived_path_computes_what_the_rgn_computes_on_it() {
    for sharing in [Sharing::Independent, Sharing::SharedConv] {
        let mut config = tiny(Method::Eio);
        config.model.sharing = sharing;
        let plan = config.plan().unwrap();
        let state = perturbed_state(&config, DType::F64);
        let data = data(&config);
        let (x, _) =
            train::range_tensors(&data.test, 0..data.test.len(), &Device::Cpu, DType::F64).unwrap();
        for bits in [0u128, 1, 0b1011010] {
            let path = plan.path_space().path_at(bits).unwrap();
            let (derived_config, derived) = derive_path(&config, &state, &path).unwrap();
            assert_eq!(derived_config.model.n, 1);
            let plain = derived_config.plan().unwrap();
            let (z_rgn, _) = logits(&plan, &state, &path, &x, BnMode::Eval).unwrap();
            let zeros = Path::new(vec![0; plain.k()]);
            let (z, _) = logits(&plain, &derived, &zeros, &x, BnMode::Eval).unwrap();
            assert_eq!(max_abs_diff(&z_rgn, &z), 0.0, "{sharing:?} path {path}");
        }
        // Different paths really differ (the test would catch a derive that ignores the path).
        let a = plan.path_space().path_at(0).unwrap();
        let b = plan.path_space().path_at(1).unwrap();
        let (za, _) = logits(&plan, &state, &a, &x, BnMode::Eval).unwrap();
        let (zb, _) = logits(&plan, &state, &b, &x, BnMode::Eval).unwrap();
        assert!(max_abs_diff(&za, &zb) > 1e-6);
    }
}

#[test]
fn folded_batch_norm_gives_the_unfolded_logits() {
    for (dtype, bound) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
        let mut config = tiny(Method::Baseline);
        config.model.n = 1;
        let plan = config.plan().unwrap();
        let state = perturbed_state(&config, dtype);
        let data = data(&config);
        let (x, _) =
            train::range_tensors(&data.test, 0..data.test.len(), &Device::Cpu, dtype).unwrap();
        let folded = FoldedNetwork::fold(&plan, &state).unwrap();
        let summary = folded.summary();
        assert_eq!(summary.unfolded_batch_norms, 0);
        assert_eq!(
            summary.folded_pairs, 9,
            "ResNet-8: 7 gated + 2 shortcut conv+BN pairs"
        );
        let zeros = Path::new(vec![0; plan.k()]);
        let (z, _) = logits(&plan, &state, &zeros, &x, BnMode::Eval).unwrap();
        let zf = folded.logits(&x).unwrap();
        let diff = max_abs_diff(&z, &zf);
        assert!(diff <= bound, "{dtype:?}: folded logits differ by {diff}");
        // No BatchNorm tensors remain in the deployment file; every conv has a bias.
        let tensors = folded.tensors().unwrap();
        assert!(tensors.keys().all(|k| !k.contains("running_")));
        let convs = tensors
            .keys()
            .filter(|k| k.ends_with(".0.bias") || k.contains("downsample.0.bias"))
            .count();
        assert_eq!(convs, 9);
    }
}

#[test]
fn pretraining_follows_the_step_schedule_or_a_constant_rate() {
    let mut config = Config::default();
    assert_eq!(config.eio.pretrain_schedule, PretrainSchedule::Step);
    let lr = |c: &Config, phase, e| train::learning_rate(c, phase, e);
    // The authors' warm-up: lr 0.1, x0.1 at 100 and 150, from pre-training epoch 0; the main
    // phase starts again at 0.1.
    for (e, want) in [
        (0, 0.1),
        (99, 0.1),
        (100, 0.01),
        (149, 0.01),
        (150, 0.001),
        (199, 0.001),
    ] {
        assert!(
            (lr(&config, Phase::Pretrain, e) - want).abs() < 1e-15,
            "epoch {e}"
        );
        assert_eq!(
            lr(&config, Phase::Pretrain, e),
            lr(&config, Phase::Main, e),
            "epoch {e}"
        );
    }
    config.eio.pretrain_schedule = PretrainSchedule::Constant;
    for e in [0, 100, 150, 199] {
        assert_eq!(lr(&config, Phase::Pretrain, e), 0.1, "epoch {e}");
    }
    assert!((lr(&config, Phase::Main, 150) - 0.001).abs() < 1e-15);
}

#[test]
fn pretraining_epochs_run_on_the_step_schedule() {
    let mut config = tiny(Method::Eio);
    config.eio.pretrain_epochs = 2;
    config.train.epochs = 1;
    let data = data(&config);
    let dir = scratch("pretrain-step");
    let mut c = train::start(&config, &Device::Cpu, DType::F32).unwrap();
    let mut observer = StopAt::never();
    run(&mut c, &data, &dir.join("c.safetensors"), &mut observer);
    let seen: Vec<(Phase, usize, f64)> = observer
        .records
        .iter()
        .map(|r| (r.phase, r.epoch, r.lr))
        .collect();
    let lr = config.train.lr;
    assert_eq!(
        seen,
        vec![
            (Phase::Pretrain, 0, lr),
            (Phase::Pretrain, 1, lr * config.train.lr_gamma),
            (Phase::Main, 0, lr),
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fine_tuning_has_its_own_nesterov_switch() {
    let mut config = tiny(Method::Eio);
    config.train.nesterov = true;
    config.derive.nesterov = false;
    for phase in [Phase::Pretrain, Phase::Main] {
        assert!(phase_sgd_config(&config, phase, 0.1).nesterov, "{phase:?}");
    }
    let finetune = phase_sgd_config(&config, Phase::Finetune, 0.001);
    assert!(!finetune.nesterov);
    assert_eq!(
        (finetune.lr, finetune.momentum, finetune.weight_decay),
        (0.001, config.train.momentum, config.train.weight_decay)
    );

    // A derived path's fine-tuning checkpoint: plain momentum, also after a save and load.
    let plan = config.plan().unwrap();
    let state = perturbed_state(&config, DType::F32);
    let path = plan.path_space().path_at(5).unwrap();
    let (derived_config, derived) = derive_path(&config, &state, &path).unwrap();
    assert!(derived_config.train.nesterov && !derived_config.derive.nesterov);
    let model = eio_accelerated::checkpoint::ModelKind::Derived {
        path: path.to_string(),
        from: "rgn.safetensors".into(),
    };
    let mut c = train::start_finetune(&derived_config, model, derived, DType::F32);
    assert!(!sgd(&mut c.optimisers[0]).config.nesterov);
    // An optimiser made with the training settings is reset to the phase's when training runs.
    sgd(&mut c.optimisers[0]).config.nesterov = true;
    let dir = scratch("finetune-nesterov");
    let file = dir.join("c.safetensors");
    let mut observer = StopAt {
        epochs: Some(1),
        ..StopAt::never()
    };
    run(&mut c, &data(&derived_config), &file, &mut observer);
    assert!(!sgd(&mut c.optimisers[0]).config.nesterov);
    let back = Checkpoint::load(&file, &Device::Cpu, None).unwrap();
    assert_eq!(back.meta.progress.phase, Phase::Finetune);
    let mut back = back;
    assert!(!sgd(&mut back.optimisers[0]).config.nesterov);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_holdout_the_epoch_accuracy_is_test_accuracy() {
    for validation in [0, 6] {
        let mut config = tiny(Method::Eio);
        config.data.validation = validation;
        let data = data(&config);
        assert_eq!(data.validation.len(), validation);
        let dir = scratch(&format!("test-accuracy-{validation}"));
        let mut c = train::start(&config, &Device::Cpu, DType::F32).unwrap();
        let mut observer = StopAt::never();
        run(&mut c, &data, &dir.join("c.safetensors"), &mut observer);
        for r in &observer.records {
            if validation == 0 {
                assert_eq!(r.validation_accuracy, None, "{r:?}");
                let t = r.test_accuracy.expect("test accuracy without a hold-out");
                assert!((0.0..=1.0).contains(&t));
                // Ten test images: a multiple of 1/10.
                assert!(((t * 10.0) - (t * 10.0).round()).abs() < 1e-9, "{t}");
            } else {
                assert_eq!(r.test_accuracy, None, "{r:?}");
                assert!(r.validation_accuracy.is_some());
            }
            // metrics.jsonl round trip keeps the two apart.
            let line = serde_json::to_string(r).unwrap();
            assert!(line.contains("\"test_accuracy\""));
            let back: EpochRecord = serde_json::from_str(&line).unwrap();
            assert_eq!(
                (back.validation_accuracy, back.test_accuracy),
                (r.validation_accuracy, r.test_accuracy)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn target_images_are_augmented_from_their_own_stream() {
    let seeds = Seeds::new(7);
    let aug = Augment {
        padding: 2,
        flip: true,
    };
    // The same draw algorithm as a source batch's: EpochPlan's draws at the same index.
    let plan = EpochPlan::new(20, 8, 3, &seeds);
    for b in 0..plan.batches() {
        let n = plan.batch_indices(b).len();
        let index = augment_stream_index(3, b);
        assert_eq!(
            train::augment_draws(n, aug, &mut seeds.stream(Stream::Augmentation, index)),
            plan.augment_draws(b, aug)
        );
        // The target's index has bit 63 set: another stream position, other draws.
        let target = train::TARGET_AUGMENTATION | index;
        assert_ne!(target, index);
        assert_ne!(
            train::augment_draws(n, aug, &mut seeds.stream(Stream::Augmentation, target)),
            plan.augment_draws(b, aug)
        );
    }
    assert!(augment_stream_index((1 << 31) - 1, u32::MAX as usize) < train::TARGET_AUGMENTATION);

    // The switch changes training (x_t differs), and off it means no crops or flips of x_t.
    let run_with = |target_augment: bool| {
        let mut config = tiny(Method::Eio);
        config.eio.target_augment = target_augment;
        let data = data(&config);
        let dir = scratch(&format!("target-augment-{target_augment}"));
        let mut c = train::start(&config, &Device::Cpu, DType::F32).unwrap();
        let mut observer = StopAt::never();
        run(&mut c, &data, &dir.join("c.safetensors"), &mut observer);
        let _ = std::fs::remove_dir_all(&dir);
        observer.records[1].distill_loss.expect("an EIO epoch")
    };
    let (on, off) = (run_with(true), run_with(false));
    assert_ne!(
        on.to_bits(),
        off.to_bits(),
        "x_t augmentation changes Eq. 2"
    );
}

/// Evaluation runs its batches concurrently on rayon's pool, converting each batch's bytes as
/// it runs: clean accuracy and the all-or-nothing PGD figures must be the same on 1, 2 and 3
/// threads (the same as one batch after another), the clean accuracy must be the count of
/// right first-maximum predictions over all images at once, and progress must come in order.
#[test]
fn evaluation_does_not_depend_on_the_thread_count() {
    use eio_accelerated::attack::Target;
    use eio_accelerated::evaluate::evaluate_images;
    let mut config = tiny(Method::Eio);
    config.eval.eps = vec![0.01, 0.05];
    config.eval.steps = 2;
    config.eval.restarts = 2;
    config.eval.batch_size = 3;
    let plan = config.plan().unwrap();
    let state = perturbed_state(&config, DType::F32);
    let path = plan.path_space().path_at(1).unwrap();
    let target = Target::Path {
        plan: &plan,
        state: &state,
        path: &path,
        mode: BnMode::Eval,
    };
    let test = data(&config).test;
    let seeds = Seeds::new(config.seed);
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool")
            .install(|| {
                let mut calls = Vec::new();
                let report = evaluate_images(
                    &target,
                    &target,
                    &test,
                    &config.eval,
                    &seeds,
                    &Device::Cpu,
                    DType::F32,
                    &mut |b, n| calls.push((b, n)),
                )
                .unwrap();
                let mut unread = ChaCha8Rng::seed_from_u64(0);
                let clean =
                    train::accuracy(&target, &test, 3, &Device::Cpu, DType::F32, &mut unread)
                        .unwrap();
                (report, calls, clean)
            })
    };
    let (one, calls, clean) = on(1);
    assert_eq!(calls, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    let (x, _) = train::range_tensors(&test, 0..test.len(), &Device::Cpu, DType::F32).unwrap();
    let right = target
        .predict(&x, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap()
        .iter()
        .zip(&test.labels)
        .filter(|(p, &y)| **p == y as usize)
        .count();
    assert_eq!(clean, right as f64 / test.len() as f64);
    assert_eq!(one.clean_accuracy, clean);
    assert_eq!(one.per_eps.len(), 2);
    assert_eq!(one.per_eps[0].robustness.robust.len(), test.len());
    for threads in [2, 3] {
        let (other, other_calls, other_clean) = on(threads);
        assert_eq!(other, one, "{threads} threads");
        assert_eq!(other_calls, calls, "{threads} threads");
        assert_eq!(other_clean.to_bits(), clean.to_bits(), "{threads} threads");
    }
}

/// `batches_in_parallel` hands results on in batch order, stops at the first failing batch in
/// that order, and never has more than `threads` batches in flight.
#[test]
fn batches_in_parallel_keeps_order_and_bounds_the_batches_in_flight() {
    use std::sync::atomic::AtomicUsize;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("thread pool");
    for threads in [1, 2, 3] {
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut seen = Vec::new();
        pool.install(|| {
            train::batches_in_parallel(
                10,
                threads,
                |b| {
                    let inside = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(inside, Ordering::SeqCst);
                    // Later batches of a group finish first.
                    std::thread::sleep(std::time::Duration::from_millis(5 * (3 - b as u64 % 3)));
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<usize, String>(b * b)
                },
                |b, v| {
                    seen.push((b, v));
                    Ok(())
                },
            )
            .unwrap();
        });
        assert_eq!(seen, (0..10).map(|b| (b, b * b)).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) <= threads, "{threads} threads");
    }
    let mut seen = Vec::new();
    let err = pool.install(|| {
        train::batches_in_parallel(
            7,
            3,
            |b| {
                if b == 4 || b == 5 {
                    Err(format!("batch {b}"))
                } else {
                    Ok(b)
                }
            },
            |b, _| {
                seen.push(b);
                Ok(())
            },
        )
    });
    assert_eq!(err, Err("batch 4".to_string()));
    assert_eq!(seen, vec![0, 1, 2, 3]);
    // `done` runs on the calling thread (it need not be Send, as a progress bar is not), and
    // its error stops the run; 0 threads means 1.
    let not_send = std::rc::Rc::new(std::cell::Cell::new(0));
    let err = train::batches_in_parallel(9, 0, Ok::<usize, String>, |b, _| {
        not_send.set(not_send.get() + 1);
        if b == 2 {
            Err("done 2".to_string())
        } else {
            Ok(())
        }
    });
    assert_eq!(err, Err("done 2".to_string()));
    assert_eq!(not_send.get(), 3);
}

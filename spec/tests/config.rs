//! Config reading: defaults are the paper, presets differ where protocols.md says, errors
//! name the file and line, overrides apply. Each preset value against its documented source is
//! `tests/preset_sources.rs`.

use eio_spec::config::{
    Activation, Arch, BnMode, Dataset, LayerSchedule, LossScale, Method, Optimizer,
    PretrainSchedule, Sharing, UnusedParams, VggGating,
};
use eio_spec::plan::FeatureSite;
use eio_spec::{Config, Preset};

/// The presets that train a rival method (`spec/SPEC.md`, "Rival methods").
const RIVAL_PRESETS: [Preset; 6] = [
    Preset::Dverge3,
    Preset::Dverge5,
    Preset::Dverge8,
    Preset::Adp3,
    Preset::Gal3,
    Preset::Trs3,
];

/// A separate check from the source tables: `Config::default` is the paper's preset, so a
/// config file that omits a field gets the paper's value.
#[test]
fn paper_preset_is_the_default() {
    assert_eq!(Preset::Paper.config().unwrap(), Config::default());
}

#[test]
fn cifar_presets_train_as_the_authors_did() {
    for preset in [
        Preset::Paper,
        Preset::Official,
        Preset::Dverge,
        Preset::Vgg16,
    ] {
        let c = preset.config().unwrap();
        let name = preset.name();
        assert_eq!(c.data.dataset, Dataset::Cifar10, "{name}");
        assert_eq!(c.data.validation, 0, "{name}: all 50,000 training images");
        assert_eq!(c.data.train_limit, None, "{name}");
        assert_eq!(c.eio.pretrain_epochs, 200, "{name}: E_w = 200");
        assert_eq!(c.eio.pretrain_schedule, PretrainSchedule::Step, "{name}");
        assert!(
            c.eio.target_augment && c.data.augment,
            "{name}: augmented x_t"
        );
        assert_eq!(
            (c.train.lr, c.train.milestones.clone(), c.train.lr_gamma),
            (0.1, vec![100, 150], 0.1),
            "{name}"
        );
        assert!(!c.derive.nesterov, "{name}: fine-tuning without Nesterov");
    }
}

#[test]
fn only_the_authors_code_uses_nesterov() {
    assert!(!Preset::Paper.config().unwrap().train.nesterov);
    assert!(!Preset::Vgg16.config().unwrap().train.nesterov);
    assert!(Preset::Official.config().unwrap().train.nesterov);
    assert!(Preset::Dverge.config().unwrap().train.nesterov);
    for preset in RIVAL_PRESETS {
        assert!(
            !preset.config().unwrap().train.nesterov,
            "{}: no Nesterov in DVERGE's or TRS's code",
            preset.name()
        );
    }
}

/// Outside the fields their method reads, the rival presets are `paper` (DVERGE's evaluation
/// protocol, the paper's data), with plain ResNet-20 members.
#[test]
fn rival_presets_are_the_paper_outside_their_method() {
    let paper = Preset::Paper.config().unwrap();
    for preset in RIVAL_PRESETS {
        let c = preset.config().unwrap();
        let name = preset.name();
        assert!(c.train.method.is_ensemble(), "{name}");
        assert_eq!(c.model.n, 1, "{name}: plain members");
        assert_eq!(
            c.plan().unwrap().parameter_count(),
            272_474,
            "{name}: ResNet-20"
        );
        let mut reset = c.clone();
        reset.model.n = paper.model.n;
        reset.model.activation = paper.model.activation;
        reset.train = paper.train.clone();
        reset.dverge = paper.dverge.clone();
        reset.adp = paper.adp.clone();
        reset.gal = paper.gal.clone();
        reset.trs = paper.trs.clone();
        assert_eq!(reset, paper, "{name}");
        // Only the method's own section differs from the defaults.
        let own = c.train.method;
        assert!(own == Method::Dverge || c.dverge == paper.dverge, "{name}");
        assert!(own == Method::Adp || c.adp == paper.adp, "{name}");
        assert!(own == Method::Gal || c.gal == paper.gal, "{name}");
        assert!(own == Method::Trs || c.trs == paper.trs, "{name}");
        assert_eq!(
            c.model.activation == Activation::LeakyRelu,
            own == Method::Gal,
            "{name}: LeakyReLU is GAL's"
        );
    }
}

#[test]
fn dverge_presets_train_as_dverges_code() {
    for (preset, members) in [
        (Preset::Dverge3, 3),
        (Preset::Dverge5, 5),
        (Preset::Dverge8, 8),
    ] {
        let c = preset.config().unwrap();
        let name = preset.name();
        assert_eq!(c.train.method, Method::Dverge, "{name}");
        assert_eq!(c.train.ensemble_size, members, "{name}");
        assert_eq!(c.train.optimizer, Optimizer::Sgd, "{name}");
        assert_eq!(
            (c.train.lr, c.train.momentum, c.train.weight_decay),
            (0.1, 0.9, 1e-4),
            "{name}"
        );
        assert_eq!(
            (c.train.epochs, c.train.milestones.clone()),
            (200, vec![100, 150])
        );
        assert_eq!(c.dverge.layer_schedule, LayerSchedule::PerEpoch, "{name}");
        assert!(!c.dverge.plus_adv, "{name}");
        assert_eq!(c.dverge.init_from, "", "{name}: the pipeline fills it");
        // DVERGE's distillation, which the paper adopts.
        let d = &c.distill;
        assert_eq!((d.eps, d.steps, d.step_fraction), (0.07, 10, 0.1), "{name}");
        assert!(d.momentum && !d.random_start, "{name}");
        assert_eq!(d.bn_mode, BnMode::Train, "{name}");
        assert_eq!(d.feature, FeatureSite::BeforeRelu, "{name}");
    }
}

#[test]
fn adp_gal_trs_presets_use_adam_as_their_code() {
    for preset in [Preset::Adp3, Preset::Gal3, Preset::Trs3] {
        let c = preset.config().unwrap();
        let name = preset.name();
        assert_eq!(c.train.ensemble_size, 3, "{name}");
        assert_eq!(c.train.optimizer, Optimizer::Adam, "{name}");
        assert_eq!((c.train.lr, c.train.weight_decay), (1e-3, 1e-4), "{name}");
        let a = &c.train.adam;
        assert_eq!((a.beta1, a.beta2, a.eps), (0.9, 0.999, 1e-7), "{name}");
    }
    let adp = Preset::Adp3.config().unwrap();
    assert_eq!(adp.train.method, Method::Adp);
    assert_eq!(
        (adp.train.epochs, adp.train.milestones.clone()),
        (200, vec![100, 150])
    );
    assert_eq!((adp.adp.alpha, adp.adp.beta), (2.0, 0.5));
    assert_eq!((adp.adp.det_offset, adp.adp.log_offset), (1e-6, 1e-20));

    let gal = Preset::Gal3.config().unwrap();
    assert_eq!(gal.train.method, Method::Gal);
    assert_eq!(
        (gal.train.epochs, gal.train.milestones.clone()),
        (200, vec![100, 150])
    );
    assert_eq!(gal.model.activation, Activation::LeakyRelu);
    assert_eq!(gal.model.leaky_slope, 0.1);
    assert_eq!(gal.gal.coherence, 0.5);
    assert_eq!((gal.gal.noise_std, gal.gal.noise_probability), (0.045, 0.5));
    assert!(gal.gal.second_forward);

    let trs = Preset::Trs3.config().unwrap();
    assert_eq!(trs.train.method, Method::Trs);
    assert_eq!(trs.train.epochs, 120);
    let t = &trs.trs;
    assert_eq!((t.coeff, t.lamda, t.scale), (2.0, 2.0, 5.0));
    assert!(t.plus_adv);
    assert_eq!((t.init_eps, t.adv_eps, t.pgd_steps), (0.1, 0.2, 6));
    assert_eq!(t.pgd_step_fraction, 1.0 / 3.0);
}

/// TRS's `train_trs.py` steps `StepLR(step_size=40, gamma=0.1)` as `scheduler.step(epoch)`
/// after 0-based epoch `epoch`; PyTorch then sets the rate of the next epoch to
/// lr · gamma^(epoch // 40) (its closed form). `trs-3`'s milestones [41, 81] give the same rate
/// in every one of the 120 epochs.
#[test]
fn trs_milestones_reproduce_steplr_stepped_with_the_epoch() {
    let c = Preset::Trs3.config().unwrap();
    let schedule = c.train.schedule();
    let base = c.train.lr;
    for epoch in 0..c.train.epochs {
        let torch = if epoch == 0 {
            base
        } else {
            base * 0.1f64.powi(((epoch - 1) / 40) as i32)
        };
        assert!(
            (schedule.lr(epoch) - torch).abs() <= 1e-15,
            "epoch {epoch}: {} vs {torch}",
            schedule.lr(epoch)
        );
    }
}

#[test]
fn vgg16_preset_is_the_paper_with_vgg16_and_eps_d_0_03() {
    let mut paper = Preset::Paper.config().unwrap();
    let vgg = Preset::Vgg16.config().unwrap();
    assert_eq!(vgg.model.arch, Arch::Vgg16);
    assert_eq!(vgg.distill.eps, 0.03);
    paper.model.arch = Arch::Vgg16;
    paper.model.vgg_gated = VggGating::ConvsAndClassifier;
    paper.distill.eps = 0.03;
    assert_eq!(paper, vgg);
    let plan = vgg.plan().unwrap();
    assert_eq!((plan.k(), plan.l()), (14, 14), "the paper's 14 RGBs");
}

#[test]
fn official_preset_selects_the_authors_code() {
    let c = Preset::Official.config().unwrap();
    assert_eq!(c.model.sharing, Sharing::SharedConv);
    assert!(c.distill.random_start);
    assert!(!c.distill.momentum);
    assert_eq!(c.distill.bn_mode, BnMode::Eval);
    assert_eq!(c.distill.feature, FeatureSite::AfterRelu);
    assert!(c.distill.first_layer_before_relu);
    assert_eq!(c.eio.loss_scale, LossScale::DivideByP);
    assert_eq!(c.eio.unused_params, UnusedParams::Skip);
    assert!(c.train.nesterov);
}

#[test]
fn dverge_preset_differs_from_official_only_in_distillation() {
    let mut official = Preset::Official.config().unwrap();
    let dverge = Preset::Dverge.config().unwrap();
    official.distill = dverge.distill.clone();
    assert_eq!(official, dverge);
    assert!(dverge.distill.momentum && !dverge.distill.random_start);
    assert_eq!(dverge.distill.bn_mode, BnMode::Train);
}

#[test]
fn quick_preset_is_small_and_on_fashion_mnist() {
    let c = Preset::Quick.config().unwrap();
    assert_eq!(c.data.dataset, Dataset::FashionMnist);
    let plan = c.plan().unwrap();
    assert_eq!((plan.k(), plan.l()), (7, 8));
    assert!(
        plan.parameter_count() < 30_000,
        "{}",
        plan.parameter_count()
    );
}

#[test]
fn preset_files_on_disk_match_the_embedded_copies() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    for preset in Preset::ALL {
        let path = dir.join(format!("{}.toml", preset.name()));
        assert_eq!(Config::load(&path).unwrap(), preset.config().unwrap());
        assert_eq!(Preset::from_name(preset.name()), Some(preset));
    }
    assert_eq!(Preset::from_name("papers"), None);
}

#[test]
fn errors_name_file_line_and_field() {
    let text = "seed = 1\n\n[distill]\nsteps = 10\nepsilon = 0.07\n";
    let e = Config::from_toml(text, "run.toml").unwrap_err().to_string();
    assert!(
        e.starts_with("run.toml:5:1: unknown field `epsilon`"),
        "{e}"
    );

    let e = Config::from_toml("[distill]\neps = 1.5\n[eio]\np = 0\n", "run.toml").unwrap_err();
    assert_eq!(
        e.to_string(),
        "run.toml: invalid config:\neio.p: 0 must be >= 1\ndistill.eps: 1.5 is outside (0, 1]"
    );

    let missing = std::path::Path::new("/nonexistent/eio/run.toml");
    let e = Config::load(missing).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot read config file /nonexistent/eio/run.toml"
    );
    assert!(
        std::error::Error::source(&e).is_some(),
        "the io error is kept as the source"
    );
}

#[test]
fn overrides_apply_in_order_and_validate() {
    let c = Config::default()
        .with_overrides(&[
            "distill.eps=0.03",
            "model.sharing=shared-conv",
            "eval.eps=[0.01, 0.02]",
            "data.path=/tmp/x",
            "seed=7",
        ])
        .unwrap();
    assert_eq!(c.distill.eps, 0.03);
    assert_eq!(c.model.sharing, Sharing::SharedConv);
    assert_eq!(c.eval.eps, vec![0.01, 0.02]);
    assert_eq!(c.data.path.as_deref(), Some(std::path::Path::new("/tmp/x")));
    assert_eq!(c.seed, 7);
    let e = Config::default()
        .with_overrides(&["distill.eps=1.5"])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--set: invalid config:\ndistill.eps: 1.5 is outside (0, 1]"
    );
}

#[test]
fn resolved_config_round_trips_through_toml_and_json() {
    for preset in Preset::ALL {
        let c = preset.config().unwrap();
        let toml_text = toml::to_string(&c).unwrap();
        assert_eq!(Config::from_toml(&toml_text, "round-trip").unwrap(), c);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    }
}

//! Config reading: defaults are the paper, presets differ where protocols.md says, errors
//! name the file and line, overrides apply. Each preset value against its documented source is
//! `tests/preset_sources.rs`.

use eio_spec::config::{
    Arch, BnMode, Dataset, LossScale, PretrainSchedule, Sharing, UnusedParams, VggGating,
};
use eio_spec::plan::FeatureSite;
use eio_spec::{Config, Preset};

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

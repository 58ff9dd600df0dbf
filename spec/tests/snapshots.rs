//! insta snapshots of what a user reads: each resolved preset, the ResNet-20 and VGG-16 plans,
//! and every validation message. A change to any of them must be reviewed (`cargo insta review`).

use eio_spec::config::{Arch, Sharing, VggGating};
use eio_spec::{Config, Plan, Preset};

#[test]
fn resolved_presets() {
    for preset in Preset::ALL {
        let config = preset
            .config()
            .unwrap_or_else(|e| panic!("{}: {e}", preset.name()));
        let text = toml::to_string_pretty(&config).expect("a config serialises");
        insta::assert_snapshot!(format!("preset_{}", preset.name()), text);
    }
}

fn plan(arch: Arch, sharing: Sharing, gating: VggGating) -> Plan {
    let mut config = Config::default();
    config.model.arch = arch;
    config.model.sharing = sharing;
    config.model.vgg_gated = gating;
    config.validate().expect("valid");
    config.plan().expect("builds")
}

#[test]
fn resnet20_plans() {
    for (sharing, tag) in [
        (Sharing::Independent, "independent"),
        (Sharing::SharedConv, "shared_conv"),
    ] {
        let plan = plan(Arch::Resnet, sharing, VggGating::Convs);
        insta::assert_snapshot!(format!("resnet20_n2_{tag}"), plan.summary());
    }
}

#[test]
fn vgg16_plans() {
    for (sharing, gating, tag) in [
        (Sharing::Independent, VggGating::Convs, "independent_convs"),
        (Sharing::SharedConv, VggGating::Convs, "shared_conv_convs"),
        (
            Sharing::Independent,
            VggGating::ConvsAndClassifier,
            "independent_convs_and_classifier",
        ),
    ] {
        let plan = plan(Arch::Vgg16, sharing, gating);
        insta::assert_snapshot!(format!("vgg16_n2_{tag}"), plan.summary());
    }
}

/// Each bad config (a TOML fragment over the defaults) and the message the user sees.
const BAD_CONFIGS: &[&str] = &[
    "[distill]\neps = 1.5",
    "[distill]\neps = 0.0",
    "[distill]\nsteps = 0",
    "[distill]\nstep_fraction = -0.1",
    "[distill]\nmomentum_decay = -1.0",
    "[eio]\np = 0",
    "[model]\ndepth = 21",
    "[model]\ndepth = 2",
    "[model]\nn = 0",
    "[model]\nn = 40",
    "[model]\nwidth = 0.0",
    "[model]\nclasses = 1",
    "[model]\nin_channels = 1",
    "[model]\nstd = [0.2, 0.0, 0.2]",
    "[model]\narch = \"vgg16\"\ninput_size = 28",
    "[model]\narch = \"vgg16\"\nsharing = \"shared-conv\"\nvgg_gated = \"convs-and-classifier\"",
    "[model]\nleaky_slope = 2.0",
    "[train]\nepochs = 0",
    "[train]\nbatch_size = 0",
    "[train]\nlr = -0.1",
    "[train]\nmilestones = [150, 100]",
    "[train]\nlr_gamma = 0.0",
    "[train]\nmomentum = 1.0",
    "[train]\nmomentum = 0.0\nnesterov = true",
    "[train]\nweight_decay = -1e-4",
    "[train]\nensemble_size = 0",
    "[train.adv]\neps = 2.0",
    "[train.adv]\nsteps = 0",
    "[eval]\nimages = 0",
    "[eval]\neps = []",
    "[eval]\neps = [0.01, 1.5]",
    "[eval]\nrestarts = 0",
    "[eval]\nlosses = []",
    "[eval]\ncw_kappa = -0.1",
    "[derive]\nlr = 0.0",
    "[data]\ncrop_padding = 100",
    // Parse errors: unknown fields, wrong types, unknown enum values, bad syntax.
    "[distill]\nepsilon = 0.07",
    "[distil]\neps = 0.07",
    "[eio]\np = \"three\"",
    "[model]\nsharing = \"shared\"",
    "[eval]\nlosses = [\"ce\", \"l2\"]",
    "seed = -1",
    "[model\nn = 2",
    // Later additions go last, so the numbers of the cases above stay put.
    "[data]\ntrain_limit = 0",
    "[train]\nmomentum = 0.0\nnesterov = false\n[derive]\nnesterov = true",
    "[eio]\npretrain_schedule = \"cosine\"",
];

#[test]
fn validation_messages() {
    let mut report = String::new();
    for (i, text) in BAD_CONFIGS.iter().enumerate() {
        let error = Config::from_toml(text, &format!("bad{i}.toml"))
            .expect_err(&format!("config {i} must be rejected:\n{text}"));
        report.push_str(&format!("--- {text:?}\n{error}\n"));
    }
    insta::assert_snapshot!("validation_messages", report);
}

#[test]
fn overrides_messages() {
    let base = Config::default();
    let mut report = String::new();
    for set in [
        "distill.eps=2",
        "eio.p=0",
        "distill.nope=1",
        "model.sharing=shared",
        "distill",
        "seed.x=1",
    ] {
        let error = base.clone().with_overrides(&[set]).expect_err(set);
        report.push_str(&format!("--- {set}\n{error}\n"));
    }
    insta::assert_snapshot!("override_messages", report);
}

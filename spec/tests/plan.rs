//! The architecture plans: counts the authors' checkpoint confirms, DVERGE's layer indexing,
//! d(l) from the graph, and that every name a node reads is a listed tensor.

use std::collections::BTreeSet;

use eio_spec::config::{Activation, Arch, ModelConfig, Sharing, VggGating};
use eio_spec::plan::{FeatureSite, Op, PlanError, Role, Shape};
use eio_spec::{Path, Plan};

fn resnet(depth: usize, n: usize, sharing: Sharing) -> Plan {
    Plan::build(&ModelConfig {
        depth,
        n,
        sharing,
        ..ModelConfig::default()
    })
    .expect("valid resnet")
}

fn vgg(n: usize, sharing: Sharing, gating: VggGating) -> Plan {
    Plan::build(&ModelConfig {
        arch: Arch::Vgg16,
        n,
        sharing,
        vgg_gated: gating,
        ..ModelConfig::default()
    })
    .expect("valid vgg")
}

#[test]
fn resnet20_counts_match_the_released_checkpoint_and_pytorch() {
    // official-checkpoint.md: 273,850 with shared convs; torch_eio.py: 541,546 independent,
    // 272,474 for the plain ResNet-20.
    assert_eq!(
        resnet(20, 2, Sharing::SharedConv).parameter_count(),
        273_850
    );
    assert_eq!(
        resnet(20, 2, Sharing::Independent).parameter_count(),
        541_546
    );
    assert_eq!(
        resnet(20, 1, Sharing::Independent).parameter_count(),
        272_474
    );
    assert_eq!(
        resnet(20, 1, Sharing::SharedConv).parameter_count(),
        272_474
    );
    // 244 checkpoint entries = 225 distinct tensors + 19 aliased conv copies.
    assert_eq!(resnet(20, 2, Sharing::SharedConv).params.len(), 225);
    assert_eq!(resnet(20, 2, Sharing::Independent).params.len(), 244);
}

#[test]
fn resnet20_uses_dverge_layer_indexing() {
    let plan = resnet(20, 2, Sharing::SharedConv);
    assert_eq!((plan.k(), plan.l()), (19, 20));
    for layer in &plan.layers {
        assert_eq!(layer.depth, layer.index.min(19), "d({})", layer.index);
    }
    // l = 1: stem BN before its ReLU; odd l >= 3: block outputs (add) before the final ReLU.
    assert!(matches!(
        plan.nodes[plan.layer(1).before_relu].op,
        Op::BatchNorm { .. }
    ));
    assert!(matches!(plan.nodes[plan.layer(1).after_relu].op, Op::Relu));
    assert!(matches!(
        plan.nodes[plan.layer(2).before_relu].op,
        Op::BatchNorm { .. }
    ));
    assert!(matches!(plan.nodes[plan.layer(3).before_relu].op, Op::Add));
    assert!(matches!(plan.nodes[plan.layer(19).before_relu].op, Op::Add));
    assert_eq!(plan.layer(20).before_relu, plan.logits());
    assert_eq!(plan.layer(20).after_relu, plan.logits());
    assert_eq!(plan.gates[0].module, "conv1");
    assert_eq!(plan.gates[1].module, "layer1.0.conv1");
    assert_eq!(plan.gates[18].module, "layer3.2.conv2");
    assert_eq!(plan.path_space().count().unwrap(), 524_288);
}

#[test]
fn feature_site_and_the_authors_stem_quirk() {
    let plan = resnet(20, 2, Sharing::SharedConv);
    let l1 = plan.layer(1);
    assert_eq!(
        plan.feature_node(1, FeatureSite::AfterRelu, false),
        l1.after_relu
    );
    assert_eq!(
        plan.feature_node(1, FeatureSite::AfterRelu, true),
        l1.before_relu
    );
    assert_eq!(
        plan.feature_node(1, FeatureSite::BeforeRelu, false),
        l1.before_relu
    );
    let l5 = plan.layer(5);
    assert_eq!(
        plan.feature_node(5, FeatureSite::AfterRelu, true),
        l5.after_relu
    );
    assert_ne!(l5.after_relu, l5.before_relu);
}

#[test]
fn resnet_family_has_6k_plus_1_gates() {
    for k in 1..=4 {
        let depth = 6 * k + 2;
        for sharing in [Sharing::Independent, Sharing::SharedConv] {
            let plan = resnet(depth, 3, sharing);
            assert_eq!(plan.k(), 6 * k + 1, "resnet{depth}");
            assert_eq!(plan.l(), 6 * k + 2, "resnet{depth}");
        }
    }
    for depth in [0, 2, 7, 9, 21] {
        assert_eq!(
            Plan::build(&ModelConfig {
                depth,
                ..ModelConfig::default()
            }),
            Err(PlanError::ResNetDepth { depth })
        );
    }
}

#[test]
fn vgg16_gating_is_a_stated_choice() {
    let convs = vgg(2, Sharing::Independent, VggGating::Convs);
    assert_eq!((convs.k(), convs.l()), (13, 14));
    assert_eq!(convs.layer(14).depth, 13);
    let all = vgg(2, Sharing::Independent, VggGating::ConvsAndClassifier);
    assert_eq!((all.k(), all.l()), (14, 14));
    assert_eq!(all.layer(14).depth, 14);
    assert!(matches!(all.nodes[all.logits()].op, Op::Linear { .. }));
    assert_eq!(
        Plan::build(&ModelConfig {
            arch: Arch::Vgg16,
            sharing: Sharing::SharedConv,
            vgg_gated: VggGating::ConvsAndClassifier,
            ..ModelConfig::default()
        }),
        Err(PlanError::SharedClassifier)
    );
    assert_eq!(
        Plan::build(&ModelConfig {
            arch: Arch::Vgg16,
            input_size: 48,
            ..ModelConfig::default()
        }),
        Err(PlanError::VggInputSize { size: 48 })
    );
}

/// Plans over a spread of settings, for the structural checks below.
fn assorted_plans() -> Vec<Plan> {
    let mut plans = Vec::new();
    for n in 1..=3 {
        for sharing in [Sharing::Independent, Sharing::SharedConv] {
            for depth in [8, 14, 20] {
                plans.push(resnet(depth, n, sharing));
            }
            plans.push(vgg(n, sharing, VggGating::Convs));
        }
        plans.push(vgg(n, Sharing::Independent, VggGating::ConvsAndClassifier));
        plans.push(
            Plan::build(&ModelConfig {
                depth: 8,
                width: 0.25,
                n,
                classes: 7,
                in_channels: 1,
                input_size: 8,
                mean: vec![0.5],
                std: vec![0.25],
                activation: Activation::LeakyRelu,
                ..ModelConfig::default()
            })
            .expect("tiny resnet"),
        );
    }
    plans
}

#[test]
fn every_layer_depends_on_exactly_the_gates_of_its_prefix() {
    for plan in assorted_plans() {
        let deps = plan.gate_dependencies();
        for layer in &plan.layers {
            for node in [layer.before_relu, layer.after_relu] {
                let expected: BTreeSet<usize> = (0..layer.depth).collect();
                assert_eq!(deps[node], expected, "{} l={}", plan.name, layer.index);
            }
        }
        assert_eq!(plan.layers.last().map(|l| l.depth), Some(plan.k()));
    }
}

#[test]
fn nodes_read_listed_tensors_of_the_right_shape() {
    for plan in assorted_plans() {
        let shape_of = |name: &str| {
            plan.param(name)
                .unwrap_or_else(|| panic!("{}: {name} is read but not listed", plan.name))
                .shape
                .clone()
        };
        let mut read = BTreeSet::new();
        for (id, node) in plan.nodes.iter().enumerate() {
            assert!(
                node.inputs.iter().all(|&i| i < id),
                "node {id} reads a later node"
            );
            match &node.op {
                Op::Conv {
                    in_channels,
                    out_channels,
                    kernel,
                    weight,
                    ..
                } => {
                    if let Some(g) = weight.gate {
                        assert_eq!(weight.candidates.len(), plan.n);
                        assert!(plan.gates[g].nodes.contains(&id));
                    }
                    for name in &weight.candidates {
                        assert_eq!(
                            shape_of(name),
                            vec![*out_channels, *in_channels, *kernel, *kernel]
                        );
                        read.insert(name.clone());
                    }
                }
                Op::BatchNorm { channels, params } => {
                    for bn in &params.candidates {
                        for name in [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
                            assert_eq!(shape_of(name), vec![*channels]);
                            read.insert(name.clone());
                        }
                        assert_eq!(shape_of(&bn.num_batches_tracked), Vec::<usize>::new());
                        read.insert(bn.num_batches_tracked.clone());
                    }
                }
                Op::Linear {
                    in_features,
                    out_features,
                    params,
                } => {
                    for p in &params.candidates {
                        assert_eq!(shape_of(&p.weight), vec![*out_features, *in_features]);
                        assert_eq!(shape_of(&p.bias), vec![*out_features]);
                        read.insert(p.weight.clone());
                        read.insert(p.bias.clone());
                    }
                }
                Op::Normalize { mean, std } => {
                    read.insert(mean.clone());
                    read.insert(std.clone());
                }
                Op::Add => assert_eq!(
                    plan.nodes[node.inputs[0]].shape,
                    plan.nodes[node.inputs[1]].shape
                ),
                _ => {}
            }
        }
        let listed: BTreeSet<String> = plan.params.iter().map(|p| p.name.clone()).collect();
        assert_eq!(
            read, listed,
            "{}: every listed tensor is read by some node",
            plan.name
        );
        assert_eq!(
            listed.len(),
            plan.params.len(),
            "{}: names are unique",
            plan.name
        );
        assert_eq!(plan.nodes[plan.logits()].shape, Shape::Vector(plan.classes));
        for p in &plan.params {
            if p.role == Role::Counter {
                assert!(p.shape.is_empty());
            }
        }
    }
}

#[test]
fn gated_select_follows_the_path() {
    let plan = resnet(20, 2, Sharing::Independent);
    let mut choices = vec![0u8; 19];
    choices[1] = 1;
    let path = Path::new(choices);
    let Op::Conv { weight, .. } = &plan.nodes[plan.gates[1].nodes[0]].op else {
        panic!("gate 2 starts with its conv");
    };
    assert_eq!(
        weight.select(&path),
        "net.model.layer1.0.conv1.candidate_ops.1.0.weight"
    );
    let Op::BatchNorm { params, .. } = &plan.nodes[plan.gates[0].nodes[1]].op else {
        panic!("gate 1 ends with its BN");
    };
    assert_eq!(
        params.select(&path).weight,
        "net.model.conv1.candidate_ops.0.1.weight"
    );
    let shared = resnet(20, 2, Sharing::SharedConv);
    let Op::Conv { weight, .. } = &shared.nodes[shared.gates[1].nodes[0]].op else {
        panic!("gate 2 starts with its conv");
    };
    assert_eq!(
        weight.gate, None,
        "a shared conv is the same for every candidate"
    );
    assert_eq!(
        weight.select(&path),
        "net.model.layer1.0.conv1.candidate_ops.0.0.weight"
    );
}

#[test]
fn initial_values_follow_the_dverge_init_and_the_seed() {
    use eio_spec::rng::Seeds;
    let plan = resnet(20, 2, Sharing::Independent);
    let values: std::collections::BTreeMap<String, Vec<f64>> =
        plan.initial_values(&Seeds::new(3), 0).into_iter().collect();
    assert_eq!(values.len(), plan.params.len());
    // conv N(0, sqrt(2 / (3·3·64))): 36,864 draws, sample std within 2 %.
    let w = &values["net.model.layer3.1.conv1.candidate_ops.0.0.weight"];
    assert_eq!(w.len(), 64 * 64 * 9);
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    let std = (w.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    let expected = (2.0f64 / (9.0 * 64.0)).sqrt();
    assert!(
        (std / expected - 1.0).abs() < 0.02,
        "std {std} vs {expected}"
    );
    assert!(
        mean.abs() < 4.0 * expected / (w.len() as f64).sqrt(),
        "mean {mean}"
    );
    // Independent candidates get their own draws.
    assert_ne!(
        w,
        &values["net.model.layer3.1.conv1.candidate_ops.1.0.weight"]
    );
    let bound = 1.0 / 64f64.sqrt();
    assert!(values["net.model.fc.weight"]
        .iter()
        .all(|v| v.abs() <= bound));
    assert!(values["net.model.conv1.candidate_ops.1.1.weight"]
        .iter()
        .all(|&v| v == 1.0));
    assert!(values["net.model.conv1.candidate_ops.1.1.bias"]
        .iter()
        .all(|&v| v == 0.0));
    assert!(values["net.model.conv1.candidate_ops.1.1.running_var"]
        .iter()
        .all(|&v| v == 1.0));
    assert_eq!(values["net.normalizer.std"], vec![0.2023, 0.1994, 0.2010]);
    // Same seed and member: same values; another member or seed: different.
    assert_eq!(
        plan.initial_values(&Seeds::new(3), 0),
        plan.initial_values(&Seeds::new(3), 0)
    );
    assert_ne!(
        plan.initial_values(&Seeds::new(3), 1),
        plan.initial_values(&Seeds::new(3), 0)
    );
    assert_ne!(
        plan.initial_values(&Seeds::new(4), 0),
        plan.initial_values(&Seeds::new(3), 0)
    );
}

#[test]
fn iteration_draws_respect_the_layer_depth_and_the_schedule() {
    use eio_spec::config::{EioConfig, LayerSchedule};
    use eio_spec::rng::Seeds;
    use eio_spec::sampler::draw_iteration;
    let plan = resnet(20, 2, Sharing::SharedConv);
    let seeds = Seeds::new(11);
    let eio = EioConfig::default();
    let mut layers = BTreeSet::new();
    for iteration in 0..400 {
        let draw = draw_iteration(&plan, &eio, &seeds, 0, iteration).unwrap();
        assert_eq!(
            draw,
            draw_iteration(&plan, &eio, &seeds, 0, iteration).unwrap()
        );
        let depth = plan.layer(draw.layer).depth;
        // n = 2: p = 3 is clipped to 2 at l = 1 (n^1 = 2 prefixes), as the authors' code.
        assert_eq!(draw.paths.len(), if depth == 1 { 2 } else { 3 });
        let prefixes: BTreeSet<&[u8]> = draw.paths.iter().map(|p| p.prefix(depth)).collect();
        assert_eq!(prefixes.len(), draw.paths.len());
        layers.insert(draw.layer);
    }
    assert_eq!(
        layers,
        (1..=20).collect::<BTreeSet<usize>>(),
        "every layer is drawn"
    );
    let per_epoch = EioConfig {
        layer_schedule: LayerSchedule::PerEpoch,
        ..EioConfig::default()
    };
    let first = draw_iteration(&plan, &per_epoch, &seeds, 5, 0)
        .unwrap()
        .layer;
    assert!(
        (1..50).all(|i| draw_iteration(&plan, &per_epoch, &seeds, 5, i)
            .unwrap()
            .layer
            == first)
    );
}

#[test]
fn resnet20_has_nine_residual_blocks_three_first_in_stage() {
    let plan = eio_spec::Plan::build(&eio_spec::config::ModelConfig::default()).unwrap();
    let blocks = plan.residual_blocks();
    let modules: Vec<&str> = blocks.iter().map(|b| b.module.as_str()).collect();
    assert_eq!(
        modules,
        [
            "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer3.0",
            "layer3.1", "layer3.2"
        ]
    );
    let first: Vec<bool> = blocks.iter().map(|b| b.first_in_stage).collect();
    assert_eq!(
        first,
        [true, false, false, true, false, false, true, false, false]
    );
    for b in &blocks {
        assert_eq!(plan.nodes[b.add].op, eio_spec::plan::Op::Add);
    }
    let vgg = eio_spec::Plan::build(&eio_spec::config::ModelConfig {
        arch: eio_spec::config::Arch::Vgg16,
        ..Default::default()
    })
    .unwrap();
    assert!(vgg.residual_blocks().is_empty());
}

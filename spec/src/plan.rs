//! The architecture as data: the nodes an engine interprets, the K random gated blocks (RGBs),
//! the L distillation layers with their dependency depths d(l), and every parameter's name and
//! shape.
//!
//! Paper, Sec. 3.2: "we replace each parameterized layer (mainly convolutional layer,
//! optionally followed by a batch normalization layer) with a random gated block (RGB)", which
//! "repeats the original layer by n times". A [`Plan`] writes this down once so that the
//! reference and the accelerated engine read the same network:
//!
//! * [`Plan::nodes`] is a topologically ordered list of operations; node `i` reads only nodes
//!   before it. A gated operation picks its parameters with [`Gated::select`] from a [`Path`].
//! * [`Plan::gates`] numbers the RGBs in registration order (RGB 1 is gate index 0).
//! * [`Plan::layers`] numbers the distillation layers l = 1..L of Eq. 2, each with the node
//!   read before and after its ReLU and its depth d(l): the layer-l feature depends on gates
//!   1..d(l) only, which is what Algorithm 1's distinct-prefix rule is about.
//! * [`Plan::params`] lists every parameter and buffer by its canonical name, which is the
//!   authors' checkpoint key (`net.model.<module>.candidate_ops.<c>.{0,1}.*`,
//!   `net.normalizer.{mean,std}`).
//!
//! Weight sharing ([`Sharing`]): the paper's text gives every candidate its own weights
//! (`independent`); the authors' code and released checkpoint build the n candidates of an RGB
//! around one conv and differ only in BatchNorm (`shared-conv`). With shared convs the conv is
//! stored once, under candidate 0's name, and its node is not gated: its gradient is the sum
//! over the paths that used it.
//!
//! Architectures (protocols.md): the CIFAR ResNet-(6k+2) of DVERGE (ResNet-20: K = 19 gated
//! 3x3 convs, the two 1x1 downsampling shortcuts ungated; L = 20 with DVERGE's indexing) and
//! the CIFAR VGG-16 with BatchNorm (13 gated convs, or 14 RGBs counting the classifier, as the
//! paper says, by [`VggGating`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::config::{Activation, Arch, ModelConfig, Sharing, VggGating};
use crate::gates::{Path, PathSpace};

/// Index of a node in [`Plan::nodes`].
pub type NodeId = usize;

/// The shape of one sample's activation at a node (the batch dimension is implicit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shape {
    /// A feature map, channels x height x width.
    Map { c: usize, h: usize, w: usize },
    /// A feature vector.
    Vector(usize),
}

impl Shape {
    /// Number of scalars per sample.
    pub fn numel(&self) -> usize {
        match *self {
            Shape::Map { c, h, w } => c * h * w,
            Shape::Vector(n) => n,
        }
    }
}

/// Parameters that may belong to an RGB: one entry per candidate when gated, else one entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gated<T> {
    /// The RGB (0-based gate index) that chooses among `candidates`, if any.
    pub gate: Option<usize>,
    /// One entry per candidate (n) when gated, exactly one when not.
    pub candidates: Vec<T>,
}

impl<T> Gated<T> {
    fn fixed(value: T) -> Self {
        Gated {
            gate: None,
            candidates: vec![value],
        }
    }

    /// The entry the path's gate selects (Eq. 1), or the only entry of an ungated operation.
    ///
    /// # Panics
    /// If the path does not fit the plan (check paths with [`Plan::path_space`] first).
    pub fn select(&self, path: &Path) -> &T {
        match self.gate {
            Some(g) => &self.candidates[path.choice(g)],
            None => &self.candidates[0],
        }
    }
}

/// The five tensors of one BatchNorm2d (PyTorch names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BnNames {
    pub weight: String,
    pub bias: String,
    pub running_mean: String,
    pub running_var: String,
    pub num_batches_tracked: String,
}

impl BnNames {
    fn under(module: &str) -> Self {
        BnNames {
            weight: format!("{module}.weight"),
            bias: format!("{module}.bias"),
            running_mean: format!("{module}.running_mean"),
            running_var: format!("{module}.running_var"),
            num_batches_tracked: format!("{module}.num_batches_tracked"),
        }
    }
}

/// The weight and bias of one linear layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearNames {
    pub weight: String,
    pub bias: String,
}

/// One operation of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// The input batch, pixels in [0, 1].
    Input,
    /// Per-channel (x - mean[c]) / std[c], the model's first op (protocols.md).
    Normalize { mean: String, std: String },
    /// 2-D convolution without bias; weight [out, in, kernel, kernel].
    Conv {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        weight: Gated<String>,
    },
    /// BatchNorm2d (eps 1e-5, momentum 0.1, PyTorch semantics).
    BatchNorm {
        channels: usize,
        params: Gated<BnNames>,
    },
    /// max(x, 0).
    Relu,
    /// x for x > 0, slope·x otherwise (GAL's members use slope 0.1).
    LeakyRelu { slope: f64 },
    /// Elementwise sum of the two inputs (residual connection).
    Add,
    /// 2x2 max pooling, stride 2.
    MaxPool2,
    /// Mean over height and width: [C, H, W] -> [C].
    GlobalAvgPool,
    /// [C, H, W] -> [C·H·W] in row-major order.
    Flatten,
    /// y = x Wᵀ + b; weight [out, in].
    Linear {
        in_features: usize,
        out_features: usize,
        params: Gated<LinearNames>,
    },
}

/// A node: an operation, the nodes it reads, and its output shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
}

/// One random gated block: a gated conv and its BatchNorm (Sec. 3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// Module name, e.g. `layer1.0.conv1`.
    pub module: String,
    /// The nodes whose parameters this gate selects.
    pub nodes: Vec<NodeId>,
}

/// A distillation layer of Eq. 2 (DVERGE's feature indexing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// l, 1-based.
    pub index: usize,
    /// What the feature is, e.g. `layer1.0.conv1+bn` or `layer1.0 (block output)`.
    pub name: String,
    /// The feature before the ReLU that follows it.
    pub before_relu: NodeId,
    /// The feature after that ReLU (the same node where no ReLU follows, e.g. the logits).
    pub after_relu: NodeId,
    /// d(l): the layer-l feature depends on gates 1..d(l) and on no other gate.
    pub depth: usize,
}

/// One residual block of a ResNet: its add node y = r + s, where `inputs[0]` of that node is
/// the residual (conv) branch r and `inputs[1]` the skip path s (identity or the 1x1
/// downsampling conv+BN). SGM ([`crate::attack::SkipGradient`]) scales the gradient into r.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidualBlock {
    /// The [`Op::Add`] node.
    pub add: NodeId,
    /// DVERGE's module name, e.g. `layer2.0`.
    pub module: String,
    /// Whether it is the first block of its stage (`layer<S>.0`).
    pub first_in_stage: bool,
}

/// Where on a distillation layer the feature is read (protocols.md: DVERGE reads before
/// the ReLU, the authors' code after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureSite {
    BeforeRelu,
    AfterRelu,
}

/// What a tensor is, which decides how engines treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Trained by the optimiser (with coupled weight decay, protocols.md).
    Learnable,
    /// BatchNorm running mean or variance, updated by train-mode forwards.
    RunningStat,
    /// BatchNorm `num_batches_tracked`, an int64 scalar.
    Counter,
    /// A fixed buffer (the normaliser's mean and std).
    Constant,
}

/// How a tensor is initialised (protocols.md, DVERGE's ResNet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// N(0, std²); convs use std = sqrt(2 / (k·k·out_channels)).
    Normal { std: f64 },
    /// U(-bound, bound); PyTorch's default for linear layers, bound = 1/sqrt(in_features).
    Uniform { bound: f64 },
    /// Every element 1 (BN weight, running_var).
    Ones,
    /// Every element 0 (BN bias, running_mean, num_batches_tracked).
    Zeros,
    /// Given values (the normaliser's mean and std).
    Values(Vec<f64>),
}

/// One named tensor of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Canonical name (the authors' checkpoint key).
    pub name: String,
    /// Shape; `[]` for a scalar.
    pub shape: Vec<usize>,
    pub role: Role,
    pub init: Init,
    /// The (gate, candidate) it belongs to, for per-candidate tensors.
    pub candidate: Option<(usize, usize)>,
}

impl ParamSpec {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A plan that cannot be built from its model settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("model.depth: {depth} is not a CIFAR ResNet depth 6k+2 with k >= 1 (8, 14, 20, 32, 44, 56, 110, …)")]
    ResNetDepth { depth: usize },
    #[error("model.input_size: {size} cannot pass VGG-16's five 2x2 max pools; it must be a positive multiple of 32")]
    VggInputSize { size: usize },
    #[error("model.n: {n} is outside 1..=36")]
    Candidates { n: usize },
    #[error("model.vgg_gated = \"convs-and-classifier\" needs model.sharing = \"independent\": a shared classifier would make its candidates identical")]
    SharedClassifier,
}

/// The architecture of one RGN as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// e.g. `resnet20`, `vgg16`.
    pub name: String,
    /// Candidates per RGB.
    pub n: usize,
    pub sharing: Sharing,
    /// Shape of one input image.
    pub input: Shape,
    pub classes: usize,
    pub nodes: Vec<Node>,
    pub gates: Vec<Gate>,
    pub layers: Vec<Layer>,
    pub params: Vec<ParamSpec>,
}

impl Plan {
    /// Builds the plan of the model described by `model`.
    ///
    /// # Errors
    /// [`PlanError`] for an impossible architecture.
    pub fn build(model: &ModelConfig) -> Result<Plan, PlanError> {
        if !(1..=crate::gates::MAX_CANDIDATES).contains(&model.n) {
            return Err(PlanError::Candidates { n: model.n });
        }
        let mut b = Builder::new(model);
        match model.arch {
            Arch::Resnet => b.resnet(model.depth)?,
            Arch::Vgg16 => b.vgg16(model.vgg_gated)?,
        }
        Ok(b.finish())
    }

    /// K, the number of RGBs.
    pub fn k(&self) -> usize {
        self.gates.len()
    }

    /// L, the number of distillation layers.
    pub fn l(&self) -> usize {
        self.layers.len()
    }

    /// The node whose output is the logits.
    pub fn logits(&self) -> NodeId {
        self.nodes.len() - 1
    }

    /// The n^K paths of this RGN.
    pub fn path_space(&self) -> PathSpace {
        PathSpace::new(self.n, self.k()).expect("n was checked when the plan was built")
    }

    /// Distillation layer l (1-based).
    ///
    /// # Panics
    /// If l is not in 1..=L (config validation bounds it).
    pub fn layer(&self, l: usize) -> &Layer {
        assert!(
            (1..=self.l()).contains(&l),
            "distillation layer {l} is outside 1..={}",
            self.l()
        );
        &self.layers[l - 1]
    }

    /// The node read as the layer-l feature. With `first_layer_before_relu` (the authors'
    /// feature function), layer 1 is read before its ReLU whatever `site` says.
    pub fn feature_node(
        &self,
        l: usize,
        site: FeatureSite,
        first_layer_before_relu: bool,
    ) -> NodeId {
        let layer = self.layer(l);
        match site {
            FeatureSite::AfterRelu if !(l == 1 && first_layer_before_relu) => layer.after_relu,
            _ => layer.before_relu,
        }
    }

    /// Number of learnable scalars (each shared conv counted once).
    pub fn parameter_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.role == Role::Learnable)
            .map(ParamSpec::numel)
            .sum()
    }

    /// The spec of the tensor called `name`.
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The set of gates each node depends on (0-based), computed from the graph.
    pub fn gate_dependencies(&self) -> Vec<BTreeSet<usize>> {
        let mut deps: Vec<BTreeSet<usize>> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            let mut set = BTreeSet::new();
            for &input in &node.inputs {
                set.extend(deps[input].iter().copied());
            }
            set.extend(op_gate(&node.op));
            deps.push(set);
        }
        deps
    }
}

impl Plan {
    /// The residual blocks, in forward order (none for VGG-16). Each is an [`Op::Add`] node whose
    /// first input is the output of a gated conv+BN named `<module>.conv2`.
    pub fn residual_blocks(&self) -> Vec<ResidualBlock> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.op == Op::Add)
            .map(|(add, node)| {
                let branch = node.inputs[0];
                let module = self
                    .gates
                    .iter()
                    .find(|g| g.nodes.contains(&branch))
                    .and_then(|g| g.module.strip_suffix(".conv2"))
                    .expect("a residual add reads its block's conv2+BN first")
                    .to_string();
                let first_in_stage = module.ends_with(".0");
                ResidualBlock {
                    add,
                    module,
                    first_in_stage,
                }
            })
            .collect()
    }
}

/// The gate an operation's parameters depend on, if any.
fn op_gate(op: &Op) -> Option<usize> {
    match op {
        Op::Conv { weight, .. } => weight.gate,
        Op::BatchNorm { params, .. } => params.gate,
        Op::Linear { params, .. } => params.gate,
        _ => None,
    }
}

/// Builds nodes, gates, layers and parameters in registration order.
struct Builder {
    n: usize,
    sharing: Sharing,
    activation: Activation,
    leaky_slope: f64,
    width: f64,
    name: String,
    input: Shape,
    classes: usize,
    nodes: Vec<Node>,
    gates: Vec<Gate>,
    layers: Vec<(String, NodeId, NodeId)>,
    params: Vec<ParamSpec>,
}

const MODEL: &str = "net.model";

impl Builder {
    fn new(model: &ModelConfig) -> Self {
        let input = Shape::Map {
            c: model.in_channels,
            h: model.input_size,
            w: model.input_size,
        };
        let mut b = Builder {
            n: model.n,
            sharing: model.sharing,
            activation: model.activation,
            leaky_slope: model.leaky_slope,
            width: model.width,
            name: String::new(),
            input,
            classes: model.classes,
            nodes: vec![Node {
                op: Op::Input,
                inputs: vec![],
                shape: input,
            }],
            gates: vec![],
            layers: vec![],
            params: vec![],
        };
        let (mean, std) = ("net.normalizer.mean", "net.normalizer.std");
        b.param(
            mean,
            vec![model.in_channels],
            Role::Constant,
            Init::Values(model.mean.clone()),
            None,
        );
        b.param(
            std,
            vec![model.in_channels],
            Role::Constant,
            Init::Values(model.std.clone()),
            None,
        );
        b.push(
            Op::Normalize {
                mean: mean.into(),
                std: std.into(),
            },
            vec![0],
            input,
        );
        b
    }

    fn channels(&self, base: usize) -> usize {
        ((base as f64 * self.width).round() as usize).max(1)
    }

    fn push(&mut self, op: Op, inputs: Vec<NodeId>, shape: Shape) -> NodeId {
        self.nodes.push(Node { op, inputs, shape });
        self.nodes.len() - 1
    }

    fn param(
        &mut self,
        name: &str,
        shape: Vec<usize>,
        role: Role,
        init: Init,
        candidate: Option<(usize, usize)>,
    ) {
        self.params.push(ParamSpec {
            name: name.to_string(),
            shape,
            role,
            init,
            candidate,
        });
    }

    fn map(&self, id: NodeId) -> (usize, usize, usize) {
        match self.nodes[id].shape {
            Shape::Map { c, h, w } => (c, h, w),
            Shape::Vector(_) => unreachable!("convolution over a vector node"),
        }
    }

    fn bn_params(
        &mut self,
        module: &str,
        channels: usize,
        candidate: Option<(usize, usize)>,
    ) -> BnNames {
        let names = BnNames::under(module);
        let c = vec![channels];
        self.param(
            &names.weight,
            c.clone(),
            Role::Learnable,
            Init::Ones,
            candidate,
        );
        self.param(
            &names.bias,
            c.clone(),
            Role::Learnable,
            Init::Zeros,
            candidate,
        );
        self.param(
            &names.running_mean,
            c.clone(),
            Role::RunningStat,
            Init::Zeros,
            candidate,
        );
        self.param(
            &names.running_var,
            c,
            Role::RunningStat,
            Init::Ones,
            candidate,
        );
        self.param(
            &names.num_batches_tracked,
            vec![],
            Role::Counter,
            Init::Zeros,
            candidate,
        );
        names
    }

    fn conv_output(
        &self,
        input: NodeId,
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Shape {
        let (_, h, w) = self.map(input);
        let size = |s: usize| (s + 2 * padding - kernel) / stride + 1;
        Shape::Map {
            c: out,
            h: size(h),
            w: size(w),
        }
    }

    /// An RGB: n candidate (conv, BN) pairs under `module`, then returns the BN node.
    fn gated_conv_bn(&mut self, module: &str, input: NodeId, out: usize, stride: usize) -> NodeId {
        let gate = self.gates.len();
        let (in_c, _, _) = self.map(input);
        let shape = vec![out, in_c, 3, 3];
        let std = (2.0 / (9 * out) as f64).sqrt();
        let conv_name = |c: usize| format!("{MODEL}.{module}.candidate_ops.{c}.0.weight");
        let weight = match self.sharing {
            Sharing::SharedConv => {
                self.param(
                    &conv_name(0),
                    shape,
                    Role::Learnable,
                    Init::Normal { std },
                    None,
                );
                Gated::fixed(conv_name(0))
            }
            Sharing::Independent => {
                let names: Vec<String> = (0..self.n).map(conv_name).collect();
                for (c, name) in names.iter().enumerate() {
                    self.param(
                        name,
                        shape.clone(),
                        Role::Learnable,
                        Init::Normal { std },
                        Some((gate, c)),
                    );
                }
                Gated {
                    gate: Some(gate),
                    candidates: names,
                }
            }
        };
        let conv_shape = self.conv_output(input, out, 3, stride, 1);
        let conv = self.push(
            Op::Conv {
                in_channels: in_c,
                out_channels: out,
                kernel: 3,
                stride,
                padding: 1,
                weight,
            },
            vec![input],
            conv_shape,
        );
        let bns: Vec<BnNames> = (0..self.n)
            .map(|c| {
                self.bn_params(
                    &format!("{MODEL}.{module}.candidate_ops.{c}.1"),
                    out,
                    Some((gate, c)),
                )
            })
            .collect();
        let bn = self.push(
            Op::BatchNorm {
                channels: out,
                params: Gated {
                    gate: Some(gate),
                    candidates: bns,
                },
            },
            vec![conv],
            conv_shape,
        );
        self.gates.push(Gate {
            module: module.to_string(),
            nodes: vec![conv, bn],
        });
        bn
    }

    /// An ungated conv (no bias) + BN pair under `module.0` / `module.1` (DVERGE's downsample).
    fn plain_conv_bn(
        &mut self,
        module: &str,
        input: NodeId,
        out: usize,
        kernel: usize,
        stride: usize,
    ) -> NodeId {
        let (in_c, _, _) = self.map(input);
        let weight = format!("{MODEL}.{module}.0.weight");
        let std = (2.0 / (kernel * kernel * out) as f64).sqrt();
        self.param(
            &weight,
            vec![out, in_c, kernel, kernel],
            Role::Learnable,
            Init::Normal { std },
            None,
        );
        let shape = self.conv_output(input, out, kernel, stride, 0);
        let conv = self.push(
            Op::Conv {
                in_channels: in_c,
                out_channels: out,
                kernel,
                stride,
                padding: 0,
                weight: Gated::fixed(weight),
            },
            vec![input],
            shape,
        );
        let bn_names = self.bn_params(&format!("{MODEL}.{module}.1"), out, None);
        self.push(
            Op::BatchNorm {
                channels: out,
                params: Gated::fixed(bn_names),
            },
            vec![conv],
            shape,
        )
    }

    fn act(&mut self, input: NodeId) -> NodeId {
        let op = match self.activation {
            Activation::Relu => Op::Relu,
            Activation::LeakyRelu => Op::LeakyRelu {
                slope: self.leaky_slope,
            },
        };
        let shape = self.nodes[input].shape;
        self.push(op, vec![input], shape)
    }

    /// The classifier; gated (independent candidates) when `gated`.
    fn linear(&mut self, module: &str, input: NodeId, gated: bool) -> NodeId {
        let in_features = self.nodes[input].shape.numel();
        let out = self.classes;
        let bound = 1.0 / (in_features as f64).sqrt();
        let gate = self.gates.len();
        let candidates: Vec<(String, Option<(usize, usize)>)> = if gated {
            (0..self.n)
                .map(|c| {
                    (
                        format!("{MODEL}.{module}.candidate_ops.{c}"),
                        Some((gate, c)),
                    )
                })
                .collect()
        } else {
            vec![(format!("{MODEL}.{module}"), None)]
        };
        let mut names = Vec::new();
        for (prefix, candidate) in candidates {
            let n = LinearNames {
                weight: format!("{prefix}.weight"),
                bias: format!("{prefix}.bias"),
            };
            self.param(
                &n.weight,
                vec![out, in_features],
                Role::Learnable,
                Init::Uniform { bound },
                candidate,
            );
            self.param(
                &n.bias,
                vec![out],
                Role::Learnable,
                Init::Uniform { bound },
                candidate,
            );
            names.push(n);
        }
        let node = self.push(
            Op::Linear {
                in_features,
                out_features: out,
                params: Gated {
                    gate: gated.then_some(gate),
                    candidates: names,
                },
            },
            vec![input],
            Shape::Vector(out),
        );
        if gated {
            self.gates.push(Gate {
                module: module.to_string(),
                nodes: vec![node],
            });
        }
        node
    }

    /// DVERGE's CIFAR ResNet-(6k+2): stem, three stages of k BasicBlocks, GAP, fc.
    fn resnet(&mut self, depth: usize) -> Result<(), PlanError> {
        if depth < 8 || !(depth - 2).is_multiple_of(6) {
            return Err(PlanError::ResNetDepth { depth });
        }
        let blocks = (depth - 2) / 6;
        self.name = format!("resnet{depth}");
        let stem_bn = self.gated_conv_bn("conv1", 1, self.channels(16), 1);
        let mut x = self.act(stem_bn);
        self.layers.push(("conv1+bn (stem)".into(), stem_bn, x));
        for (stage, base) in [16usize, 32, 64].into_iter().enumerate() {
            let planes = self.channels(base);
            for block in 0..blocks {
                let stride = if stage > 0 && block == 0 { 2 } else { 1 };
                let module = format!("layer{}.{block}", stage + 1);
                let bn1 = self.gated_conv_bn(&format!("{module}.conv1"), x, planes, stride);
                let h = self.act(bn1);
                self.layers.push((format!("{module}.conv1+bn"), bn1, h));
                let bn2 = self.gated_conv_bn(&format!("{module}.conv2"), h, planes, 1);
                let (in_planes, _, _) = self.map(x);
                let shortcut = if stride != 1 || in_planes != planes {
                    self.plain_conv_bn(&format!("{module}.downsample"), x, planes, 1, stride)
                } else {
                    x
                };
                let shape = self.nodes[bn2].shape;
                let sum = self.push(Op::Add, vec![bn2, shortcut], shape);
                x = self.act(sum);
                self.layers
                    .push((format!("{module} (block output)"), sum, x));
            }
        }
        let (c, _, _) = self.map(x);
        let pooled = self.push(Op::GlobalAvgPool, vec![x], Shape::Vector(c));
        let logits = self.linear("fc", pooled, false);
        self.layers.push(("logits".into(), logits, logits));
        Ok(())
    }

    /// CIFAR VGG-16 with BatchNorm: 13 conv+BN+activation blocks in five stages separated by
    /// 2x2 max pools, then one linear classifier.
    fn vgg16(&mut self, gating: VggGating) -> Result<(), PlanError> {
        let size = match self.input {
            Shape::Map { h, .. } => h,
            Shape::Vector(n) => n,
        };
        if size == 0 || size % 32 != 0 {
            return Err(PlanError::VggInputSize { size });
        }
        if gating == VggGating::ConvsAndClassifier && self.sharing == Sharing::SharedConv {
            return Err(PlanError::SharedClassifier);
        }
        self.name = "vgg16".into();
        const STAGES: [(usize, usize); 5] = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)];
        let mut x = 1;
        let mut index = 0;
        for (base, convs) in STAGES {
            for _ in 0..convs {
                let bn =
                    self.gated_conv_bn(&format!("features.{index}"), x, self.channels(base), 1);
                x = self.act(bn);
                self.layers
                    .push((format!("features.{index}.conv+bn"), bn, x));
                index += 1;
            }
            let (c, h, w) = self.map(x);
            x = self.push(
                Op::MaxPool2,
                vec![x],
                Shape::Map {
                    c,
                    h: h / 2,
                    w: w / 2,
                },
            );
        }
        let numel = self.nodes[x].shape.numel();
        let flat = self.push(Op::Flatten, vec![x], Shape::Vector(numel));
        let logits = self.linear("classifier", flat, gating == VggGating::ConvsAndClassifier);
        self.layers.push(("logits".into(), logits, logits));
        Ok(())
    }

    fn finish(self) -> Plan {
        let mut plan = Plan {
            name: self.name,
            n: self.n,
            sharing: self.sharing,
            input: self.input,
            classes: self.classes,
            nodes: self.nodes,
            gates: self.gates,
            layers: vec![],
            params: self.params,
        };
        let deps = plan.gate_dependencies();
        plan.layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, (name, before_relu, after_relu))| Layer {
                index: i + 1,
                name,
                before_relu,
                after_relu,
                depth: deps[after_relu].iter().next_back().map_or(0, |&g| g + 1),
            })
            .collect();
        plan
    }
}

impl Plan {
    /// A human-readable table of the plan: nodes, RGBs, distillation layers with d(l), every
    /// tensor with its shape, and the parameter count.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let shape = |sh: &Shape| match *sh {
            Shape::Map { c, h, w } => format!("{c}x{h}x{w}"),
            Shape::Vector(n) => format!("{n}"),
        };
        let _ = writeln!(
            s,
            "{}: n = {}, sharing = {:?}, input {}, {} classes, K = {} RGBs, L = {} layers, {} paths",
            self.name,
            self.n,
            self.sharing,
            shape(&self.input),
            self.classes,
            self.k(),
            self.l(),
            self.path_space()
                .count()
                .map_or_else(|e| e.to_string(), |c| c.to_string())
        );
        let _ = writeln!(s, "\nnodes:");
        for (id, node) in self.nodes.iter().enumerate() {
            let op = match &node.op {
                Op::Input => "input".to_string(),
                Op::Normalize { .. } => "normalize".to_string(),
                Op::Conv {
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                    weight,
                } => format!(
                    "conv {in_channels}->{out_channels} k{kernel} s{stride} p{padding}{}",
                    gate_tag(weight.gate)
                ),
                Op::BatchNorm { channels, params } => {
                    format!("bn {channels}{}", gate_tag(params.gate))
                }
                Op::Relu => "relu".to_string(),
                Op::LeakyRelu { slope } => format!("leaky-relu {slope}"),
                Op::Add => "add".to_string(),
                Op::MaxPool2 => "maxpool 2x2".to_string(),
                Op::GlobalAvgPool => "global-avg-pool".to_string(),
                Op::Flatten => "flatten".to_string(),
                Op::Linear {
                    in_features,
                    out_features,
                    params,
                } => format!(
                    "linear {in_features}->{out_features}{}",
                    gate_tag(params.gate)
                ),
            };
            let _ = writeln!(
                s,
                "  {id:>3} {op:<32} <- {:?} -> {}",
                node.inputs,
                shape(&node.shape)
            );
        }
        let _ = writeln!(s, "\nRGBs:");
        for (g, gate) in self.gates.iter().enumerate() {
            let _ = writeln!(s, "  {:>3} {} (nodes {:?})", g + 1, gate.module, gate.nodes);
        }
        let _ = writeln!(
            s,
            "\ndistillation layers (l, d(l), before-ReLU node, after-ReLU node):"
        );
        for layer in &self.layers {
            let _ = writeln!(
                s,
                "  {:>3} d={:<3} {:>3} {:>3}  {}",
                layer.index, layer.depth, layer.before_relu, layer.after_relu, layer.name
            );
        }
        let _ = writeln!(s, "\ntensors:");
        for p in &self.params {
            let _ = writeln!(s, "  {:<60} {:?} {:?}", p.name, p.shape, p.role);
        }
        let buffers: usize = self
            .params
            .iter()
            .filter(|p| p.role != Role::Learnable)
            .map(ParamSpec::numel)
            .sum();
        let _ = writeln!(
            s,
            "\n{} tensors, {} learnable parameters, {} buffer elements",
            self.params.len(),
            self.parameter_count(),
            buffers
        );
        s
    }
}

fn gate_tag(gate: Option<usize>) -> String {
    gate.map_or_else(String::new, |g| format!(" [RGB {}]", g + 1))
}

impl ParamSpec {
    /// Draws this tensor's initial values (row-major) from `rng` as [`ParamSpec::init`] says.
    /// Counters start at 0 (returned as `0.0`).
    pub fn initial_values<R: rand::Rng + ?Sized>(&self, rng: &mut R) -> Vec<f64> {
        use rand_distr::{Distribution, Normal, Uniform};
        let count = self.numel();
        match &self.init {
            Init::Normal { std } => {
                let normal = Normal::new(0.0, *std).expect("std is finite and positive");
                (0..count).map(|_| normal.sample(rng)).collect()
            }
            Init::Uniform { bound } => {
                let uniform = Uniform::new_inclusive(-bound, *bound).expect("bound is finite");
                (0..count).map(|_| uniform.sample(rng)).collect()
            }
            Init::Ones => vec![1.0; count],
            Init::Zeros => vec![0.0; count],
            Init::Values(values) => values.clone(),
        }
    }
}

impl Plan {
    /// The initial value of every tensor, drawn in [`Plan::params`] order from the
    /// [`crate::rng::Stream::Init`] stream split `member` (the member of an ensemble; 0 for a
    /// single model). Every engine starts from exactly these numbers.
    pub fn initial_values(
        &self,
        seeds: &crate::rng::Seeds,
        member: u64,
    ) -> Vec<(String, Vec<f64>)> {
        let mut rng = seeds.stream(crate::rng::Stream::Init, member);
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.initial_values(&mut rng)))
            .collect()
    }
}

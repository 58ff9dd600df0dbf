//! The RGN as an interpreter of the `eio-spec` plan, as explicit forward and backward passes
//! over [`crate::ops`] (the same structure as `eio_reference::model`, which documents the
//! semantics). No autograd: each pass keeps what its backward needs in a [`Trace`].

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};
use eio_spec::attack::SkipGradient;
use eio_spec::config::BnMode;
use eio_spec::plan::{BnNames, Gated, NodeId, Op, Plan};
use eio_spec::Path;

use crate::ops;
use crate::state::ModelState;

/// New running statistics of one BatchNorm after a train-mode pass.
#[derive(Debug, Clone)]
pub struct RunningUpdate {
    pub mean_name: String,
    pub var_name: String,
    pub counter_name: String,
    pub mean: Tensor,
    pub var: Tensor,
    pub num_batches_tracked: i64,
}

/// The outputs of one forward pass along one path, or of a path-batched pass
/// ([`forward_groups`]) along one path per group of images.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The path of each group of the batch, in order (one for a plain pass).
    pub paths: Vec<Path>,
    pub mode: BnMode,
    /// Output of every node up to the last one computed: all of them after [`forward`]; after
    /// [`forward_for_backward`], `None` where a fused op never wrote it (see [`Keep`]).
    pub outputs: Vec<Option<Tensor>>,
    /// Per BatchNorm node: what its backward needs.
    pub bn: BTreeMap<NodeId, ops::BnSaved>,
    /// Running statistics after the pass (train mode only), to [`ModelState::commit`].
    pub running: Vec<RunningUpdate>,
}

impl Trace {
    /// The output of node `id`.
    ///
    /// # Panics
    /// If the pass did not compute node `id`, or did not keep its output (a node
    /// [`forward_for_backward`] fuses into the op after it; [`forward`] keeps every output).
    pub fn output(&self, id: NodeId) -> &Tensor {
        self.outputs[id].as_ref().unwrap_or_else(|| {
            panic!("node {id}'s output is not kept by a forward_for_backward trace (use forward)")
        })
    }

    /// The last output (the logits of a full pass).
    pub fn last(&self) -> &Tensor {
        self.output(self.len() - 1)
    }

    /// How many nodes the pass ran (nodes 0..len).
    pub fn len(&self) -> usize {
        self.outputs.len()
    }

    /// Whether the pass ran no node (never: every pass computes at least the input).
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
    }

    /// The path of a plain pass (along one path).
    ///
    /// # Errors
    /// If the pass was path-batched over several groups.
    pub fn one_path(&self) -> Result<&Path> {
        match self.paths.as_slice() {
            [path] => Ok(path),
            paths => candle_core::bail!(
                "a pass along one path was expected, this one batched {} paths",
                paths.len()
            ),
        }
    }
}

impl ModelState {
    /// Stores the running statistics a train-mode pass produced.
    pub fn commit(&mut self, trace: &Trace) {
        for u in &trace.running {
            self.tensors.insert(u.mean_name.clone(), u.mean.clone());
            self.tensors.insert(u.var_name.clone(), u.var.clone());
            self.counters
                .insert(u.counter_name.clone(), u.num_batches_tracked);
        }
    }
}

/// Gradients of a scalar objective: by tensor name, and with respect to the input.
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    pub params: BTreeMap<String, Tensor>,
    pub input: Option<Tensor>,
}

impl Gradients {
    /// Adds `grad` to the gradient of `name`.
    ///
    /// # Errors
    /// On a device error.
    pub fn accumulate(&mut self, name: &str, grad: Tensor) -> Result<()> {
        accumulate(&mut self.params, name, grad)
    }

    /// Adds every gradient of `other`.
    ///
    /// # Errors
    /// On a device error.
    pub fn add(&mut self, other: Gradients) -> Result<()> {
        for (name, grad) in other.params {
            self.accumulate(&name, grad)?;
        }
        if let Some(input) = other.input {
            self.input = Some(match self.input.take() {
                Some(total) => (total + input)?,
                None => input,
            });
        }
        Ok(())
    }
}

/// Runs nodes 0..=`end` along `path` on `input` (`[N, C, H, W]`, pixels in [0, 1]), keeping
/// every node's output.
///
/// # Errors
/// On a device error.
pub fn forward(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    input: &Tensor,
    mode: BnMode,
    end: NodeId,
) -> Result<Trace> {
    traced(
        plan,
        state,
        std::slice::from_ref(path),
        input,
        mode,
        end,
        Keep::All,
    )
}

/// [`forward`] keeping only what [`backward`] and [`input_gradient`] read ([`Keep::Backward`]):
/// the outputs of training steps, attacks and Eq. 2, with fewer writes. The kept outputs and
/// the gradients after it are identical to [`forward`]'s.
///
/// # Errors
/// On a device error.
pub fn forward_for_backward(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    input: &Tensor,
    mode: BnMode,
    end: NodeId,
) -> Result<Trace> {
    traced(
        plan,
        state,
        std::slice::from_ref(path),
        input,
        mode,
        end,
        Keep::Backward,
    )
}

/// Path batching: the passes of [`forward_for_backward`] along each of `paths` as one pass.
/// `input` holds one group of images per path, in order (`[G·N, C, H, W]` for G paths); group
/// g runs along `paths[g]`. Every op runs once over the whole batch where the groups agree (a
/// convolution whose weight all paths select, every elementwise op) and per group where they
/// do not; BatchNorm normalises each group with its path's candidate and, in train mode, its
/// own batch statistics ([`ops::BnSaved`]'s segments), and the running statistics are
/// updated group after group, as the passes one after the other would. Each group's outputs
/// are bit for bit those of its own pass, and [`backward_groups`] / [`input_gradient`] give
/// each group's gradients as its own pass would.
///
/// # Errors
/// If `paths` is empty or the batch does not split into `paths.len()` equal groups; on a
/// device error.
pub fn forward_groups(
    plan: &Plan,
    state: &ModelState,
    paths: &[Path],
    input: &Tensor,
    mode: BnMode,
    end: NodeId,
) -> Result<Trace> {
    traced(plan, state, paths, input, mode, end, Keep::Backward)
}

fn traced(
    plan: &Plan,
    state: &ModelState,
    paths: &[Path],
    input: &Tensor,
    mode: BnMode,
    end: NodeId,
    keep: Keep,
) -> Result<Trace> {
    let (outputs, bn, running) = run_nodes(plan, state, paths, input, mode, end, keep)?;
    Ok(Trace {
        paths: paths.to_vec(),
        mode,
        outputs,
        bn,
        running,
    })
}

/// The eval-mode logits along `path` without a trace: each activation is dropped as soon as
/// its last reader has run, and nothing is kept for a backward pass, so a large batch needs
/// only a few activations' memory (predictions, clean accuracy). The same ops on the same
/// values as [`logits`], so the logits are identical.
///
/// # Errors
/// On a device error.
pub fn eval_logits(plan: &Plan, state: &ModelState, path: &Path, input: &Tensor) -> Result<Tensor> {
    let end = plan.logits();
    let paths = std::slice::from_ref(path);
    let (mut outputs, _, _) = run_nodes(plan, state, paths, input, BnMode::Eval, end, Keep::Live)?;
    Ok(outputs[end].take().expect("the last output is kept"))
}

/// What a forward pass keeps of the outputs it computes. Fused ops apply wherever an output
/// need not be kept: a BatchNorm or residual add with the ReLU after it, and a residual
/// block's last BatchNorm with its add (and ReLU); every fused op computes the same values
/// as the ops it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Every node's output ([`forward`]): BatchNorm + ReLU and add + ReLU still run fused,
    /// writing both outputs.
    All,
    /// Every output [`propagate`] reads ([`forward_for_backward`]): not the output of a
    /// BatchNorm or add whose only reader is the fused op after it (the ReLU's backward reads
    /// the ReLU's own output as its mask, BatchNorm's reads what [`ops::BnSaved`] holds).
    Backward,
    /// Each output until its last reader has run, nothing for a backward pass
    /// ([`eval_logits`]).
    Live,
}

type NodeRun = (
    Vec<Option<Tensor>>,
    BTreeMap<NodeId, ops::BnSaved>,
    Vec<RunningUpdate>,
);

/// How a batch of one group of images per path splits (path batching, [`forward_groups`]).
#[derive(Debug, Clone, Copy)]
struct Groups<'a> {
    paths: &'a [Path],
    /// Images per group.
    size: usize,
}

impl<'a> Groups<'a> {
    fn new(paths: &'a [Path], batch: usize) -> Result<Self> {
        if paths.is_empty() || !batch.is_multiple_of(paths.len()) {
            candle_core::bail!(
                "a batch of {batch} images does not split into {} equal groups, one per path",
                paths.len()
            );
        }
        Ok(Groups {
            paths,
            size: batch / paths.len(),
        })
    }

    fn count(&self) -> usize {
        self.paths.len()
    }

    /// Consecutive groups whose paths select the same entry of `gated` (Eq. 1): (first
    /// image, images, entry) per run, one run for an ungated op or a weight all paths share.
    fn runs<T: PartialEq>(&self, gated: &'a Gated<T>) -> Vec<(usize, usize, &'a T)> {
        let mut runs: Vec<(usize, usize, &T)> = Vec::new();
        for (g, path) in self.paths.iter().enumerate() {
            let entry = gated.select(path);
            match runs.last_mut() {
                Some(run) if run.2 == entry => run.1 += self.size,
                _ => runs.push((g * self.size, self.size, entry)),
            }
        }
        runs
    }

    /// The entry of `gated` each group's path selects.
    fn each<T>(&self, gated: &'a Gated<T>) -> Vec<&'a T> {
        self.paths.iter().map(|p| gated.select(p)).collect()
    }

    /// Group `g`'s images of `t`, a view.
    fn of(&self, t: &Tensor, g: usize) -> Result<Tensor> {
        t.narrow(0, g * self.size, self.size)
    }
}

/// `op` on each run of `runs` (its first image, image count and entry; each call narrows the
/// tensors it reads to those images) joined along the batch: one call when all groups select
/// the same entry.
fn per_run<T>(
    runs: &[(usize, usize, &T)],
    mut op: impl FnMut(usize, usize, &T) -> Result<Tensor>,
) -> Result<Tensor> {
    match runs {
        [(first, len, entry)] => op(*first, *len, entry),
        _ => Tensor::cat(
            &runs
                .iter()
                .map(|&(first, len, entry)| op(first, len, entry))
                .collect::<Result<Vec<_>>>()?,
            0,
        ),
    }
}

/// The tensors `names` name, one `[C]` tensor each, as one `[G·C]` tensor (the tensor itself
/// for one name).
fn stacked(state: &ModelState, names: &[&String]) -> Result<Tensor> {
    match names {
        [one] => Ok(state.tensor(one).clone()),
        all => Tensor::cat(&all.iter().map(|n| state.tensor(n)).collect::<Vec<_>>(), 0),
    }
}

/// Runs nodes 0..=`end`, keeping what `keep` says.
fn run_nodes(
    plan: &Plan,
    state: &ModelState,
    paths: &[Path],
    input: &Tensor,
    mode: BnMode,
    end: NodeId,
    keep: Keep,
) -> Result<NodeRun> {
    let groups = Groups::new(paths, input.dim(0)?)?;
    let train = mode == BnMode::Train;
    let nodes = &plan.nodes[..=end];
    // Each node's readers within the pass.
    let mut readers: Vec<Vec<NodeId>> = vec![Vec::new(); end + 1];
    for (id, node) in nodes.iter().enumerate() {
        for &k in &node.inputs {
            readers[k].push(id);
        }
    }
    // A BatchNorm whose only reader is a residual add, as the add's first input (the residual
    // branch; a downsampling shortcut's BatchNorm, the second input, runs on its own), runs
    // inside that add (not in a full trace, which keeps the BatchNorm's output).
    let into_add = |id: NodeId| -> Option<NodeId> {
        match (&nodes[id].op, readers[id].as_slice()) {
            (Op::BatchNorm { .. }, &[add])
                if keep != Keep::All
                    && nodes[add].op == Op::Add
                    && nodes[add].inputs.first() == Some(&id) =>
            {
                Some(add)
            }
            _ => None,
        }
    };
    // The outputs each node's op reads when it runs: a fused BatchNorm's input is read by its
    // add, the BatchNorm itself reads nothing.
    let reads: Vec<Vec<NodeId>> = (0..=end)
        .map(|id| {
            if into_add(id).is_some() {
                return Vec::new();
            }
            nodes[id]
                .inputs
                .iter()
                .map(|&k| match into_add(k) {
                    Some(_) => nodes[k].inputs[0],
                    None => k,
                })
                .collect()
        })
        .collect();
    let mut last_reader: Vec<NodeId> = (0..=end).collect();
    for (id, inputs) in reads.iter().enumerate() {
        for &k in inputs {
            last_reader[k] = last_reader[k].max(id);
        }
    }
    // Whether node `id`'s output must be written although the fused op after it also writes
    // the ReLU's: read by another node, or kept by a full trace.
    let write_also = |id: NodeId| keep == Keep::All || last_reader[id] > id + 1;
    let mut outputs: Vec<Option<Tensor>> = Vec::with_capacity(end + 1);
    let mut bn = BTreeMap::new();
    let mut running = Vec::new();
    let mut id = 0;
    while id <= end {
        let node = &plan.nodes[id];
        let x = |k: usize| {
            outputs[node.inputs[k]]
                .as_ref()
                .expect("an output is kept until its last reader ran")
        };
        // A BatchNorm or residual add whose output only the next node, a ReLU, reads (within
        // this pass) runs fused with that ReLU: one op writes both outputs.
        let relu_next = id < end && fused_relu(plan, id);
        let mut relu_out = None;
        let out = match &node.op {
            Op::Input => Some(input.clone()),
            Op::Normalize { mean, std } => {
                Some(ops::normalize(x(0), state.tensor(mean), state.tensor(std))?)
            }
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => Some(per_run(&groups.runs(weight), |first, len, name| {
                ops::conv2d(
                    &x(0).narrow(0, first, len)?,
                    state.tensor(name),
                    *stride,
                    *padding,
                )
            })?),
            // Runs inside the add that reads it.
            Op::BatchNorm { .. } if into_add(id).is_some() => None,
            Op::BatchNorm { params, .. } => {
                let bn_op = BnOp::new(state, params, groups, train)?;
                let (y, z, saved) = ops::batch_norm_relu(
                    x(0),
                    bn_op.affine(),
                    bn_op.stats(),
                    train,
                    (!relu_next || write_also(id), relu_next),
                    &bn_op.segments,
                )?;
                relu_out = z;
                bn_op.finish(id, saved, keep, (&mut bn, &mut running))?;
                y
            }
            Op::Relu => Some(ops::relu(x(0))?),
            Op::LeakyRelu { slope } => Some(ops::leaky_relu(x(0), *slope)?),
            Op::Add => {
                let keep_sum = !relu_next || write_also(id);
                let (sum, z) = match into_add(node.inputs[0]) {
                    Some(_) => {
                        let bn_id = node.inputs[0];
                        let Op::BatchNorm { params, .. } = &plan.nodes[bn_id].op else {
                            unreachable!("into_add matches BatchNorms only")
                        };
                        let bn_input = outputs[plan.nodes[bn_id].inputs[0]]
                            .as_ref()
                            .expect("a fused BatchNorm's input is kept until its add");
                        let bn_op = BnOp::new(state, params, groups, train)?;
                        let (sum, z, saved) = ops::batch_norm_add_relu(
                            bn_input,
                            bn_op.affine(),
                            bn_op.stats(),
                            train,
                            x(1),
                            (keep_sum, relu_next),
                            &bn_op.segments,
                        )?;
                        bn_op.finish(bn_id, saved, keep, (&mut bn, &mut running))?;
                        (sum, z)
                    }
                    None => ops::add_relu(x(0), x(1), (keep_sum, relu_next))?,
                };
                relu_out = z;
                sum
            }
            Op::MaxPool2 => Some(ops::max_pool2(x(0))?),
            Op::GlobalAvgPool => Some(ops::global_avg_pool(x(0))?),
            Op::Flatten => Some(x(0).flatten_from(1)?),
            Op::Linear { params, .. } => {
                Some(per_run(&groups.runs(params), |first, len, names| {
                    ops::linear(
                        &x(0).narrow(0, first, len)?,
                        state.tensor(&names.weight),
                        state.tensor(&names.bias),
                    )
                })?)
            }
        };
        outputs.push(out);
        let ran = match relu_out {
            Some(z) => {
                outputs.push(Some(z));
                id..=id + 1
            }
            None => id..=id,
        };
        if keep == Keep::Live {
            for done in ran.clone() {
                for &k in &reads[done] {
                    if last_reader[k] == done && k != end {
                        outputs[k] = None;
                    }
                }
            }
        }
        id = ran.end() + 1;
    }
    Ok((outputs, bn, running))
}

/// One BatchNorm node's parameters and running statistics along each group's path, as
/// per-channel tensors of one set of `C` values per group ([`ops::BnSaved`]'s segments), and
/// the bookkeeping after its pass.
struct BnOp<'a> {
    /// The names each group's path selects.
    names: Vec<&'a BnNames>,
    /// Images per segment: one segment per group.
    segments: Vec<usize>,
    affine: (Tensor, Tensor),
    stats: (Tensor, Tensor),
    state: &'a ModelState,
    train: bool,
}

impl<'a> BnOp<'a> {
    fn new(
        state: &'a ModelState,
        params: &'a Gated<BnNames>,
        groups: Groups<'a>,
        train: bool,
    ) -> Result<Self> {
        let names = groups.each(params);
        let tensors = |name: fn(&BnNames) -> &String| {
            stacked(state, &names.iter().map(|n| name(n)).collect::<Vec<_>>())
        };
        Ok(BnOp {
            affine: (tensors(|n| &n.weight)?, tensors(|n| &n.bias)?),
            stats: (tensors(|n| &n.running_mean)?, tensors(|n| &n.running_var)?),
            segments: vec![groups.size; groups.count()],
            names,
            state,
            train,
        })
    }

    fn affine(&self) -> (&Tensor, &Tensor) {
        (&self.affine.0, &self.affine.1)
    }

    fn stats(&self) -> (&Tensor, &Tensor) {
        (&self.stats.0, &self.stats.1)
    }

    /// Records the new running statistics (train mode; group after group, each from what the
    /// groups before it left, as passes one after the other would) and, in a trace, what the
    /// backward pass reads.
    fn finish(
        &self,
        id: NodeId,
        saved: ops::BnSaved,
        keep: Keep,
        (bn, running): (&mut BTreeMap<NodeId, ops::BnSaved>, &mut Vec<RunningUpdate>),
    ) -> Result<()> {
        if self.train {
            let first = running.len();
            for (group, names) in self.names.iter().enumerate() {
                let before = running[first..]
                    .iter()
                    .rev()
                    .find(|u| u.mean_name == names.running_mean);
                let (mean, var, count) = match before {
                    Some(u) => (&u.mean, &u.var, u.num_batches_tracked),
                    None => (
                        self.state.tensor(&names.running_mean),
                        self.state.tensor(&names.running_var),
                        self.state
                            .counters
                            .get(&names.num_batches_tracked)
                            .copied()
                            .unwrap_or(0),
                    ),
                };
                let (mean, var) = ops::batch_norm_running_update(mean, var, &saved, group)?;
                running.push(RunningUpdate {
                    mean_name: names.running_mean.clone(),
                    var_name: names.running_var.clone(),
                    counter_name: names.num_batches_tracked.clone(),
                    mean,
                    var,
                    num_batches_tracked: count + 1,
                });
            }
        }
        if keep != Keep::Live {
            bn.insert(id, saved);
        }
        Ok(())
    }
}

/// Whether node `id` (a BatchNorm or a residual add) runs fused with the node after it: a ReLU
/// reading only `id`, in a plan where [`ops::batch_norm_relu`] / [`ops::add_relu`] apply.
fn fused_relu(plan: &Plan, id: NodeId) -> bool {
    matches!(plan.nodes[id].op, Op::BatchNorm { .. } | Op::Add)
        && plan
            .nodes
            .get(id + 1)
            .is_some_and(|next| matches!(next.op, Op::Relu) && next.inputs == [id])
}

/// The logits along `path` and the trace of the pass ([`forward_for_backward`]'s).
///
/// # Errors
/// On a device error.
pub fn logits(
    plan: &Plan,
    state: &ModelState,
    path: &Path,
    input: &Tensor,
    mode: BnMode,
) -> Result<(Tensor, Trace)> {
    let trace = forward_for_backward(plan, state, path, input, mode, plan.logits())?;
    Ok((trace.last().clone(), trace))
}

/// Back-propagates `seeds` (dL/d(output) at nodes) through the pass in `trace`: every
/// parameter gradient and dL/d(input). The same as [`backward_with`] without SGM.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If a seed's node was not computed by the pass.
pub fn backward(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, Tensor)],
) -> Result<Gradients> {
    backward_with(plan, state, trace, seeds, None)
}

/// [`backward`] with SGM, the skip-gradient method (Wu et al. 2020, "Skip Connections Matter",
/// Sec. 3), when `skip` is set: at every residual add y = r + s of the plan
/// ([`Plan::residual_blocks`]), the upstream gradient g is first divided by its unbiased
/// standard deviation when `skip.normalise`, then the residual branch r receives
/// `skip.branch_factor(block)`·g and the skip path s receives g
/// ([`ops::skip_gradient_add_backward`]; `eio_reference::model::backward_with`). Every other
/// node back-propagates as in [`backward`]; with `None` the result is [`backward`]'s.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If a seed's node was not computed by the pass.
pub fn backward_with(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, Tensor)],
    skip: Option<&SkipGradient>,
) -> Result<Gradients> {
    let Propagated { groups, input } = propagate(plan, state, trace, seeds, skip, true)?;
    let mut total = Gradients::default();
    for params in groups {
        total.add(Gradients {
            params,
            input: None,
        })?;
    }
    total.input = input;
    Ok(total)
}

/// [`backward`] of a path-batched pass ([`forward_groups`]), one [`Gradients`] per group: the
/// parameter gradients the group's own pass gives and the group's rows of dL/d(input). Adding
/// them in order to a running total gives the sums of the passes one after the other.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If a seed's node was not computed by the pass.
pub fn backward_groups(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, Tensor)],
) -> Result<Vec<Gradients>> {
    let Propagated { groups, input } = propagate(plan, state, trace, seeds, None, true)?;
    let size = trace.output(0).dim(0)? / groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(g, params)| {
            Ok(Gradients {
                params,
                input: input
                    .as_ref()
                    .map(|t| t.narrow(0, g * size, size))
                    .transpose()?,
            })
        })
        .collect()
}

/// dL/d(input) of `seeds` back-propagated through the pass in `trace`, without the
/// parameter gradients (what PGD and Eq. 2 need). The same traversal and the same dL/dx
/// kernels as [`backward`], so the value is identical to `backward(..).input`.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If a seed's node was not computed by the pass, or no seed reaches the input.
pub fn input_gradient(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, Tensor)],
) -> Result<Tensor> {
    input_gradient_with(plan, state, trace, seeds, None)
}

/// [`input_gradient`] with SGM's scaling at the residual adds when `skip` is set (see
/// [`backward_with`]); identical to `backward_with(.., skip)?.input`.
///
/// # Errors
/// On a device error.
///
/// # Panics
/// If a seed's node was not computed by the pass, or no seed reaches the input.
pub fn input_gradient_with(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, Tensor)],
    skip: Option<&SkipGradient>,
) -> Result<Tensor> {
    Ok(propagate(plan, state, trace, seeds, skip, false)?
        .input
        .expect("the pass starts at the input"))
}

/// The gradients reaching one node in a backward pass, summed in their order of arrival:
/// `((g₁ + g₂) + g₃) + …`, the last add left undone until the node is reached, so a ReLU can
/// do it in its own pass ([`ops::relu_backward_of_sum`]).
#[derive(Debug, Clone, Default)]
struct Incoming {
    /// The sum of all but the last gradient (or the only one).
    sum: Option<Tensor>,
    /// The last gradient, when there are two or more.
    last: Option<Tensor>,
}

impl Incoming {
    fn add(&mut self, g: Tensor) -> Result<()> {
        match (self.sum.take(), self.last.take()) {
            (None, _) => self.sum = Some(g),
            (Some(sum), None) => (self.sum, self.last) = (Some(sum), Some(g)),
            (Some(sum), Some(last)) => {
                (self.sum, self.last) = (Some(ops::add(&sum, &last)?), Some(g))
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.sum.is_none()
    }

    /// The sum, and the slot emptied.
    fn take(&mut self) -> Result<Option<Tensor>> {
        match self.parts() {
            (Some(sum), Some(last)) => Ok(Some(ops::add(&sum, &last)?)),
            (sum, _) => Ok(sum),
        }
    }

    /// The sum of all but the last gradient and the last one, and the slot emptied.
    fn parts(&mut self) -> (Option<Tensor>, Option<Tensor>) {
        (self.sum.take(), self.last.take())
    }
}

/// What a backward traversal gives: each group's parameter gradients (one entry for a plain
/// pass; empty maps without `with_params`) and dL/d(input) of the whole batch.
struct Propagated {
    groups: Vec<BTreeMap<String, Tensor>>,
    input: Option<Tensor>,
}

/// Adds `grad` to the gradient of `name` in `params`.
fn accumulate(params: &mut BTreeMap<String, Tensor>, name: &str, grad: Tensor) -> Result<()> {
    let total = match params.remove(name) {
        Some(total) => (total + grad)?,
        None => grad,
    };
    params.insert(name.to_string(), total);
    Ok(())
}

/// The backward traversal of [`backward_with`] / [`backward_groups`] (`with_params`) and
/// [`input_gradient_with`] (not `with_params`: only dL/dx of each op). In a path-batched pass,
/// dL/dx runs once over the batch wherever the forward op did, and each parameter gradient is
/// taken per group from the group's images, so that it is the one the group's own pass gives.
fn propagate(
    plan: &Plan,
    state: &ModelState,
    trace: &Trace,
    seeds: &[(NodeId, Tensor)],
    skip: Option<&SkipGradient>,
    with_params: bool,
) -> Result<Propagated> {
    let last = trace.len() - 1;
    let groups = Groups::new(&trace.paths, trace.output(0).dim(0)?)?;
    if skip.is_some_and(|s| s.normalise) && groups.count() > 1 {
        candle_core::bail!(
            "SGM's normalised gradient is taken over one batch; this pass batched {} paths",
            groups.count()
        );
    }
    // SGM: the branch factor of each residual add node.
    let branch_factors: BTreeMap<NodeId, f64> = skip.map_or_else(BTreeMap::new, |skip| {
        plan.residual_blocks()
            .iter()
            .map(|block| (block.add, skip.branch_factor(block)))
            .collect()
    });
    let mut node_grads: Vec<Incoming> = vec![Incoming::default(); last + 1];
    fn add(slot: &mut Incoming, g: Tensor) -> Result<()> {
        slot.add(g)
    }
    // How many nodes of the pass read each node's output.
    let mut readers = vec![0usize; last + 1];
    for node in &plan.nodes[..=last] {
        for &k in &node.inputs {
            readers[k] += 1;
        }
    }
    for (id, grad) in seeds {
        assert!(
            *id <= last,
            "seed at node {id}, but the pass stopped at node {last}"
        );
        add(&mut node_grads[*id], grad.clone())?;
    }
    let train = trace.mode == BnMode::Train;
    let mut params: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); groups.count()];
    let mut input_grad = None;
    // Each group's γ of a BatchNorm, as one `[G·C]` tensor.
    let gammas = |bn: &'_ Gated<BnNames>| {
        stacked(
            state,
            &groups
                .each(bn)
                .iter()
                .map(|n| &n.weight)
                .collect::<Vec<_>>(),
        )
    };
    // Each group's (dL/dγ, dL/dβ) from `[G·C]` tensors, into its parameter gradients.
    fn add_bn_params(
        params: &mut [BTreeMap<String, Tensor>],
        names: Vec<&BnNames>,
        (gg, gb): (Tensor, Tensor),
    ) -> Result<()> {
        let c = gg.dim(0)? / names.len();
        for (g, names) in names.into_iter().enumerate() {
            accumulate(&mut params[g], &names.weight, gg.narrow(0, g * c, c)?)?;
            accumulate(&mut params[g], &names.bias, gb.narrow(0, g * c, c)?)?;
        }
        Ok(())
    }
    // In an input-only pass through an eval-mode BatchNorm whose input is a convolution that
    // nothing else reads or seeds, BatchNorm's dL/dx is left for that convolution to compute
    // while reading it (ops::conv2d_backward_input_through_bn): by convolution node, the
    // gradient at the BatchNorm (or at its ReLU, whose output is the mask), the ReLU node if
    // any and the BatchNorm node.
    let mut through_bn: BTreeMap<NodeId, (Tensor, Option<NodeId>, NodeId)> = BTreeMap::new();
    let defer_to = |bn_id: NodeId, node_grads: &[Incoming]| -> Option<NodeId> {
        let conv = plan.nodes[bn_id].inputs[0];
        (!with_params
            && !train
            && matches!(&plan.nodes[conv].op, Op::Conv { weight, .. } if groups.runs(weight).len() == 1)
            && readers[conv] == 1
            && node_grads[conv].is_empty())
        .then_some(conv)
    };
    for id in (0..=last).rev() {
        if let Some((g, relu, bn_id)) = through_bn.remove(&id) {
            let node = &plan.nodes[id];
            let (
                Op::Conv {
                    stride,
                    padding,
                    weight,
                    ..
                },
                Op::BatchNorm { params, .. },
            ) = (&node.op, &plan.nodes[bn_id].op)
            else {
                unreachable!("deferred from a BatchNorm to the convolution before it")
            };
            let gx = ops::conv2d_backward_input_through_bn(
                trace.output(node.inputs[0]),
                state.tensor(groups.runs(weight)[0].2),
                (&g, relu.map(|r| trace.output(r))),
                (&gammas(params)?, &trace.bn[&bn_id]),
                *stride,
                *padding,
            )?;
            add(&mut node_grads[node.inputs[0]], gx)?;
            continue;
        }
        let node = &plan.nodes[id];
        // A ReLU reached by several gradients (a residual block's output): the backward of
        // their sum in one pass, without writing the sum.
        if node.op == Op::Relu && node_grads[id].last.is_some() {
            if let (Some(sum), Some(last)) = node_grads[id].parts() {
                let gx = ops::relu_backward_of_sum(trace.output(id), &sum, &last)?;
                add(&mut node_grads[node.inputs[0]], gx)?;
                continue;
            }
        }
        let Some(g) = node_grads[id].take()? else {
            continue;
        };
        let x = |k: usize| trace.output(node.inputs[k]);
        let input = |k: usize| node.inputs[k];
        match &node.op {
            Op::Input => input_grad = Some(g),
            Op::Normalize { std, .. } => add(
                &mut node_grads[input(0)],
                ops::normalize_backward(state.tensor(std), &g)?,
            )?,
            Op::Conv {
                stride,
                padding,
                weight,
                ..
            } => {
                let gx = per_run(&groups.runs(weight), |first, len, name| {
                    ops::conv2d_backward_input(
                        &x(0).narrow(0, first, len)?,
                        state.tensor(name),
                        &g.narrow(0, first, len)?,
                        *stride,
                        *padding,
                    )
                })?;
                if with_params {
                    for (k, name) in groups.each(weight).into_iter().enumerate() {
                        let gw = ops::conv2d_backward_weight(
                            &groups.of(x(0), k)?,
                            state.tensor(name),
                            &groups.of(&g, k)?,
                            *stride,
                            *padding,
                        )?;
                        accumulate(&mut params[k], name, gw)?;
                    }
                }
                add(&mut node_grads[input(0)], gx)?;
            }
            Op::BatchNorm { .. } if defer_to(id, &node_grads).is_some() => {
                let conv = defer_to(id, &node_grads).expect("checked");
                through_bn.insert(conv, (g, None, id));
            }
            Op::BatchNorm { params: bn, .. } => {
                let saved = &trace.bn[&id];
                let gamma = gammas(bn)?;
                let gx = if with_params {
                    let (gx, gg, gb) = ops::batch_norm_backward(&gamma, saved, &g, train)?;
                    add_bn_params(&mut params, groups.each(bn), (gg, gb))?;
                    gx
                } else {
                    ops::batch_norm_backward_input(&gamma, saved, &g, train)?
                };
                add(&mut node_grads[input(0)], gx)?;
            }
            // ReLU after a BatchNorm that nothing else reads or seeds: one fused backward of
            // both (the ReLU's mask applied inside BatchNorm's passes), straight to the
            // BatchNorm's input.
            Op::Relu
                if fused_relu(plan, input(0))
                    && readers[input(0)] == 1
                    && node_grads[input(0)].is_empty()
                    && matches!(plan.nodes[input(0)].op, Op::BatchNorm { .. }) =>
            {
                let bn_id = input(0);
                if let Some(conv) = defer_to(bn_id, &node_grads) {
                    through_bn.insert(conv, (g, Some(id), bn_id));
                    continue;
                }
                let Op::BatchNorm { params: bn, .. } = &plan.nodes[bn_id].op else {
                    unreachable!("matched above")
                };
                let saved = &trace.bn[&bn_id];
                let gamma = gammas(bn)?;
                let mask = trace.output(id);
                let gx = if with_params {
                    let (gx, gg, gb) =
                        ops::relu_batch_norm_backward(mask, &gamma, saved, &g, train)?;
                    add_bn_params(&mut params, groups.each(bn), (gg, gb))?;
                    gx
                } else {
                    ops::relu_batch_norm_backward_input(mask, &gamma, saved, &g, train)?
                };
                add(&mut node_grads[plan.nodes[bn_id].inputs[0]], gx)?;
            }
            // The ReLU's own output is its mask (positive exactly where its input is), so the
            // input need not be kept.
            Op::Relu => add(
                &mut node_grads[input(0)],
                ops::relu_backward(trace.output(id), &g)?,
            )?,
            Op::LeakyRelu { slope } => add(
                &mut node_grads[input(0)],
                ops::leaky_relu_backward(x(0), *slope, &g)?,
            )?,
            Op::Add => match (skip, branch_factors.get(&id)) {
                (Some(skip), Some(&factor)) => {
                    let (residual, skip_path) =
                        ops::skip_gradient_add_backward(&g, factor, skip.normalise)?;
                    add(&mut node_grads[input(0)], residual)?;
                    add(&mut node_grads[input(1)], skip_path)?;
                }
                _ => {
                    add(&mut node_grads[input(0)], g.clone())?;
                    add(&mut node_grads[input(1)], g)?;
                }
            },
            Op::MaxPool2 => add(
                &mut node_grads[input(0)],
                ops::max_pool2_backward(x(0), &g)?,
            )?,
            Op::GlobalAvgPool => add(
                &mut node_grads[input(0)],
                ops::global_avg_pool_backward(x(0).dims4()?, &g)?,
            )?,
            Op::Flatten => add(&mut node_grads[input(0)], g.reshape(x(0).dims())?)?,
            Op::Linear { params: linear, .. } => {
                let gx = if with_params {
                    let each = groups.each(linear);
                    let runs: Vec<_> = (0..groups.count())
                        .map(|k| (k * groups.size, groups.size, &each[k]))
                        .collect();
                    per_run(&runs, |first, len, names| {
                        let k = first / groups.size;
                        let (gx, gw, gb) = ops::linear_backward(
                            &x(0).narrow(0, first, len)?,
                            state.tensor(&names.weight),
                            &g.narrow(0, first, len)?,
                        )?;
                        accumulate(&mut params[k], &names.weight, gw)?;
                        accumulate(&mut params[k], &names.bias, gb)?;
                        Ok(gx)
                    })?
                } else {
                    per_run(&groups.runs(linear), |first, len, names| {
                        ops::linear_backward_input(
                            state.tensor(&names.weight),
                            &g.narrow(0, first, len)?,
                        )
                    })?
                };
                add(&mut node_grads[input(0)], gx)?;
            }
        }
    }
    Ok(Propagated {
        groups: params,
        input: input_grad,
    })
}

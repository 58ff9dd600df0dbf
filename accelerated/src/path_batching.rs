//! Whether the paths of an EIO iteration run one after the other or as path-batched passes
//! ([`crate::model::forward_groups`]): the p distillations of Eq. 2 in lock-step and each
//! path's cross-training batches (Algorithm 1 line 20) as one pass. Both give the same bits
//! (`accelerated/tests/path_batching.rs`); only speed and memory differ.

use candle_core::Device;

/// How the paths of an iteration are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathBatching {
    /// One pass per path and per batch, each over one batch of images.
    Sequential,
    /// One pass over one group of images per path (p·N images for Eq. 2).
    Batched,
}

impl PathBatching {
    /// The schedule for `device`: batched on a GPU, which larger passes fill better; one path
    /// after another on the CPU. There the direct convolutions already run near the FMA peak
    /// on one batch, and on 2 cores batching gained nothing measurable (a ResNet-20 EIO
    /// iteration at batch 128, p = 3: within the machine's ±10 % noise of sequential over
    /// four runs, the lock-step distillations alone 3-9 % slower) while it took 2.7-2.8x the
    /// peak memory (BENCHMARKS.md).
    pub fn for_device(device: &Device) -> Self {
        match device {
            Device::Cpu => PathBatching::Sequential,
            _ => PathBatching::Batched,
        }
    }
}

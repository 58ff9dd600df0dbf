//! Shared pieces of the engine's tests: seeded host tensors and their bits; for the `eio`
//! command tests, a tiny CIFAR-10-format data set written by the test, a tiny config over it,
//! and process helpers.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A host tensor of `dims` with values drawn uniformly from [lo, hi).
pub fn random(dims: &[usize], lo: f64, hi: f64, dtype: DType, rng: &mut ChaCha8Rng) -> Tensor {
    let len = dims.iter().product();
    let values: Vec<f64> = (0..len).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(values, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("host tensor")
}

/// The values of `t` as the bit patterns of their f64 widening (exact for f32).
pub fn bits(t: &Tensor) -> Vec<u64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("host values")
        .into_iter()
        .map(f64::to_bits)
        .collect()
}

pub fn eio() -> Command {
    Command::new(env!("CARGO_BIN_EXE_eio"))
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eio-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// CIFAR-10 binaries (`data_batch_1..5.bin`, `test_batch.bin`) with `per_file` records each,
/// pixels from a fixed formula whose mean depends on the label (so a model can learn).
pub fn write_cifar(dir: &Path, per_file: usize) {
    let record = |i: usize, label: u8| -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..3072).map(|k| {
            let base = 40 + 18 * label as usize;
            ((base + (k * 7 + i * 13) % 60) % 256) as u8
        }));
        r
    };
    let file = |name: &str, offset: usize| {
        let bytes: Vec<u8> = (0..per_file)
            .flat_map(|i| record(offset + i, ((offset + i) % 10) as u8))
            .collect();
        std::fs::write(dir.join(name), bytes).expect("write fixture");
    };
    for b in 1..=5 {
        file(&format!("data_batch_{b}.bin"), b * 1000);
    }
    file("test_batch.bin", 0);
}

pub fn tiny_config(dir: &Path, data: &Path, epochs: usize) -> PathBuf {
    let text = format!(
        r#"seed = 3
[model]
depth = 8
width = 0.25
n = 2
sharing = "shared-conv"
[data]
dataset = "cifar10"
path = "{}"
validation = 8
[train]
epochs = {epochs}
batch_size = 16
milestones = []
[eio]
p = 2
pretrain_epochs = 1
[distill]
steps = 2
[eval]
images = 12
eps = [0.02, 0.05]
steps = 3
restarts = 1
batch_size = 8
[derive]
finetune_epochs = 1
[run]
baselines = [1, 2]
[blackbox]
images = 12
eps = [0.02, 0.05]
steps = 2
mpgd_starts = 2
surrogate_sizes = [1, 2]
surrogate_seeds = [11, 12]
batch_size = 8
"#,
        data.display()
    );
    let path = dir.join("tiny.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

pub fn ok(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "eio failed: {stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

//! Choosing where and in which precision the engine runs.

use candle_core::{DType, Device};

use crate::EngineError;

/// Resolves a device name: `cpu`, or `cuda` / `cuda:N` (needs the `cuda` feature and a GPU).
///
/// # Errors
/// [`EngineError::Device`] naming the request and why it cannot be had.
pub fn select(name: &str) -> Result<Device, EngineError> {
    let unavailable = |reason: String| EngineError::Device {
        requested: name.to_string(),
        reason,
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal = match cuda.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| unavailable(format!("{n:?} is not a GPU index")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(unavailable(
                    "this build has no CUDA support (build with --features cuda)".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| unavailable(e.to_string()))
        }
        other => Err(unavailable(format!(
            "{other:?} is not one of cpu, cuda, cuda:N"
        ))),
    }
}

/// Resolves a precision name: `f32` or `f64`.
///
/// # Errors
/// [`EngineError::Device`] for anything else.
pub fn dtype(name: &str) -> Result<DType, EngineError> {
    match name {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        other => Err(EngineError::Device {
            requested: other.to_string(),
            reason: "precision must be f32 or f64".into(),
        }),
    }
}

/// Runs `work` on a thread of rayon's global pool, the pool the CPU kernels split their loops
/// over (`ops::cpu_kernels`). Called from any other thread, every parallel op would hand its
/// work to the pool and put the caller to sleep until it is done: one wake-up per op, and a
/// third busy thread on a two-core machine while the pool's idle workers spin. Run from inside
/// the pool, the ops share their work with the other workers directly. The `eio` command and the
/// bench run everything this way (on two cores it made the small-config clean step about 1.7x
/// faster, see BENCHMARKS.md); results are the same either way.
pub fn on_cpu_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// Tells the C allocator (glibc) to keep freed memory for the next allocations instead of
/// handing it back to the kernel. Every op allocates its output, and by default glibc serves
/// blocks of 128 KiB and more (a feature map of one batch is megabytes) with `mmap` and returns
/// them with `munmap` when freed, or trims the heap, so every new tensor page-faults its memory
/// in again, zeroed by the kernel: the kernel time of an evaluation was as large as its user
/// time. With blocks up to 32 MiB (glibc's largest threshold) served from the heap and no
/// trimming, a step reuses the memory the previous step freed. The peak resident memory is
/// unchanged (what is freed is reused, not added to); the process simply does not shrink.
///
/// All threads share glibc's main arena (`M_ARENA_MAX` = 1). The engine's work runs on rayon
/// workers, and a worker's own arena lives in 64 MiB heaps that glibc still maps and unmaps as
/// a step's tensors come and go: with per-thread arenas a ResNet-20 training step page-faulted
/// about 90 MB in every step (23,000 faults, ~8 % of its time); with the main arena only the
/// first steps do (BENCHMARKS.md). The ops allocate a few large blocks each, so the one
/// arena's lock is taken a few times per op.
///
/// Call it once at start-up (the `eio` command and the benches do); elsewhere a no-op.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning parameters; the values are valid
    // (32 MiB is glibc's maximum mmap threshold on 64-bit; a trim threshold of -1 disables
    // trimming; an arena count of 1 is the main arena alone, mallopt(3)).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

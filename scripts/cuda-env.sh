# shellcheck shell=bash
# cuda-env.sh: a pip-installed CUDA 13.0 toolchain for `cargo build --features cuda` of eio
# (candle 0.11), on a machine with no system CUDA and possibly no GPU. Source it, from bash,
# from any directory, any number of times, before every `--features cuda` build:
#     source scripts/cuda-env.sh
# docs/cuda.md has the whole recipe: the build, running on a GPU machine, checking, pitfalls.
#
# What it does:
# - The first run installs about 1.2 GB of pinned NVIDIA wheels with `python3 -m pip` into
#   $EIO_CUDA_PREFIX (default $HOME/.cache/eio-cuda). This is the only download; it needs
#   network, python3 with pip, and a C compiler (`cc`). Later runs find the stamp file and only
#   export variables. Change the package list below and the next run reinstalls.
# - Pinned to CUDA 13.0 on purpose: candle's kernels ship as PTX, and a driver only loads PTX
#   from a toolkit no newer than itself (driver 580 = CUDA 13.0; nvcc 13.1+ gives
#   CUDA_ERROR_UNSUPPORTED_PTX_VERSION at the first kernel launch, and cudarc 0.19.10 panics on
#   an nvcc version it does not know). The runtime libraries match torch 2.11 cu130.
# - Exports CUDA_ROOT, CUDA_HOME, CUDA_PATH, NVCC, PATH, LIBRARY_PATH, CUDARC_CUDA_VERSION=13000,
#   CUDA_COMPUTE_CAP (default 90: H100/H200) and CUDAFORGE_THREADS; and, only where no NVIDIA
#   driver is installed, LD_LIBRARY_PATH with a stub libcuda so that cuda builds still start.
#   These variables are rebuild triggers for cudarc and candle-kernels: keep the same values
#   for every `--features cuda` build, or the kernels recompile (minutes of nvcc).
# - On failure it prints `cuda-env: ...` and returns non-zero; it never exits your shell.
_eio_cuda_env() {
    local prefix="${EIO_CUDA_PREFIX:-$HOME/.cache/eio-cuda}"
    # Do not reformat this list: it is compared byte for byte with the stamp of an install.
    local pkgs="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88
        nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35"
    local root="$prefix/py/nvidia/cu13"   # CUDA 13 wheels share this toolkit-like tree
    if [ "$(cat "$prefix/stamp" 2>/dev/null)" != "$pkgs" ]; then
        # What the install needs, checked first so that a missing piece is named.
        if ! command -v python3 >/dev/null 2>&1; then
            echo "cuda-env: python3 not found; it is needed (with pip) to install the CUDA 13.0 wheels" >&2
            return 1
        fi
        if ! python3 -m pip --version >/dev/null 2>&1; then
            echo "cuda-env: 'python3 -m pip' does not work; install pip to get the CUDA 13.0 wheels" >&2
            return 1
        fi
        if ! command -v cc >/dev/null 2>&1; then
            echo "cuda-env: no C compiler (cc); it is needed to build the stub libcuda" >&2
            return 1
        fi
        echo "cuda-env: installing CUDA 13.0 wheels (~1.2 GB) into $prefix ..." >&2
        rm -rf "$prefix/py" && mkdir -p "$prefix" || return 1
        # shellcheck disable=SC2086
        if ! python3 -m pip install --quiet --root-user-action=ignore --no-deps --target "$prefix/py" $pkgs; then
            echo "cuda-env: pip could not install the CUDA 13.0 wheels (no network? pip older than 22.1?)" >&2
            return 1
        fi
        # Wheels carry only versioned names (libcublas.so.13); the linker wants libcublas.so.
        local f
        for f in "$root"/lib/lib*.so.*; do
            [ -e "${f%%.so.*}.so" ] || ln -s "$(basename "$f")" "${f%%.so.*}.so"
        done
        # cudarc links libcuda (the driver), which no wheel ships: build a stub with every
        # cu* name in cuda.h. Each returns CUDA_ERROR_STUB_LIBRARY (34), so a binary run
        # against it fails cleanly. SONAME libcuda.so.1 = the real driver's, used at run time.
        # Never copy this stub to a GPU machine.
        mkdir -p "$root/lib/stubs" && {
            echo 'const char *s = "CUDA_ERROR_STUB_LIBRARY: stub libcuda, no NVIDIA driver here";'
            echo 'int cuGetErrorString(int e, const char **p) { *p = s; return 0; }'
            echo 'int cuGetErrorName(int e, const char **p) { *p = s; return 0; }'
            grep -oE '\bcu[A-Z][A-Za-z0-9_]*' "$root/include/cuda.h" | sort -u |
                grep -vx 'cuGetError\(String\|Name\)' | sed 's/.*/int &(void) { return 34; }/'
        } > "$prefix/libcuda-stub.c" &&
            cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" \
                "$prefix/libcuda-stub.c" &&
            ln -sf libcuda.so "$root/lib/stubs/libcuda.so.1" || {
                echo "cuda-env: could not build the stub libcuda in $root/lib/stubs" >&2
                return 1
            }
        echo "$pkgs" > "$prefix/stamp"
    fi
    # cudarc reads CUDA_ROOT/CUDA_HOME/CUDA_PATH for link paths (lib, lib/stubs); cudaforge
    # (candle-kernels' build script) runs $NVCC and takes headers from its ../include.
    export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root" NVCC="$root/bin/nvcc"
    export CUDARC_CUDA_VERSION=13000   # cudarc spells 13.0 as 13000 ("13.0" makes it panic)
    # GPU architecture of the kernels, read at build time (candle-kernels would otherwise ask
    # nvidia-smi, and fail where there is none). 90 = H100/H200; cudaforge makes it sm_90a,
    # which runs on compute capability 9.0 only. For another GPU export it before sourcing,
    # e.g. `export CUDA_COMPUTE_CAP=80` for an A100.
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    # cudaforge compiles kernels on half the cores by default; use them all.
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
    case ":$PATH:" in *":$root/bin:"*) ;; *) export PATH="$root/bin:$PATH" ;; esac
    case ":${LIBRARY_PATH:-}:" in *":$root/lib:"*) ;;
        *) export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" ;; esac
    # So that cuda binaries start here (and fail with the stub's error) when no driver exists.
    # Never put the stub ahead of a real driver.
    if ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q 'libcuda\.so\.1 '; then
        case ":${LD_LIBRARY_PATH:-}:" in *":$root/lib:"*) ;;
            *) export LD_LIBRARY_PATH="$root/lib:$root/lib/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
    fi
    # Where a GPU is visible, say when the build would not suit it (warnings only).
    if command -v nvidia-smi >/dev/null 2>&1; then
        local caps drv
        caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd, -)
        drv=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
        case "$caps" in
            "" | "$CUDA_COMPUTE_CAP") ;;
            *) echo "cuda-env: warning: this machine's GPU is compute capability $caps but CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP;" \
                    "kernels built now will not load here (export CUDA_COMPUTE_CAP and source again)" >&2 ;;
        esac
        case "${drv%%.*}" in
            "" | *[!0-9]*) ;;
            *) [ "${drv%%.*}" -ge 580 ] ||
                echo "cuda-env: warning: NVIDIA driver $drv is older than 580, the first to run CUDA 13.0" >&2 ;;
        esac
    fi
}
if _eio_cuda_env; then
    unset -f _eio_cuda_env
    # Run as a program (`bash scripts/cuda-env.sh`) it can still install, but its exports die with it.
    if ! (return 0 2>/dev/null); then
        echo "cuda-env: ready, but run rather than sourced: the variables are not set in your shell;" \
            "use \`source scripts/cuda-env.sh\`" >&2
    fi
else
    unset -f _eio_cuda_env
    echo "cuda-env: setup failed (see docs/cuda.md)" >&2
    false
fi

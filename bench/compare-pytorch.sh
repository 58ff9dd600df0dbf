#!/usr/bin/env bash
# PyTorch against eio on this machine's CPU, workload by workload, back to back.
#
# Runs the PyTorch speed baseline `torch_eio.py` (eager PyTorch, CPU) and eio's bench
# `accelerated/benches/workloads.rs` on the same four workloads with the same parameters,
# each workload as its own process on each side (so `/usr/bin/time` gives each its own peak
# resident memory), PyTorch then eio for one workload before the next. Prints the raw lines of
# both sides, then a table of images/s, the eio/PyTorch ratio and peak memory. Nothing here is
# a dependency of the build or the tests.
#
#   bench/compare-pytorch.sh                 # the full comparison (about 15 minutes on 2 cores)
#   bench/compare-pytorch.sh --quick         # fewer iterations (a smoke run, not a measurement)
#
# PyTorch comes from a virtual environment of its own (CPU wheels are enough):
#   python3 -m venv ~/.venvs/torch-bench && ~/.venvs/torch-bench/bin/pip install torch numpy
# Environment: TORCH_PYTHON (default ~/.venvs/torch-bench/bin/python), TORCH_EIO (the path of
# torch_eio.py; default ../shared/bench/torch_eio.py beside the checkout), OUT (a folder for the
# JSON and logs; default bench/out/<date>), WORKLOADS (default all four).
#
# The workloads (see torch_eio.py's README and the bench's doc comment): baseline_step (plain
# ResNet-20, batch 128, train step), eio_step (RGN n = 2 shared-conv, p = 3, 10 distillation
# steps, layers stratified over 1..20: the mean of 20 iterations is the figure), pgd50_eval
# (PGD-50 against plain ResNet-20, batch 100), rgn_forward_eval (RGN inference, batch 100, a
# random path per batch).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
torch_python=${TORCH_PYTHON:-$HOME/.venvs/torch-bench/bin/python}
torch_eio=${TORCH_EIO:-../shared/bench/torch_eio.py}
out=${OUT:-bench/out/$(date -u +%Y%m%dT%H%M%SZ)}
workloads=${WORKLOADS:-baseline_step eio_step pgd50_eval rgn_forward_eval}

[[ -x "$torch_python" ]] || { echo "compare-pytorch: no Python with torch at $torch_python (set TORCH_PYTHON; see the header of $0)" >&2; exit 2; }
[[ -f "$torch_eio" ]] || { echo "compare-pytorch: torch_eio.py not found at $torch_eio (set TORCH_EIO)" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "compare-pytorch: /usr/bin/time is needed for peak memory (apt-get install time)" >&2; exit 2; }
mkdir -p "$out"

echo "== building eio's bench"
eio_bench=$(cargo bench -p eio-accelerated --bench workloads --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "workloads" and m.get("executable"):
        print(m["executable"])')
[[ -x "$eio_bench" ]] || { echo "compare-pytorch: could not build the workloads bench" >&2; exit 1; }

# Iterations per workload: (warm-up, timed), the same on both sides.
iters() {
  if (( quick )); then
    case $1 in eio_step) echo "1 2";; pgd50_eval) echo "1 1";; *) echo "2 5";; esac
  else
    case $1 in eio_step) echo "3 20";; pgd50_eval) echo "1 5";; *) echo "5 20";; esac
  fi
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), nproc $(nproc), flags: $(grep -m1 -o -w -E 'avx512f|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "torch: $("$torch_python" -c 'import torch; print(torch.__version__, "threads", torch.get_num_threads())')"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/machine.txt"

for w in $workloads; do
  read -r warm timed <<<"$(iters "$w")"
  echo "== $w: PyTorch ($warm warm-up, $timed timed)"
  /usr/bin/time -f "peak_rss_kib %M" -o "$out/torch-$w.rss" \
    "$torch_python" "$torch_eio" --device cpu --batch 128 --eval-batch 100 --share-conv \
    --distill-layer 0 --workloads "$w" --warmup "$warm" --iters "$timed" --json "$out/torch-$w.json" \
    2>&1 | tee "$out/torch-$w.log" | grep -E "^$w "
  echo "== $w: eio"
  /usr/bin/time -f "peak_rss_kib %M" -o "$out/eio-$w.rss" \
    "$eio_bench" --workloads "$w" --batch 128 --eval-batch 100 --warmup "$warm" --iters "$timed" \
    --json "$out/eio-$w.json" 2>&1 | tee "$out/eio-$w.log" | grep -E "^$w "
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"

python3 - "$out" $workloads <<'PY' | tee "$out/summary.md"
import json, sys
out, names = sys.argv[1], sys.argv[2:]
def rss(path):
    for line in open(path):
        if line.startswith("peak_rss_kib"):
            return int(line.split()[1]) / 1024
print("| workload | figure | PyTorch img/s | eio img/s | eio / PyTorch | PyTorch peak RSS | eio peak RSS |")
print("|---|---|---|---|---|---|---|")
for w in names:
    t = json.load(open(f"{out}/torch-{w}.json"))["workloads"][w]
    e = json.load(open(f"{out}/eio-{w}.json"))["results"][w]
    # EIO iterations differ by layer: the mean over the stratified layers is the figure.
    key = "images_per_s_mean" if w == "eio_step" else "images_per_s_median"
    print(f"| {w} | {key.split('_')[-1]} | {t[key]:.1f} | {e[key]:.1f} | **{e[key] / t[key]:.2f}x** "
          f"| {rss(f'{out}/torch-{w}.rss'):.0f} MiB | {rss(f'{out}/eio-{w}.rss'):.0f} MiB |")
PY
echo "(raw output, JSON and logs in $out)"

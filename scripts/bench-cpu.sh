#!/usr/bin/env bash
# CPU training throughput and GEMM speed of this engine against PyTorch eager (fp32) on the
# same machine.
#
# It prints a header naming the processor, the vector width each side uses and the fp32 peak
# that `tokenformer bench` measures (an FMA loop on one thread and on all of them), then, ROUNDS
# times and alternately, times
#   - full training steps with AdamW, `tokenformer bench` against scripts/torch_tokenformer.py,
#     for preset tiny at 8 x 64 and 16 x 256 and preset small at 8 x 256;
#   - the 1024^3 product, ours against PyTorch's `a @ b`, on one thread and on two;
#   - the two largest product shapes of a `small` step, forward (A·B) and backward (G·Bᵀ and
#     Aᵀ·G together), on all threads: with 2048 x 384 x 1536 and 2048 x 1536 x 384 these cover
#     its three largest shapes (2048 rows against 384 and 1536, and the transposed sums over
#     the rows),
# and prints the best of each: tokens/s or GFLOP/s, their ratio, and each process's peak
# resident memory for the steps.
#
#   scripts/bench-cpu.sh [ROUNDS]          (default 3)
#
# The vector width can be held down on both sides, as on a processor without AVX-512:
#   TOKENFORMER_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
#     MKL_ENABLE_INSTRUCTIONS=AVX2 scripts/bench-cpu.sh
#
# PyTorch: TORCH_PYTHON names a Python that has torch; without it, a virtual environment in
# .venv-torch/ (git-ignored) is created and `pip install torch` run into it the first time
# (several GB: PyPI's Linux wheels bring their CUDA libraries along).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}

cargo build --release --quiet
bin=target/release/tokenformer

py=${TORCH_PYTHON:-}
if [[ -z $py ]]; then
    py=.venv-torch/bin/python
    if ! "$py" -c "import torch" 2>/dev/null; then
        echo "installing PyTorch into .venv-torch (set TORCH_PYTHON to use an existing one)" >&2
        python3 -m venv .venv-torch
        .venv-torch/bin/pip install --quiet torch numpy
    fi
fi
"$py" -c "import torch" || { echo "error: $py cannot import torch" >&2; exit 1; }
threads=$(nproc)

# One JSON line per run: {"shape", "who", "tok_s", "rss_mb"} or {"gemm", "who", "gflops"}.
results=$(mktemp)
trap 'rm -f "$results"' EXIT

# The header: the processor, and what each side runs on it.
echo "processor: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $threads threads"
"$bin" bench --steps 0 --matmul 0 --json | "$py" -c "
import json, sys
c = json.load(sys.stdin)['cpu']
b = c['gemm_blocking']
tile = f\"tile {b['mr']}x{b['nr']}, KC {b['kc']}, MC {b['mc']}, NC {b['nc']}\" if b else 'reference GEMM'
print(f\"ours:  vector unit {c['vector_isa']} ({c['vector_lanes']} lanes), GEMM {tile}; \"
      f\"fp32 peak {c['peak_gflops_one_thread']:.1f} GFLOP/s on 1 thread, \"
      f\"{c['peak_gflops_all_threads']:.1f} on {c['threads']}\")"
"$py" -c "
import torch
print(f'torch: {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, '
      f'{torch.get_num_threads()} threads')"

ours() { # preset batch seq steps
    "$bin" bench --preset "$1" --batch "$2" --seq "$3" --steps "$4" --matmul 0 --json |
        "$py" -c "import json,sys; r=json.load(sys.stdin); print(json.dumps(dict(shape='$1 $2x$3', who='ours', tok_s=r['tokens_per_sec'], rss_mb=r['peak_memory_bytes']/2**20)))"
}

torch() { # preset batch seq steps
    "$py" - "$1" "$2" "$3" "$4" <<'PY'
import json, resource, runpy, sys, io, contextlib
cfg, b, t, steps = sys.argv[1:]
sys.argv = ["torch_tokenformer.py", "--cfg", cfg, "--B", b, "--T", t, "--steps", steps,
            "--modes", "fp32", "--device", "cpu"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    runpy.run_path("scripts/torch_tokenformer.py", run_name="__main__")
r = json.loads(out.getvalue().strip().splitlines()[-1])
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
print(json.dumps(dict(shape=f"{cfg} {b}x{t}", who="torch", tok_s=r["tok_s"], rss_mb=rss_mb)))
PY
}

# GEMM rows: (shape MxKxN, threads, with backward).
gemms=("1024 1 0" "1024 $threads 0" "2048x384x1536 $threads 1" "2048x1536x384 $threads 1")

ours_gemm() { # shape threads backward
    local flag=()
    [[ $3 == 1 ]] && flag=(--matmul-backward)
    RAYON_NUM_THREADS=$2 "$bin" bench --steps 0 --matmul "$1" "${flag[@]}" --json |
        "$py" -c "
import json, sys
r = json.load(sys.stdin)
print(json.dumps(dict(gemm='$1 forward', threads=$2, who='ours', gflops=r['matmul_gflops'],
                      peak=r['cpu']['peak_gflops_all_threads'])))
if 'matmul_backward_gflops' in r:
    print(json.dumps(dict(gemm='$1 backward', threads=$2, who='ours',
                          gflops=r['matmul_backward_gflops'],
                          peak=r['cpu']['peak_gflops_all_threads'])))"
}

torch_gemm() { # shape threads backward
    "$py" - "$@" <<'PY'
import json, sys, time, torch
shape, threads, backward = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
dims = [int(d) for d in shape.split("x")]
m, k, n = dims * 3 if len(dims) == 1 else dims
torch.set_num_threads(threads)
torch.manual_seed(0)
a, b, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
def best(f, repeats=5):
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); f(); times.append(time.perf_counter() - start)
    return min(times)
def grads():
    g @ b.t()
    a.t() @ g
rows = [("forward", 2 * m * k * n / best(lambda: a @ b))]
if backward:
    rows.append(("backward", 4 * m * k * n / best(grads)))
for name, flops in rows:
    print(json.dumps(dict(gemm=f"{shape} {name}", threads=threads, who="torch", gflops=flops / 1e9)))
PY
}

shapes=("tiny 8 64 20" "tiny 16 256 6" "small 8 256 4")
for round in $(seq "$rounds"); do
    for shape in "${shapes[@]}"; do
        # shellcheck disable=SC2086
        set -- $shape
        echo "round $round/$rounds: $1 $2x$3" >&2
        ours "$@" >>"$results"
        torch "$@" >>"$results"
    done
    echo "round $round/$rounds: GEMMs" >&2
    for gemm in "${gemms[@]}"; do
        # shellcheck disable=SC2086
        set -- $gemm
        ours_gemm "$@" >>"$results"
        torch_gemm "$@" >>"$results"
    done
done

"$py" - "$results" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in runs if "shape" in r]
print(f"{'shape':<16}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>8}{'ours RSS MB':>13}{'torch RSS MB':>14}")
for shape in dict.fromkeys(r["shape"] for r in steps):
    best = {who: max((r for r in steps if r["shape"] == shape and r["who"] == who),
                     key=lambda r: r["tok_s"]) for who in ("ours", "torch")}
    o, t = best["ours"], best["torch"]
    print(f"{shape:<16}{o['tok_s']:>12.0f}{t['tok_s']:>13.0f}{o['tok_s'] / t['tok_s']:>7.2f}x"
          f"{o['rss_mb']:>13.0f}{t['rss_mb']:>14.0f}")
print("best of each over the rounds; fp32, one training step with AdamW; PyTorch eager")
print()
gemms = [r for r in runs if "gemm" in r]
print(f"{'GEMM (GFLOP/s)':<26}{'threads':>8}{'ours':>8}{'torch':>8}{'ratio':>8}{'ours of peak':>14}")
for key in dict.fromkeys((r["gemm"], r["threads"]) for r in gemms):
    best = {who: max(r["gflops"] for r in gemms if (r["gemm"], r["threads"]) == key
                     and r["who"] == who) for who in ("ours", "torch")}
    peak = max(r["peak"] for r in gemms if (r["gemm"], r["threads"]) == key and r["who"] == "ours")
    o, t = best["ours"], best["torch"]
    print(f"{key[0]:<26}{key[1]:>8}{o:>8.1f}{t:>8.1f}{o / t:>7.2f}x{100 * o / peak:>13.1f}%")
print("best of each over the rounds; fp32; backward = G·Bᵀ and Aᵀ·G together; PyTorch a @ b")
PY

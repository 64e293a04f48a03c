#!/usr/bin/env bash
# CPU training throughput of this engine against PyTorch eager (fp32) on the same machine.
#
# For each shape (preset tiny at 8 x 64 and 16 x 256, preset small at 8 x 256) it times full
# training steps with AdamW, `tokenformer bench` and scripts/torch_tokenformer.py alternately,
# ROUNDS times, and prints the best of each: tokens/s, their ratio, and each process's peak
# resident memory.
#
#   scripts/bench-cpu.sh [ROUNDS]          (default 3)
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

# One JSON line per run: {"shape", "who", "tok_s", "rss_mb"}.
results=$(mktemp)
trap 'rm -f "$results"' EXIT

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

shapes=("tiny 8 64 20" "tiny 16 256 6" "small 8 256 4")
for round in $(seq "$rounds"); do
    for shape in "${shapes[@]}"; do
        # shellcheck disable=SC2086
        set -- $shape
        echo "round $round/$rounds: $1 $2x$3" >&2
        ours "$@" >>"$results"
        torch "$@" >>"$results"
    done
done

"$py" - "$results" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'shape':<16}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>8}{'ours RSS MB':>13}{'torch RSS MB':>14}")
for shape in dict.fromkeys(r["shape"] for r in runs):
    best = {who: max((r for r in runs if r["shape"] == shape and r["who"] == who),
                     key=lambda r: r["tok_s"]) for who in ("ours", "torch")}
    o, t = best["ours"], best["torch"]
    print(f"{shape:<16}{o['tok_s']:>12.0f}{t['tok_s']:>13.0f}{o['tok_s'] / t['tok_s']:>7.2f}x"
          f"{o['rss_mb']:>13.0f}{t['rss_mb']:>14.0f}")
print("best of each over the rounds; fp32, one training step with AdamW; PyTorch eager")
PY

#!/bin/bash
# The CUDA backend on a real card, in one run: every GPU test, the whole model against the CPU,
# a medium model trained on a BPE corpus with a checkpoint and a resume, and the speed against a
# PyTorch reference on the same card.
#
# Two steps, because the GPU machine has no Rust toolchain:
#
#   1. On a machine with Rust, from the repository's root:
#        scripts/gpu-check.sh prepare --torch-reference FILE [--corpus DIR] [--corpus-mb N]
#      builds the release binary and the GPU test executables into .gpu/ (ignored by git), with
#      this script's inputs: FILE, a PyTorch training-step benchmark of the same model that
#      takes --cfg NAME --B N --T N --modes fp32,tf32 and prints one JSON line per mode with
#      tok_s and peak_mem_gb; and up to N MB (default 16) of .txt files from DIR, the corpus of
#      the medium model. Without --torch-reference the speed comparison is left out; without
#      --corpus the medium model trains on the built-in text with the byte tokenizer.
#
#   2. On the GPU machine, from the repository's root with .gpu/ copied beside it:
#        scripts/gpu-check.sh [run]
#      It needs the NVIDIA driver, one CUDA toolkit's NVRTC, cuBLAS and cuBLASLt libraries (or
#      a Python wheel holding them) and, for the speed comparison, python3 with PyTorch. It
#      writes everything under $OUT (default /tmp/gpu-check): summary.txt holds the results,
#      the other files the full output of each stage. Exits non-zero when a stage fails.
#
# Stages of a run, each capped by `timeout` so the whole stays under ten minutes:
#   1. the card and the libraries: one toolkit folder on the library path;
#   2. every test executable, once with TOKENFORMER_CUDA_SYNC=1 and one test thread (a fault is
#      reported at the kernel that made it, and a sticky context error cannot fail unrelated
#      tests), then the parity tests again with TOKENFORMER_FUSED=0 (every plain reference path
#      the faster kernels replaced); TOKENFORMER_REQUIRE_CUDA=1 throughout, so a skip is a
#      failure;
#   3. the medium model (preset 150M, seq 512) trained for two and a half minutes, interrupted
#      (it saves a checkpoint), resumed for about 40 s, and its checkpoint evaluated on the GPU;
#   4. tokenformer bench against the PyTorch reference: 150M at 8 × 1024 in fp32 and TF32,
#      tiny at 64 × 256 in fp32 (and again with TOKENFORMER_FUSED=0), with the ratios of tokens/s
#      and of peak memory.
set -u

usage() {
  sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//; /^set -u/d'
}

prepare() {
  local torch_reference="" corpus="" corpus_mb=16
  while (($# > 0)); do
    case $1 in
      --torch-reference) torch_reference=$2; shift 2 ;;
      --corpus) corpus=$2; shift 2 ;;
      --corpus-mb) corpus_mb=$2; shift 2 ;;
      *) usage >&2; exit 2 ;;
    esac
  done
  set -e
  rm -rf .gpu
  mkdir -p .gpu/bin .gpu/tests
  cargo build --release --bin tokenformer
  cp target/release/tokenformer .gpu/bin/
  # The test executables that need a GPU (or NVRTC), by their cargo names.
  cargo test --release --workspace --no-run --message-format=json \
    --test cuda_parity --test cuda_model --test nvrtc_compile 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test"):
        print(m["executable"])' |
    while read -r exe; do
      name=$(basename "$exe")
      cp "$exe" ".gpu/tests/${name%-*}"
    done
  strip .gpu/bin/* .gpu/tests/* 2>/dev/null || true
  if [[ -n $torch_reference ]]; then
    cp "$torch_reference" .gpu/torch_reference.py
  fi
  if [[ -n $corpus ]]; then
    mkdir -p .gpu/corpus
    local budget=$((corpus_mb * 1024 * 1024)) used=0 size
    for f in $(find "$corpus" -name '*.txt' | sort); do
      size=$(stat -c %s "$f")
      ((used + size > budget)) && continue
      cp "$f" .gpu/corpus/
      used=$((used + size))
    done
  fi
  cp "$0" .gpu/gpu-check.sh
  echo "gathered into .gpu/ ($(du -sm .gpu | cut -f1) MiB):"
  ls -1 .gpu .gpu/tests
}

# ---- the run ---------------------------------------------------------------------------------

say() { echo "$*" | tee -a "$summary"; }

# The CUDA major version the driver supports, from nvidia-smi ("CUDA Version: 13.0").
driver_cuda_major() {
  nvidia-smi 2>/dev/null | grep -Eo 'CUDA Version: *[0-9]+' | grep -Eo '[0-9]+$' | head -n1
}

# One folder that holds NVRTC, cuBLAS and cuBLASLt together, of the driver's CUDA major version
# when there is one: a system toolkit first, then a Python wheel. Mixing folders can pair a
# cuBLAS with another version's cuBLASLt.
toolkit_dir() {
  local major=$1 dir
  local candidates
  candidates=$(timeout 60 find / -xdev -name 'libnvrtc.so*' -not -path '*/stubs/*' 2>/dev/null |
    xargs -r -n1 dirname | sort -u)
  for want in "$major" ""; do
    for prefer in /usr/local /; do
      for dir in $candidates; do
        [[ $dir == "$prefer"* ]] || continue
        ls "$dir"/libcublas.so* "$dir"/libcublasLt.so* >/dev/null 2>&1 || continue
        if [[ -n $want ]] && ! ls "$dir"/libnvrtc.so."$want"* >/dev/null 2>&1; then
          continue
        fi
        echo "$dir"
        return 0
      done
    done
  done
  return 1
}

run_tests() {
  # $1: label; the rest: environment assignments for this pass.
  local label=$1 t name log rc passed failed skipped
  shift
  for t in .gpu/tests/*; do
    [[ -x $t ]] || continue
    name=$(basename "$t")
    if [[ $label == plain && $name != cuda_parity ]]; then
      continue
    fi
    log="$OUT/tests/$name-$label.log"
    env "$@" timeout 240 "$t" --test-threads=1 --nocapture >"$log" 2>&1
    rc=$?
    passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -n1 | cut -d' ' -f1)
    failed=$(grep -Eo '[0-9]+ failed' "$log" | tail -n1 | cut -d' ' -f1)
    skipped=$(grep -c '^skipped' "$log")
    total_passed=$((total_passed + ${passed:-0}))
    total_failed=$((total_failed + ${failed:-0}))
    total_skipped=$((total_skipped + skipped))
    local verdict="passed ${passed:-?}, failed ${failed:-?}, skipped $skipped"
    ((rc == 124)) && verdict="$verdict; TIMED OUT"
    if ((rc != 0)); then
      status=1
      verdict="$verdict (exit $rc)"
    fi
    say "$name ($label): $verdict"
    grep -E '^test .*FAILED|panicked|failed on the device' "$log" | head -n 10 | tee -a "$summary"
  done
}

bench_ours() {
  # $1: label, $2: preset, $3: batch, $4: seq, $5: TOKENFORMER_FUSED (1: the faster kernels,
  # 0: every plain path); the rest: flags.
  local label=$1 preset=$2 batch=$3 seq=$4 fused=$5
  shift 5
  say "=== ours: $label"
  TOKENFORMER_FUSED=$fused timeout 150 .gpu/bin/tokenformer bench --device cuda --preset "$preset" --batch "$batch" \
    --seq "$seq" --steps 10 --matmul 0 --json "$@" >"$OUT/bench-$label.json" 2>"$OUT/bench-$label.log" || {
    status=1
    say "bench $label failed:"
    tail -n 5 "$OUT/bench-$label.log" | tee -a "$summary"
  }
  tee -a "$summary" <"$OUT/bench-$label.json"
}

run() {
  OUT=${OUT:-/tmp/gpu-check}
  mkdir -p "$OUT/tests"
  summary="$OUT/summary.txt"
  : >"$summary"
  status=0
  local started=$SECONDS
  if [[ ! -x .gpu/bin/tokenformer || ! -d .gpu/tests ]]; then
    echo "no .gpu/ here: run 'scripts/gpu-check.sh prepare' on a machine with Rust first" >&2
    exit 2
  fi

  # ---- 1. the card and one toolkit
  say "=== card"
  timeout 15 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || status=1
  timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader |
    tee -a "$summary"
  local major toolkit
  major=$(driver_cuda_major)
  toolkit=$(toolkit_dir "$major") || {
    say "no folder holds NVRTC, cuBLAS and cuBLASLt together"
    exit 1
  }
  # The driver's own folder, when it is not on the default search path, is not a toolkit.
  local driver_dir=""
  [[ -d /usr/local/nvidia/lib64 ]] && driver_dir=/usr/local/nvidia/lib64:
  export LD_LIBRARY_PATH="${driver_dir}${toolkit}"
  export TOKENFORMER_REQUIRE_CUDA=1
  say "driver CUDA $major; libraries from $toolkit"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$OUT/environment.txt"

  # ---- 2. the tests
  say "=== tests"
  total_passed=0 total_failed=0 total_skipped=0
  run_tests sync TOKENFORMER_CUDA_SYNC=1
  run_tests plain TOKENFORMER_FUSED=0
  say "tests in all: passed $total_passed, failed $total_failed, skipped $total_skipped"
  grep -hE 'max error|loss: cuda|bit-identical|max logit change|bench tiny|GPU-trained' \
    "$OUT"/tests/*.log >"$OUT/measured-errors.txt" 2>/dev/null

  # ---- 3. the medium model
  say "=== medium model: 150M, seq 512, about 3 minutes, then a resume"
  local run_dir="$OUT/medium" data_flags=(--tokenizer byte)
  if [[ -d .gpu/corpus ]]; then
    data_flags=(--data .gpu/corpus --tokenizer gpt2)
  fi
  rm -rf "$run_dir"
  # Device memory in use, sampled every second while the model trains.
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 \
    >"$OUT/medium-memory-mib.txt" 2>/dev/null &
  local sampler=$!
  # SIGINT makes the trainer save a checkpoint and stop (the run then resumes from it).
  timeout -s INT 150 .gpu/bin/tokenformer train --device cuda --preset 150M "${data_flags[@]}" \
    --seq 512 --batch 8 --steps 5000 --warmup 100 --clip 1 --eval-every 100 \
    --save-every 100 --out "$run_dir" >"$OUT/medium-train.log" 2>&1
  local rc=$?
  timeout -s INT 40 .gpu/bin/tokenformer train --device cuda --resume "$run_dir" \
    >"$OUT/medium-resume.log" 2>&1
  local rc_resume=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  # 124 is timeout's own code after the signal: the trainer stopped as asked.
  if ((rc != 0 && rc != 124 && rc != 130)) || ((rc_resume != 0 && rc_resume != 124 && rc_resume != 130)); then
    status=1
    say "medium model: train exit $rc, resume exit $rc_resume"
    tail -n 5 "$OUT/medium-train.log" "$OUT/medium-resume.log" | tee -a "$summary"
  fi
  python3 - "$run_dir" "$OUT/medium-memory-mib.txt" <<'EOF' | tee -a "$summary"
import json, sys
run_dir, memory = sys.argv[1], sys.argv[2]
try:
    rows = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl") if l.strip()]
except OSError:
    rows = []
if not rows:
    print("medium model: no metrics")
    sys.exit(0)
first, last = rows[0], rows[-1]
steps = [r["step"] for r in rows]
resumed = any(b <= a for a, b in zip(steps, steps[1:]))
tok_s = sorted(r["tokens_per_sec"] for r in rows[5:] or rows)
vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
try:
    peak = max(int(x) for x in open(memory).read().split() if x.strip().isdigit())
except (OSError, ValueError):
    peak = None
print(f"medium model: steps {first['step']}..{last['step']}, tokens {last.get('tokens_seen')}, "
      f"loss {first['loss']:.3f} -> {last['loss']:.3f}, median tokens/s {tok_s[len(tok_s)//2]:.0f}, "
      f"peak device memory {peak} MiB (nvidia-smi), resumed: {'yes' if resumed else 'continued without a repeat'}")
print(f"validation losses: {vals}")
EOF
  timeout 60 .gpu/bin/tokenformer info --checkpoint "$run_dir" >>"$OUT/medium-train.log" 2>&1

  # ---- 4. speed against PyTorch
  bench_ours 150M-fp32 150M 8 1024 1
  bench_ours 150M-tf32 150M 8 1024 1 --tf32
  bench_ours tiny-fp32 tiny 64 256 1
  # The plain paths, for an A/B of the faster kernels where launches dominate.
  bench_ours tiny-fp32-plain tiny 64 256 0
  if [[ -f .gpu/torch_reference.py ]]; then
    say "=== PyTorch reference"
    timeout 150 python3 .gpu/torch_reference.py --cfg 150M --B 8 --T 1024 --modes fp32,tf32 \
      >"$OUT/torch-150M.jsonl" 2>"$OUT/torch-150M.log" || status=1
    timeout 90 python3 .gpu/torch_reference.py --cfg tiny --B 64 --T 256 --modes fp32 \
      >"$OUT/torch-tiny.jsonl" 2>"$OUT/torch-tiny.log" || status=1
    cat "$OUT"/torch-*.jsonl | tee -a "$summary"
    say "=== ours / PyTorch"
    python3 - "$OUT" <<'EOF' | tee -a "$summary"
import json, os, sys
out = sys.argv[1]
def rows(path):
    try:
        return [json.loads(l) for l in open(path) if l.strip().startswith("{")]
    except OSError:
        return []
torch = {(r["cfg"], r["mode"]): r for f in ("torch-150M.jsonl", "torch-tiny.jsonl") for r in rows(os.path.join(out, f))}
for label, cfg, mode, target in [("150M-fp32", "150M", "fp32", 1.0), ("150M-tf32", "150M", "tf32", 1.0),
                                 ("tiny-fp32", "tiny", "fp32", 2.0), ("tiny-fp32-plain", "tiny", "fp32", 2.0)]:
    ours, ref = rows(os.path.join(out, f"bench-{label}.json")), torch.get((cfg, mode))
    if not ours or ref is None:
        print(f"{label}: no ratio (a run is missing)")
        continue
    ours = ours[-1]
    speed = ours["tokens_per_sec"] / ref["tok_s"]
    ours_gb, ref_gb = ours["peak_memory_bytes"] / 1e9, ref.get("peak_mem_gb", float("nan"))
    print(f"{label}: tokens/s ours {ours['tokens_per_sec']:.0f} / PyTorch {ref['tok_s']:.0f} = {speed:.2f} "
          f"(target >= {target}); peak memory ours {ours_gb:.2f} GB / PyTorch {ref_gb:.2f} GB; "
          f"MFU {ours.get('mfu')}")
EOF
  else
    say "no PyTorch reference carried: speed ratios left out"
  fi

  say "=== done in $((SECONDS - started)) s, status $status"
  exit $status
}

case ${1:-run} in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  -h | --help) usage ;;
  *) usage >&2; exit 2 ;;
esac

#!/bin/bash
# One device run that checks the CUDA backend and measures it against PyTorch on the same card.
#
# On the CPU machine, from the project's root, gather the binaries (../shared/gpu/README.md):
#
#   ../shared/gpu/prepare.sh --workspace --test cuda_parity --test cuda_model
#
# (The filter keeps the two GPU test executables: with the release binary they come to 26 MiB.
# Without it every crate's tests are gathered, 65 MiB, over the 60 MiB prepare.sh accepts; the
# CPU tests run on the CPU machine anyway. `--workspace` makes the filter find cuda_parity in
# the ops crate whatever the default members are.) Then one device call:
#
#   run(carry: [".gpu"], command: "bash scripts/gpu-check.sh", timeout_s: 600)
#
# scripts/ is tracked by git, so it travels with the working tree; .gpu/ is ignored by git and
# travels only because it is carried. The stages, each under its own `timeout` so that the
# whole run stays well inside the 10-minute limit of one call:
#
#   0. the search for the CUDA libraries, as .gpu/on-device.sh does it   (60 s)
#   1. nvidia-smi                                                  (15 s)
#   2. every test executable in .gpu/tests, with a pass/fail/skip summary    (150 s in all)
#   3. tokenformer bench, preset 150M, batch 8 × seq 1024, 10 steps, fp32 then --tf32
#                                                                  (110 s each)
#   4. PyTorch's reference, the same model and shapes, fp32 and tf32    (120 s)
#   5. the ratios ours / PyTorch of tokens/s and of peak memory
#
# The caps add up to 565 s; expected is two to three minutes (the 150M bench runs 12 steps of
# about a second or less each, 8.4 TFLOP per step; PyTorch 13 steps per mode).
#
# Everything is logged under $OUT (the folder the device tool brings back); summary.txt holds
# the results, the other files the full output of each stage. Exits non-zero when a stage fails.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT/tests"
started=$SECONDS
status=0
summary="$OUT/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

if [[ ! -x .gpu/bin/tokenformer || ! -d .gpu/tests ]]; then
  echo "no .gpu/ here: run ../shared/gpu/prepare.sh on the CPU machine and carry .gpu" >&2
  exit 2
fi

# The CUDA driver and libraries on the library path, never the link-time stubs (the stub
# libcuda fails every call); the same search .gpu/on-device.sh makes.
libdirs=$(timeout 60 find / -xdev \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \
  -o -name 'libcublasLt.so*' \) -not -path '*/stubs/*' 2>/dev/null |
  xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:${libdirs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$OUT/environment.txt"

# ---- 1. the card
say "=== nvidia-smi"
timeout 15 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || status=1
timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader |
  tee -a "$summary"

# ---- 2. the tests. --nocapture shows the lines the tests print: "skipped: ..." when a test
# could not run, and the measured errors of the CUDA-vs-CPU comparisons.
say "=== tests"
tests_deadline=$((SECONDS + 150))
total_passed=0 total_failed=0 total_skipped=0
for t in .gpu/tests/*; do
  [[ -x $t ]] || continue
  name=$(basename "$t")
  log="$OUT/tests/$name.log"
  left=$((tests_deadline - SECONDS))
  if ((left < 5)); then
    say "$name: not run (the test stage's 150 s are spent)"
    status=1
    continue
  fi
  timeout "$left" "$t" --nocapture >"$log" 2>&1
  rc=$?
  # libtest's last line: "test result: ok. 5 passed; 0 failed; 0 ignored; ...".
  passed=$(grep -Eo '[0-9]+ passed' "$log" | tail -n1 | cut -d' ' -f1)
  failed=$(grep -Eo '[0-9]+ failed' "$log" | tail -n1 | cut -d' ' -f1)
  skipped=$(grep -c '^skipped' "$log")
  total_passed=$((total_passed + ${passed:-0}))
  total_failed=$((total_failed + ${failed:-0}))
  total_skipped=$((total_skipped + skipped))
  verdict="passed ${passed:-?}, failed ${failed:-?}, skipped $skipped"
  if ((rc == 124)); then
    verdict="$verdict; TIMED OUT"
  fi
  if ((rc != 0)); then
    status=1
    verdict="$verdict (exit $rc)"
  fi
  say "$name: $verdict"
  grep -E '^test .*FAILED|panicked' "$log" | head -n 10 | tee -a "$summary"
done
say "tests in all: passed $total_passed (of which printed a skip: $total_skipped), failed $total_failed"
# The comparisons' measured errors, for the record.
grep -hE 'max error|loss: cuda|bit-identical|max logit change|bench tiny' "$OUT"/tests/*.log \
  >"$OUT/measured-errors.txt" 2>/dev/null

# ---- 3. our training step, fp32 and TF32
bench() {
  local mode=$1
  shift
  say "=== tokenformer bench 150M 8x1024 $mode"
  timeout 110 .gpu/bin/tokenformer bench --device cuda --preset 150M --batch 8 --seq 1024 \
    --steps 10 --json "$@" >"$OUT/bench-$mode.json" 2>"$OUT/bench-$mode.log"
  local rc=$?
  if ((rc != 0)); then
    status=1
    say "bench $mode failed (exit $rc):"
    tail -n 5 "$OUT/bench-$mode.log" | tee -a "$summary"
  else
    tee -a "$summary" <"$OUT/bench-$mode.json"
  fi
}
bench fp32
bench tf32 --tf32

# ---- 4. PyTorch on the same card
say "=== PyTorch reference 150M 8x1024"
timeout 120 python3 .gpu/torch_tokenformer.py --cfg 150M --B 8 --T 1024 --modes fp32,tf32 \
  >"$OUT/torch.jsonl" 2>"$OUT/torch.log" || {
  status=1
  say "PyTorch reference failed:"
  tail -n 5 "$OUT/torch.log" | tee -a "$summary"
}
tee -a "$summary" <"$OUT/torch.jsonl"

# ---- 5. ratios
say "=== ours / PyTorch"
python3 - "$OUT" <<'EOF' | tee -a "$summary"
import json, os, sys

out = sys.argv[1]

def read_json_lines(path):
    rows = []
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows

torch = {r["mode"]: r for r in read_json_lines(os.path.join(out, "torch.jsonl"))}
for mode in ["fp32", "tf32"]:
    ours = read_json_lines(os.path.join(out, f"bench-{mode}.json"))
    ref = torch.get(mode)
    if not ours or ref is None:
        print(f"{mode}: no ratio (a run is missing)")
        continue
    ours = ours[-1]
    speed = ours["tokens_per_sec"] / ref["tok_s"]
    # Ours: the most bytes our tensors held at once since the device was opened (warm-up
    # included); PyTorch: torch.cuda.max_memory_allocated after its warm-up (tensors only,
    # like ours; neither counts the allocator's cache or cuBLAS workspaces).
    ours_gb = ours["peak_memory_bytes"] / 1e9
    ref_gb = ref.get("peak_mem_gb", float("nan"))
    print(
        f"{mode}: tokens/s ours {ours['tokens_per_sec']:.0f} / PyTorch {ref['tok_s']:.0f} = {speed:.3f}; "
        f"peak memory ours {ours_gb:.2f} GB / PyTorch {ref_gb:.2f} GB = {ours_gb / ref_gb:.3f}"
    )
EOF

say "=== done in $((SECONDS - started)) s, status $status"
exit $status

#!/usr/bin/env bash
# Mutation testing of the growth code: cargo-mutants changes one thing at a time in
# models/src/model/{growth,pattention,optim}.rs and ops/src/pattention_norm/ (a function body
# replaced by a constant, an operator swapped, a match arm deleted, ...), rebuilds, and runs the
# tests. A mutant that no test fails on is "missed": a change to the code that the tests cannot
# see. docs/mutation_testing.md keeps the last result and says why each missed mutant left is
# harmless.
#
# Not run in CI: every mutant is a rebuild and a test run, 5 to 15 seconds on 2 cores, and these
# files give about 400 mutants. Run it in shards, and resume it:
#
#   scripts/mutants.sh                        # every file above, every mutant
#   scripts/mutants.sh --shard 1/4            # a quarter: the 1st, 5th, 9th, ... mutant
#   FILES=growth scripts/mutants.sh           # one file: growth, pattention, optim or norm
#   scripts/mutants.sh --shard 1/4 --resume   # go on where that shard's runs stopped
#   scripts/mutants.sh --recheck              # again the mutants last missed or timed out
#   scripts/mutants.sh --list                 # the mutants, without running anything
#
# Shards count from 1 and are fixed: shard K of N is every N-th mutant of the list, from the
# K-th. --resume skips the mutants that an earlier run of the same files and shard finished
# (caught, missed, timed out or unviable); without it, earlier runs are set aside and the
# shard starts over. (cargo-mutants' own --shard and --iterate do not combine so: it shards
# what is left after skipping, so a resumed shard would be another shard.) --recheck keeps the
# earlier runs too and runs only the mutants whose latest outcome is missed or timed out (after
# tests were added for them); a mutant's outcome is always that of the latest run that tried it.
#
# Any other option is cargo-mutants' own (`cargo mutants --help`). Results go to
# target/mutants/FILES[-shard-K-of-N]/ (OUT overrides it): the shard's mutants (mutants.txt),
# one cargo-mutants output folder per run (run-1/mutants.out, run-2/...; each holds caught.txt,
# missed.txt, timeout.txt, unviable.txt, outcomes.json and a log per mutant), and summary.txt,
# the counts over all runs (each mutant's latest outcome) and the mutants missed.
#
# Each mutant runs the unit tests of the models, ops and CLI crates, the property and workflow
# tests of growth and of the ops (tests/growth_properties.rs, tests/growth_workflow.rs,
# tests/ops_properties/) and the CUDA parity tests (ops/tests/cuda_parity.rs, on the emulator
# where there is no GPU, for pattention_norm/cuda.rs): the tests that pin what growth computes,
# in about 10 seconds.
#
# The build is the `mutation` profile (Cargo.toml): release's optimisation with incremental
# compilation in 256 codegen units, so that a mutant rebuilds in about 5 seconds instead of the
# 1.5-3.5 minutes of a release build of the changed crates.
#
# The mutants are applied in a private copy of this checkout, target/mutants/tree, never in the
# checkout itself. It is kept between runs, so that each mutant rebuilds only the crates it
# touches: its sources are brought up to date with the checkout's before every run, and its
# target/ is kept too (the first run builds everything once, a few minutes).
#
# Needs cargo-mutants: `cargo install --locked cargo-mutants` (tested with 27.1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
checkout=$PWD

if ! cargo mutants --version >/dev/null 2>&1; then
    echo "mutants.sh: cargo-mutants is not installed (cargo install --locked cargo-mutants)" >&2
    exit 1
fi

FILES=${FILES:-all}
case "$FILES" in
    all) globs=(models/src/model/growth.rs models/src/model/pattention.rs
                models/src/model/optim.rs 'ops/src/pattention_norm/*.rs') ;;
    growth | pattention | optim) globs=("models/src/model/$FILES.rs") ;;
    norm) globs=('ops/src/pattention_norm/*.rs') ;;
    *) echo "mutants.sh: FILES must be all, growth, pattention, optim or norm, got '$FILES'" >&2
       exit 1 ;;
esac
file_args=()
for glob in "${globs[@]}"; do file_args+=(--file "$glob"); done

packages=(tokenformer-models tokenformer-ops tokenformer)
targets=(--lib --test growth_properties --test growth_workflow --test ops_properties
         --test cuda_parity)

# The options this script handles itself; the rest go to cargo-mutants.
shard="" resume=false recheck=false listing=false args=()
while (($#)); do
    case "$1" in
        --shard) shard=${2:-}; shift ;;
        --shard=*) shard=${1#--shard=} ;;
        --resume) resume=true ;;
        --recheck) resume=true recheck=true ;;
        --list | --list-files) listing=true; args+=("$1") ;;
        *) args+=("$1") ;;
    esac
    shift
done
if [[ -n "$shard" ]]; then
    if [[ ! "$shard" =~ ^([0-9]+)/([0-9]+)$ ]] ||
        ((BASH_REMATCH[1] < 1 || BASH_REMATCH[1] > BASH_REMATCH[2])); then
        echo "mutants.sh: --shard must be K/N with 1 <= K <= N, got '$shard'" >&2
        exit 1
    fi
fi

# The private tree: every file git tracks or would track, rewritten only where it differs (a
# rewritten file gets a new timestamp, so cargo rebuilds what depends on it, including a file
# that a run stopped in the middle of a mutant left mutated).
tree=$checkout/target/mutants/tree
mkdir -p "$tree"
git ls-files --cached --others --exclude-standard -z | while IFS= read -r -d '' file; do
    [[ -f "$file" ]] || continue
    if ! cmp -s "$file" "$tree/$file"; then
        mkdir -p "$tree/$(dirname "$file")"
        cp "$file" "$tree/$file"
    fi
done
cd "$tree"

common=(--workspace "${file_args[@]}")
if $listing; then
    exec cargo mutants "${common[@]}" "${args[@]}"
fi

# This shard's mutants, less those that earlier runs finished when resuming.
name=$FILES
if [[ -n "$shard" ]]; then name="$name-shard-${shard/\//-of-}"; fi
OUT=${OUT:-$checkout/target/mutants/$name}
mkdir -p "$OUT"
cargo mutants "${common[@]}" --list >"$OUT/all.txt"
if [[ -n "$shard" ]]; then
    k=${shard%/*} n=${shard#*/}
    awk -v k="$k" -v n="$n" '(NR - k) % n == 0' "$OUT/all.txt" >"$OUT/mutants.txt"
else
    cp "$OUT/all.txt" "$OUT/mutants.txt"
fi
if ! $resume && compgen -G "$OUT/run-*" >/dev/null; then
    set_aside="$OUT/set-aside-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$set_aside"
    mv "$OUT"/run-* "$set_aside/"
fi
# "OUTCOME<TAB>MUTANT" for each mutant of this shard that a run finished, with the outcome of
# the latest run that did (runs in the order they were made).
latest() {
    local run outcome
    for run in $(cd "$OUT" && compgen -G "run-*" | sort -t- -k2 -n); do
        for outcome in caught missed timeout unviable; do
            sed "s/^/$outcome\t/" "$OUT/$run/mutants.out/$outcome.txt" 2>/dev/null || true
        done
    done | awk -F'\t' 'NR == FNR { want[$0] = 1; next }
                       ($2 in want) { last[$2] = $1 }
                       END { for (m in last) print last[m] "\t" m }' "$OUT/mutants.txt" - |
        sort -t$'\t' -k2
}
# The mutants whose latest outcome is $1.
with_outcome() { latest | awk -F'\t' -v o="$1" '$1 == o { print $2 }'; }
if $recheck; then
    todo=$(with_outcome missed; with_outcome timeout)
else
    todo=$(grep -vxF -f <(latest | cut -f2; echo) "$OUT/mutants.txt" || true)
fi
summary() {
    {
        echo "files: ${globs[*]}; shard: ${shard:-all}; mutants: $(wc -l <"$OUT/mutants.txt")"
        for outcome in caught missed timeout unviable; do
            echo "$outcome: $(with_outcome $outcome | grep -c . || true)"
        done
        echo "not yet run: $(grep -cvxF -f <(latest | cut -f2; echo) "$OUT/mutants.txt" || true)"
        echo "missed:"
        with_outcome missed | sed 's/^/  /'
    } | tee "$OUT/summary.txt"
}
if [[ -z "$todo" ]]; then
    summary
    exit 0
fi

package_args=()
for p in "${packages[@]}"; do package_args+=(--package "$p"); done
# The baseline: the same tests on the unmutated tree. cargo-mutants' own baseline would run
# only the mutated crate's tests, which do not include the CLI crate's test files.
echo "mutants.sh: baseline: cargo test --profile mutation ${package_args[*]} ${targets[*]}"
if ! cargo test --profile mutation "${package_args[@]}" "${targets[@]}" >"$OUT/baseline.log" 2>&1; then
    echo "mutants.sh: the tests fail without any mutant; see $OUT/baseline.log" >&2
    exit 1
fi

# The mutants to run, named exactly (one anchored regex each). The test targets go to every
# cargo command (--cargo-arg), so that the build before the tests links only those, not every
# test binary of the three crates. --timeout: a mutant that makes a test loop is stopped after
# 5 minutes (the tests take about 20 seconds).
pick=()
while IFS= read -r mutant; do
    pick+=(--re "^$(printf '%s' "$mutant" | sed 's/[][\\.^$*+?(){}|]/\\&/g')\$")
done <<<"$todo"
target_args=()
for t in "${targets[@]}"; do target_args+=("--cargo-arg=$t"); done
run=1
while [[ -e "$OUT/run-$run" ]]; do run=$((run + 1)); done
mkdir -p "$OUT/run-$run"
echo "mutants.sh: $(wc -l <<<"$todo") mutants to run; results in $OUT/run-$run"
status=0
cargo mutants "${common[@]}" "${pick[@]}" --in-place --output "$OUT/run-$run" \
    --profile mutation --baseline skip --timeout 300 --build-timeout 1200 \
    --test-package "$(IFS=,; echo "${packages[*]}")" "${target_args[@]}" "${args[@]}" ||
    status=$?
summary
# cargo-mutants exits 2 when mutants were missed, 3 on timeouts: results, not failures here.
if ((status != 0 && status != 2 && status != 3)); then exit "$status"; fi

#!/usr/bin/env bash
# Mutation testing of the growth code: cargo-mutants changes one thing at a time in
# models/src/model/{growth,pattention,optim}.rs and ops/src/pattention_norm/ (a function body
# replaced by a constant, an operator swapped, a match arm deleted, ...), rebuilds, and runs the
# tests. A mutant that no test fails on is "missed": a change to the code that the tests cannot
# see. docs/mutation_testing.md keeps the last result and says why each missed mutant
# left is harmless.
#
# Not run in CI: every mutant is a rebuild and a test run, about a minute and a half on 2 cores,
# and these files give a few hundred mutants. Run it in shards, and resume it:
#
#   scripts/mutants.sh                        # every file above, every mutant
#   scripts/mutants.sh --shard 0/4            # the first quarter (shards count from 0)
#   FILES=growth scripts/mutants.sh           # one file: growth, pattention, optim or norm
#   scripts/mutants.sh --shard 0/4 --iterate  # resume that shard: skip what was caught or
#                                             # unviable in its last run, and keep those results
#   scripts/mutants.sh --list                 # the mutants, without running anything
#
# Any other option is cargo-mutants' own (`cargo mutants --help`). Results go to
# target/mutants/FILES[-shard-K-of-N]/mutants.out (OUT overrides the folder above mutants.out):
# caught.txt, missed.txt, timeout.txt, unviable.txt, outcomes.json and a log per mutant.
#
# The tests each mutant runs (TESTS):
#   growth (default)  the unit tests of the models and ops crates and of the CLI crate, and the
#                     property and workflow tests of growth and of the ops
#                     (tests/growth_properties.rs, tests/growth_workflow.rs, tests/ops_properties/)
#   full              `cargo test --release`, the whole suite (about 20 minutes a mutant)
#
# Needs cargo-mutants: `cargo install --locked cargo-mutants` (tested with 27.1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

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

TESTS=${TESTS:-growth}
case "$TESTS" in
    growth) test_args=(--test-package tokenformer-models,tokenformer-ops,tokenformer --
                       --lib --test growth_properties --test growth_workflow
                       --test ops_properties) ;;
    full) test_args=(--test-workspace true) ;;
    *) echo "mutants.sh: TESTS must be growth or full, got '$TESTS'" >&2; exit 1 ;;
esac

# The output folder is named after the files and the shard, so that shards run side by side
# and each resumes from its own results.
name=$FILES
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --shard) shard=${args[i + 1]:-} ;;
        --shard=*) shard=${args[i]#--shard=} ;;
    esac
done
if [[ -n "${shard:-}" ]]; then name="$name-shard-${shard/\//-of-}"; fi
OUT=${OUT:-target/mutants/$name}
mkdir -p "$OUT"

# Release builds, as the suite runs; the scratch copy starts from this checkout's target/ so
# that only the mutated crates rebuild.
exec cargo mutants --workspace "${file_args[@]}" --output "$OUT" --profile release \
    --copy-target true --timeout-multiplier 3 "${args[@]}" "${test_args[@]}"

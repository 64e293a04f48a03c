#!/usr/bin/env bash
# Mutation testing of the growth code: cargo-mutants changes one thing at a time in
# models/src/model/{growth,pattention,optim}.rs and ops/src/pattention_norm/ (a function body
# replaced by a constant, an operator swapped, a match arm deleted, ...), rebuilds, and runs the
# tests. A mutant that no test fails on is "missed": a change to the code that the tests cannot
# see. docs/mutation_testing.md keeps the last result and says why each missed mutant left is
# harmless.
#
# Not run in CI: every mutant is a rebuild and a test run, a minute or two on 2 cores, and these
# files give a few hundred mutants. Run it in shards, and resume it:
#
#   scripts/mutants.sh                        # every file above, every mutant
#   scripts/mutants.sh --shard 0/4            # a quarter: every 4th mutant, from the first
#   FILES=growth scripts/mutants.sh           # one file: growth, pattention, optim or norm
#   scripts/mutants.sh --shard 0/4 --iterate  # resume that shard: skip what was caught or
#                                             # unviable in its last run, and keep those results
#   scripts/mutants.sh --list                 # the mutants, without running anything
#
# Any other option is cargo-mutants' own (`cargo mutants --help`). Results go to
# target/mutants/FILES[-shard-K-of-N]/mutants.out (OUT overrides the folder above mutants.out):
# caught.txt, missed.txt, timeout.txt, unviable.txt, outcomes.json and a log per mutant.
#
# Each mutant runs the unit tests of the models, ops and CLI crates and the property and
# workflow tests of growth and of the ops (tests/growth_properties.rs, tests/growth_workflow.rs,
# tests/ops_properties/): the tests that pin what growth computes, in about 20 seconds.
#
# The mutants are applied in a private copy of this checkout, target/mutants/tree, never in the
# checkout itself. It is kept between runs, so that each mutant rebuilds only the crates it
# touches: its sources are brought up to date with the checkout's before every run, and its
# target/ starts as a copy of the checkout's (timestamps kept, so that cargo reuses it).
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
targets=(--lib --test growth_properties --test growth_workflow --test ops_properties)

# The output folder is named after the files and the shard, so that shards run side by side
# and each resumes from its own results.
name=$FILES
args=("$@")
listing=false
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --shard) shard=${args[i + 1]:-} ;;
        --shard=*) shard=${args[i]#--shard=} ;;
        --list | --list-files) listing=true ;;
    esac
done
if [[ -n "${shard:-}" ]]; then name="$name-shard-${shard/\//-of-}"; fi
OUT=$(mkdir -p "${OUT:-target/mutants/$name}" && cd "${OUT:-target/mutants/$name}" && pwd)

# The private tree: every file git tracks or would track, rewritten only where it differs (a
# rewritten file gets a new timestamp, so cargo rebuilds what depends on it, including a file
# that a run stopped in the middle of a mutant left mutated).
tree=$checkout/target/mutants/tree
mkdir -p "$tree"
if [[ ! -d "$tree/target/release" && -d target/release ]]; then
    mkdir -p "$tree/target"
    cp -a target/release "$tree/target/"
fi
git ls-files --cached --others --exclude-standard -z | while IFS= read -r -d '' file; do
    [[ -f "$file" ]] || continue
    if ! cmp -s "$file" "$tree/$file"; then
        mkdir -p "$tree/$(dirname "$file")"
        cp "$file" "$tree/$file"
    fi
done
cd "$tree"

package_args=()
for p in "${packages[@]}"; do package_args+=(--package "$p"); done
if ! $listing; then
    # The baseline: the same tests on the unmutated tree. cargo-mutants' own baseline would run
    # only the mutated crate's tests, which do not include the CLI crate's test files.
    echo "mutants.sh: baseline: cargo test --release ${package_args[*]} ${targets[*]}"
    if ! cargo test --release "${package_args[@]}" "${targets[@]}" >"$OUT/baseline.log" 2>&1; then
        echo "mutants.sh: the tests fail without any mutant; see $OUT/baseline.log" >&2
        exit 1
    fi
fi

# --timeout: a mutant that makes a test loop is stopped after 5 minutes (the tests take about
# 20 seconds). Shards take every n-th mutant (round-robin), so that a shard samples every
# function rather than the first few.
exec cargo mutants --workspace --in-place "${file_args[@]}" --output "$OUT" \
    --profile release --baseline skip --timeout 300 --build-timeout 1200 \
    --sharding round-robin --test-package "$(IFS=,; echo "${packages[*]}")" "${args[@]}" \
    -- "${targets[@]}"

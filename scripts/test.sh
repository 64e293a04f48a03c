#!/usr/bin/env bash
# `cargo test --release` with a closing count of the tests that could not run here
# (scripts/skips.sh). Exits with cargo's status.
#
#   scripts/test.sh [CARGO TEST ARGS...]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
scripts/skips.sh "$log"
exit "$status"

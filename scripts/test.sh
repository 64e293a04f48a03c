#!/usr/bin/env bash
# `cargo test --release` with a closing count of the tests that could not run here.
#
#   scripts/test.sh [CARGO TEST ARGS...]
#
# A test that cannot run on this machine (no numpy for the float64 reference, no NVRTC for the
# kernel compile check, neither a GPU nor a C++ compiler for the GPU tests) passes after printing
# `skipped: <test>: <why>`. This runs the suite, then totals those lines by reason and names the
# tests, so that a skip is never mistaken for a check. Exits with cargo's status.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
if grep -q '^skipped: ' "$log"; then
  echo "skipped tests, by reason:"
  grep '^skipped: ' "$log" | sed 's/^skipped: [^:]*: //' | sort | uniq -c
  echo "the skipped tests:"
  grep '^skipped: ' "$log" | sed 's/^skipped: \([^:]*\):.*/  \1/' | sort -u
else
  echo "skipped tests: none"
fi
exit "$status"

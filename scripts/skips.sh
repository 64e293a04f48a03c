#!/usr/bin/env bash
# Totals the skipped tests in the output of `cargo test` (saved in LOG), by reason, and names
# them. A test that cannot run on this machine (no numpy for the float64 reference, no NVRTC for
# the kernel compile check, neither a GPU nor a C++ compiler for the GPU tests) passes after
# printing `skipped: <test>: <why>`; this makes sure a skip is never mistaken for a check.
#
#   scripts/skips.sh LOG
set -euo pipefail
log=${1:?usage: scripts/skips.sh LOG}
if grep -q '^skipped: ' "$log"; then
  echo "skipped tests, by reason:"
  grep '^skipped: ' "$log" | sed 's/^skipped: [^:]*: //' | sort | uniq -c
  echo "the skipped tests:"
  grep '^skipped: ' "$log" | sed 's/^skipped: \([^:]*\):.*/  \1/' | sort -u
else
  echo "skipped tests: none"
fi

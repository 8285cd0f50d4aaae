#!/usr/bin/env bash
# Scale check of the gateway's chunk catalog (issue 4; see docs/scale.md).
#
#   bench/scale.sh                      # 20 M entries in /tmp/tierback-scale
#   ENTRIES=80000000 bench/scale.sh     # the reference scale (~11 GiB, hours)
#   bench/scale.sh --reuse              # keep an existing catalog, re-measure
#   bench/scale.sh --fast-fill --measure-packs 0 --insert-only
#                                       # inserts only: bench-only bulk load
#                                       # (~5 min at 20 M), then the insert
#                                       # sweep; repeat with --reuse
#
# Extra arguments go to the example (see gateway/examples/scale.rs for flags).
# Needs python3 (posix_fadvise to drop the page cache without root) and, for
# the "resident before" column, fincore (util-linux). Prints a table; the
# markdown copy at the end is what docs/scale.md quotes.
set -euo pipefail
cd "$(dirname "$0")/.."
ENTRIES="${ENTRIES:-20000000}"
DIR="${DIR:-/tmp/tierback-scale}"
LOG="${LOG:-$DIR.log}"
need=$(( ENTRIES / 1000000 * 150 ))   # MiB: ~140 bytes per chunk row + WAL
avail=$(df -m --output=avail "$(dirname "$DIR")" | tail -1)
if (( avail < need )); then
  echo "need ~${need} MiB free under $(dirname "$DIR"), have ${avail}" >&2
  exit 1
fi
cargo build --release -p tierback-gateway --example scale
./target/release/examples/scale --entries "$ENTRIES" --dir "$DIR" "$@" 2>&1 | tee "$LOG"
echo "log: $LOG; remove $DIR when done (rm -rf $DIR)"

#!/usr/bin/env bash
# A few seconds of every benchmark harness at toy size, so the tools the numbers in
# docs/benchmarks.md come from keep working: the side-by-side driver against every system
# (bare relay, lockstep with Redis, embedded and on two nodes, Socket.IO on one and two nodes)
# the scale run on two nodes, and the Yjs benchmark (loadtest/yjs.sh: one document × 5
# editors on two nodes, and the compactor over a 1,000-entry log). Fails when a system loses or
# refuses anything, a scale run reports an error or a lost lock, or a Yjs round trip or
# compaction goes unmeasured. Run by scripts/test.sh; the figures it prints mean
# nothing (toy size, CI machine).
#
#   loadtest/smoke.sh            (builds the gateway and the load tool; SKIP_BUILD=1 does not)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

ROOMS=4 MEMBERS=5 RATE=5 WARMUP=1 DURATION=3 RUNS=1 BENCH_OUT="$OUT" \
    bash "$ROOT/loadtest/side-by-side.sh" >"$OUT/table.md"
cat "$OUT/table.md"
# Every system ran, without errors, and delivered every cursor (a toy load never coalesces).
jq -s -e '
    (map(.system) | unique | length) == 6
    and all(.[]; .errors_total == 0 and .joined == .connections and .delivery_ratio >= 0.99)
' "$OUT/results.jsonl" >/dev/null || {
    echo "side-by-side smoke failed:" >&2
    jq -c '{system, joined, connections, errors, delivery_ratio}' "$OUT/results.jsonl" >&2
    exit 1
}

# The scale run at 4 rooms (80 connections), locks every 2 s so a few cycles happen.
SKIP_BUILD=1 LOCK_EVERY_S=2 LOCK_HOLD_MS=300 WARMUP_S=1 SCALE_JSON="$OUT/scale.json" \
    bash "$ROOT/loadtest/scale.sh" 4 5 >"$OUT/scale.md"
cat "$OUT/scale.md"
jq -e '.errors_total == 0 and .lost_locks_total == 0' "$OUT/scale.json" >/dev/null || {
    echo "scale smoke failed: errors or lost locks (table above)" >&2
    exit 1
}
# The Yjs driver: 1 document × 5 editors typing 2 updates/s for 3 s over two nodes (every
# update must reach the 4 other editors and be measured), then 1,000 log entries merged into
# Postgres by the compactor (the 500-entry threshold makes it start at once).
SKIP_BUILD=1 SCENARIOS="latency compaction" LAT_DOCS=1 EDITORS=5 WARMUP=1 DURATION=3 RUNS=1 \
    PERF=0 LOG_ENTRIES=1000 YJS_OUT="$OUT/yjs" bash "$ROOT/loadtest/yjs.sh" >"$OUT/yjs.md"
cat "$OUT/yjs.md"
jq -s -e '
    (map(select(.scenario == "latency")) | length == 1 and all(.[];
        .delivery_ratio == 1 and .same_node.samples > 0 and .other_node.samples > 0
        and .unexpected_closes == 0 and .writer_ack.samples > 0))
    and (map(select(.scenario == "compaction")) | length == 1 and all(.[];
        .merged == 1000 and .complete and .rounds >= 1))
' "$OUT/yjs/results.jsonl" >/dev/null || {
    echo "yjs smoke failed:" >&2
    cat "$OUT/yjs/results.jsonl" >&2
    exit 1
}
echo "benchmark harness smoke: ok"

#!/usr/bin/env bash
# Markdown tables (medians over runs) from loadtest/yjs.sh's results.jsonl.
#   loadtest/yjs/summary.sh results.jsonl [perf-latency.txt]
set -euo pipefail
R="$1"
PERF="${2:-}"
med='def med: sort | .[(length - 1) / 2 | floor];'

# section TITLE HEADER JQ_PROGRAM: a table, printed only when the results have rows for it.
section() {
    local rows
    rows="$(jq -rs "$med$3" "$R")"
    [[ -n "$rows" ]] || return 0
    printf '## %s\n\n%s\n%s\n%s\n\n' "$1" "$2" "$(sed 's/[^|]*|/---|/g; s/^---//' <<<"$2")" "$rows"
}

section "Update round trip (ms; median of runs)" \
    "| docs × editors | runs | updates/s | deliveries/s | p50 | p95 | p99 | p99.9 | same node p95 | other node p95 | writer ack p95 | delivered | driver CPU (cores) | node CPU A / B (cores) |" '
  map(select(.scenario == "latency" and .run != "perf")) | group_by(.docs)[] |
  "| \(.[0].docs) × \(.[0].editors_per_doc) | \(length) | \(map(.updates_per_s) | med) | \(map(.deliveries_per_s) | med)"
  + " | \(map(.round_trip.p50_ms) | med) | **\(map(.round_trip.p95_ms) | med)** | \(map(.round_trip.p99_ms) | med)"
  + " | \(map(.round_trip.p999_ms) | med) | \(map(.same_node.p95_ms) | med) | \(map(.other_node.p95_ms) | med)"
  + " | \(map(.writer_ack.p95_ms) | med) | \(map(.delivery_ratio) | min) | \(map(.driver_cpu_cores) | med)"
  + " | \(map(.server_cpu_cores[0]) | med) / \(map(.server_cpu_cores[1]) | med) |"'

section "Memory per loaded document (median of runs)" \
    "| docs × clients | runs | RSS base → docs → all (MB) | per doc + 1 conn (bytes) | per extra conn (bytes) | Redis per doc (bytes) | doc state (bytes) | refused | node CPU s (phase 1 / 2) | node CPU when idle (cores) |" '
  map(select(.scenario == "memory")) | group_by(.docs)[] |
  "| \(.[0].docs) × \(.[0].clients_per_doc) | \(length) | \(map(.rss_base_mb) | med) → \(map(.rss_docs_mb) | med) → \(map(.rss_all_mb) | med)"
  + " | **\(map(.bytes_per_doc_with_1_conn) | med)** | **\(map(.bytes_per_extra_conn) | med)** | \(map(.redis_bytes_per_doc) | med)"
  + " | \(.[0].doc_state_bytes) | \(map(.refused | to_entries | map("\(.key): \(.value)") | join(", ")) | unique | join("; "))"
  + " | \(map(.server_cpu_s_phase1) | med) / \(map(.server_cpu_s_phase2) | med) | \(map(.server_idle_cpu_cores) | med) |"'

section "Cold join (connect → y-websocket sync on a restarted node; median of runs)" \
    "| document | kind | runs | snapshot (bytes) | log tail (entries) | sync (ms), median | all runs (ms) | complete | node CPU (s) |" '
  map(select(.scenario == "cold_join" and .kind != null)) | group_by([.target_bytes, .kind])[] |
  "| \(.[0].target_bytes / 1e6) MB | \(.[0].kind) | \(length) | \(map(.snapshot_bytes) | med) | \(map(.tail_entries) | med)"
  + " | **\(map(.sync_ms) | med)** | \(map(.sync_ms) | join(", ")) | \(all(.complete)) | \(map(.server_cpu_s) | med) |"'
jq -r 'select(.scenario == "build") | "- built \(.doc): \(.updates) updates by 4 editors in \(.build_s) s, state \(.state_bytes) bytes, \(.text_chars) characters, editors agree: \(.writers_agree)"' "$R"
echo

section "Compaction (through the compactor, timed by its audit records; median of runs)" \
    "| log entries | runs | update bytes | load + sync (ms) | rounds | round times (s) | entries/s in rounds | MB/s in rounds | entries/s, first round start → last end | snapshot (bytes) |" '
  map(select(.scenario == "compaction")) | select(length > 0) |
  "| \(.[0].log_entries) | \(length) | \(.[0].update_bytes) | \(map(.load_and_sync_ms) | med) | \(map(.rounds) | med)"
  + " | \(map(.round_s | map(tostring) | join(" + ")) | join("; "))"
  + " | **\(map(.entries_per_s) | med)** | \(map(.mb_per_s) | med) | \(map(.end_to_end_entries_per_s) | med) | \(map(.snapshot_bytes) | med) |"'

if [[ -s "$PERF" ]]; then
    echo "## perf, node A during the latency scenario (top frames, self time)"
    echo
    echo '```'
    head -25 "$PERF"
    echo '```'
fi

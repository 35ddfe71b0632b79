#!/usr/bin/env bash
# Server memory per idle, joined connection.
#
#   loadtest/idle-memory.sh [CONNECTIONS]      (default 10000; RUNS=3 for a median)
#
# For each run: a fresh gateway (temp data dir, heartbeat 1h so no pings during the idle
# window), `lockstep-load idle` with CONNECTIONS sessions in rooms of ~100 members, the result
# as one JSON object per run on stdout, then the gateway is stopped (also on error or ^C).
# One process may hold < 20k sockets here (open-files hard limit), so stay below that.

source "$(dirname "$0")/lib.sh"

N="${1:-10000}"
RUNS="${RUNS:-1}"
ROOMS="${ROOMS:-$(( (N + 99) / 100 ))}"
HOLD="${HOLD_SECS:-10}"
RESULTS="$(mktemp -t lockstep-idle.XXXXXX.jsonl)"
trap 'stop_server; rm -f "$RESULTS"' EXIT

build_all
for run in $(seq 1 "$RUNS"); do
    echo "== idle run $run/$RUNS: $N connections in $ROOMS rooms" >&2
    start_server LOCKSTEP_HEARTBEAT_INTERVAL=1h
    "$LOAD" idle --url "$SERVER_URL" --connections "$N" --rooms "$ROOMS" \
        --server-pid "$SERVER_PID" --hold-secs "$HOLD" | jq -c . | tee -a "$RESULTS"
    stop_server
done

if (( RUNS > 1 )); then
    echo "== median of $RUNS runs" >&2
    jq -n -c --argjson per "$(median "$RESULTS" .per_connection_bytes)" \
        --argjson after "$(median "$RESULTS" .rss_after_kb)" \
        --argjson connect "$(median "$RESULTS" .connect_s)" \
        '{median_per_connection_bytes: $per, median_rss_after_kb: $after, median_connect_s: $connect}'
fi

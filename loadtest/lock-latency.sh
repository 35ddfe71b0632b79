#!/usr/bin/env bash
# Lock acquire/release latency against a bare ping round trip, over loopback.
#
#   loadtest/lock-latency.sh [CLIENTS] [ITERATIONS]     (defaults 20 and 2000; RUNS=3 for medians)
#
# Starts one gateway (temp data dir, heartbeat 1h, per-session message budget raised so the
# closed loop measures latency rather than the 100 msg/s default rate limit), then per run:
# `locks` (uncontended: one resource per client, all in one room so every lock event fans
# out to every client), `locks --room-per-client` (the same without the fan-out),
# `locks --contended` (everyone on one resource), `ping` (the baseline). One JSON object per measurement on stdout; the gateway is
# stopped on exit, error or ^C.

source "$(dirname "$0")/lib.sh"

CLIENTS="${1:-20}"
ITERATIONS="${2:-2000}"
RUNS="${RUNS:-1}"
RESULTS="$(mktemp -t lockstep-locks.XXXXXX.jsonl)"
trap 'stop_server; rm -f "$RESULTS"' EXIT

build_all
start_server LOCKSTEP_HEARTBEAT_INTERVAL=1h \
    LOCKSTEP_MESSAGES_PER_SECOND=1000000 LOCKSTEP_MESSAGE_BURST=1000000

common=(--url "$SERVER_URL" --clients "$CLIENTS" --iterations "$ITERATIONS")
for run in $(seq 1 "$RUNS"); do
    echo "== run $run/$RUNS: locks (uncontended)" >&2
    "$LOAD" locks "${common[@]}" --resources "$CLIENTS" | jq -c . | tee -a "$RESULTS"
    echo "== run $run/$RUNS: locks --room-per-client (no fan-out)" >&2
    "$LOAD" locks "${common[@]}" --resources "$CLIENTS" --room-per-client | jq -c . | tee -a "$RESULTS"
    echo "== run $run/$RUNS: locks --contended" >&2
    "$LOAD" locks "${common[@]}" --contended | jq -c . | tee -a "$RESULTS"
    echo "== run $run/$RUNS: ping" >&2
    "$LOAD" ping "${common[@]}" | jq -c . | tee -a "$RESULTS"
done

echo "== medians over $RUNS run(s) (µs)" >&2
jq -s -c '
  def med: sort | .[(length - 1) / 2 | floor];
  (map(select(.mode == "locks" and (.contended | not) and .shared_room))) as $l
  | (map(select(.mode == "locks" and (.contended | not) and (.shared_room | not)))) as $o
  | (map(select(.mode == "locks" and .contended))) as $c
  | (map(select(.mode == "ping"))) as $p
  | {
      lock_acquire_p50: ($l | map(.acquire_us.p50) | med),
      lock_acquire_p99: ($l | map(.acquire_us.p99) | med),
      lock_release_p50: ($l | map(.release_us.p50) | med),
      lock_release_p99: ($l | map(.release_us.p99) | med),
      lock_acquires_per_s: ($l | map(.acquires_per_s) | med),
      own_room_acquire_p50: ($o | map(.acquire_us.p50) | med),
      own_room_acquire_p99: ($o | map(.acquire_us.p99) | med),
      own_room_acquires_per_s: ($o | map(.acquires_per_s) | med),
      contended_acquire_p50: ($c | map(.acquire_us.p50) | med),
      contended_acquire_p99: ($c | map(.acquire_us.p99) | med),
      contended_lock_held: ($c | map(.lock_held) | med),
      contended_granted: ($c | map(.granted) | med),
      ping_p50: ($p | map(.rtt_us.p50) | med),
      ping_p99: ($p | map(.rtt_us.p99) | med),
      pings_per_s: ($p | map(.pings_per_s) | med)
    }
  | . + {
      ratio_p50_lock_over_ping: ((.lock_acquire_p50 / .ping_p50) * 100 | round / 100),
      ratio_p99_lock_over_ping: ((.lock_acquire_p99 / .ping_p99) * 100 | round / 100)
    }' "$RESULTS"

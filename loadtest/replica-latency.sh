#!/usr/bin/env bash
# The cost of replicated grants: lock acquire/release latency with LOCKSTEP_LOCK_REPLICAS=0
# and =1 against the same real primary + replica, interleaved.
#
#   loadtest/replica-latency.sh [CLIENTS] [ITERATIONS]     (defaults 10 and 1000; RUNS=3)
#
# Starts a redis-server primary and a replica of it (temp dirs, free ports, no persistence),
# then per run one gateway with replicas=0 and one with replicas=1 (the same binary, same
# settings otherwise), each measured with `lockstep-load locks --room-per-client` (uncontended,
# no room fan-out: the lock path itself). Settings alternate within each run (0, 1, 0, 1, …) so
# a busier moment of the machine does not land on one of them only. One JSON object per
# measurement on stdout; medians per setting at the end. Everything is stopped on exit.

source "$(dirname "$0")/lib.sh"

CLIENTS="${1:-10}"
ITERATIONS="${2:-1000}"
RUNS="${RUNS:-3}"
RESULTS="$(mktemp -t lockstep-replicas.XXXXXX.jsonl)"
REDIS_DIR="$(mktemp -d -t lockstep-replicas-redis.XXXXXX)"
PRIMARY_PID=""
REPLICA_PID=""

cleanup() {
    stop_server
    for pid in "$PRIMARY_PID" "$REPLICA_PID"; do
        [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    done
    rm -rf "$REDIS_DIR" "$RESULTS"
}
trap cleanup EXIT

# start_redis PORT DIR [ARGS...]: a redis-server without persistence; echoes its pid.
start_redis() {
    local port="$1" dir="$2"
    shift 2
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --repl-diskless-sync-delay 0 --dir "$dir" "$@" >"$dir/log" 2>&1 &
    echo $!
}

build_all
PRIMARY_PORT="$(free_port)"
REPLICA_PORT="$(free_port)"
PRIMARY_PID="$(start_redis "$PRIMARY_PORT" "$REDIS_DIR/primary")"
REPLICA_PID="$(start_redis "$REPLICA_PORT" "$REDIS_DIR/replica" --replicaof 127.0.0.1 "$PRIMARY_PORT")"
for _ in $(seq 1 200); do
    redis-cli -p "$REPLICA_PORT" info replication 2>/dev/null | grep -q master_link_status:up && break
    sleep 0.1
done
redis-cli -p "$REPLICA_PORT" info replication | grep -q master_link_status:up \
    || { echo "replica did not sync" >&2; exit 1; }
echo "primary :$PRIMARY_PORT (pid $PRIMARY_PID), replica :$REPLICA_PORT (pid $REPLICA_PID)" >&2

for run in $(seq 1 "$RUNS"); do
    for replicas in 0 1; do
        echo "== run $run/$RUNS: LOCKSTEP_LOCK_REPLICAS=$replicas" >&2
        start_server LOCKSTEP_HEARTBEAT_INTERVAL=1h \
            LOCKSTEP_MESSAGES_PER_SECOND=1000000 LOCKSTEP_MESSAGE_BURST=1000000 \
            LOCKSTEP_REDIS_URL="redis://127.0.0.1:$PRIMARY_PORT" \
            LOCKSTEP_LOCK_REPLICAS="$replicas"
        "$LOAD" locks --url "$SERVER_URL" --clients "$CLIENTS" --iterations "$ITERATIONS" \
            --resources "$CLIENTS" --room-per-client \
            | jq -c --argjson r "$replicas" '. + {replicas: $r}' | tee -a "$RESULTS"
        stop_server
    done
done

echo "== medians over $RUNS run(s) (µs)" >&2
jq -s -c '
  def med: sort | .[(length - 1) / 2 | floor];
  group_by(.replicas) | map({
      replicas: .[0].replicas,
      acquire_p50: (map(.acquire_us.p50) | med),
      acquire_p99: (map(.acquire_us.p99) | med),
      release_p50: (map(.release_us.p50) | med),
      release_p99: (map(.release_us.p99) | med),
      acquires_per_s: (map(.acquires_per_s) | med),
      acquire_p50_runs: map(.acquire_us.p50),
      acquire_p99_runs: map(.acquire_us.p99)
    })' "$RESULTS"

#!/usr/bin/env bash
# What a second node costs: two gateway nodes on one private Redis, clients split across them.
#
#   loadtest/crossnode-latency.sh [PAIRS] [ITERATIONS]   (defaults 10 and 1000; RUNS=3 for medians)
#
# Starts a private redis-server (free loopback port, no persistence) and two gateway nodes on it
# (free ports, one shared HS256 secret, temp data dirs, per-session message budget raised so
# closed loops measure latency, not the rate limit), then per run:
#   crossnode cursor    PAIRS senders and PAIRS passive listeners on node A, PAIRS receivers
#                       on node B, one room: `cursor` on A -> `cursor` frame on B (and on A)
#   crossnode presence  the same with `presence {room, focus}` -> `presence.update`
#                       (both first as a closed loop, one message in flight per sender, then
#                       paced at PACED_RATE messages/s per sender)
#   crossnode locks     2*PAIRS clients (half on each node), own resources, one shared room,
#                       then again with a room per client: lock.acquire / lock.release
#   locks               the same 2*PAIRS clients all on node A, a room per client (Redis mode,
#                       one node: what the second node adds)
#   crossnode set       2*PAIRS plain RESP clients: SET key val NX PX 30000, then DEL, straight
#                       to the same Redis (the floor for a Redis-backed lock)
# One JSON object per measurement on stdout (with `redis_calls`: the Redis commands the nodes
# sent during it, from INFO commandstats), then the medians and the lock / SET NX ratios.
# Redis, both nodes and the temp dirs are removed on exit, error or ^C (trap).
#
# COMMANDS=1 measures Redis commands per operation instead (and nothing else): the stats are
# reset, the two idle nodes are watched for IDLE_SECONDS (default 5: reapers, lease and presence
# refreshes), then reset before each of `crossnode locks` (acquire + release pairs, shared room)
# and `crossnode presence` (focus changes, closed loop; both without warm-up), and each command's
# count, less the idle rate times the run's duration, is divided by the operations. Commands
# run inside Lua scripts count too (INFO commandstats counts them); `round_trips_per_op` is the
# nodes' own view, from `lockstep_redis_command_duration_seconds_count{op}` on /metrics: one
# per script call, command or pipeline. One JSON object per operation.
#
# Environment: RUNS, SKIP_BUILD=1, LOCKSTEP_BIN=path, BENCH_TMPDIR=dir, LOCK_ITERATIONS
# (default 2000 per lock/SET client), PACED_RATE (messages/s per sender in the paced pass,
# default 50; 0 skips it), PACED_ITERATIONS (default 500), REDIS_SERVER (default redis-server).

source "$(dirname "$0")/lib.sh"

PAIRS="${1:-10}"
ITERATIONS="${2:-1000}"
RUNS="${RUNS:-1}"
LOCK_ITERATIONS="${LOCK_ITERATIONS:-2000}"
PACED_RATE="${PACED_RATE:-50}"
PACED_ITERATIONS="${PACED_ITERATIONS:-500}"
CLIENTS=$(( 2 * PAIRS ))
REDIS_SERVER="${REDIS_SERVER:-redis-server}"

WORK=""
REDIS_PID=""
NODE_PIDS=()
RESULTS=""

cleanup() {
    local p
    for p in "${NODE_PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${NODE_PIDS[@]}"; do
        # The drain closes sessions politely; do not wait for ever.
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    NODE_PIDS=()
    if [[ -n "$REDIS_PID" ]]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
        REDIS_PID=""
    fi
    [[ -n "$WORK" ]] && rm -rf "$WORK"
    [[ -n "$RESULTS" ]] && rm -f "$RESULTS"
    WORK=""
    RESULTS=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v "$REDIS_SERVER" >/dev/null || {
    echo "redis-server is needed (apt-get install -y redis-server)" >&2
    exit 1
}

build_all
WORK="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-crossnode.XXXXXX)"
RESULTS="$WORK/results.jsonl"
ulimit -n "$(ulimit -Hn)"

start_redis "$WORK" || exit 1

SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
URLS=()
for node in a b; do
    port="$(free_port)"
    env LOCKSTEP_LISTEN="127.0.0.1:$port" \
        LOCKSTEP_REDIS_URL="$REDIS_URL" \
        LOCKSTEP_NODE_ID="bench-$node" \
        LOCKSTEP_JWT_SECRET="$SECRET" \
        LOCKSTEP_DATA_DIR="$WORK/node-$node" \
        LOCKSTEP_HEARTBEAT_INTERVAL=1h \
        LOCKSTEP_MESSAGES_PER_SECOND=1000000 LOCKSTEP_MESSAGE_BURST=1000000 \
        RUST_LOG="${RUST_LOG:-warn}" \
        "$SERVER_BIN" >"$WORK/node-$node.log" 2>&1 &
    NODE_PIDS+=($!)
    URLS+=("http://127.0.0.1:$port")
done
for i in 0 1; do
    for _ in $(seq 1 100); do
        curl -fsS "${URLS[$i]}/readyz" >/dev/null 2>&1 && break
        if ! kill -0 "${NODE_PIDS[$i]}" 2>/dev/null; then
            echo "node $i exited during start-up:" >&2
            cat "$WORK/node-$([[ $i == 0 ]] && echo a || echo b).log" >&2
            exit 1
        fi
        sleep 0.1
    done
    curl -fsS "${URLS[$i]}/readyz" >/dev/null || { echo "node $i not ready after 10s" >&2; exit 1; }
    echo "node $i pid ${NODE_PIDS[$i]} on ${URLS[$i]}" >&2
done

# The Redis commands the nodes sent during one measurement (CONFIG RESETSTAT before it):
# {"evalsha": {"calls": n, "usec_per_call": t}, ...}, to read a lock's latency against the
# number of Redis round trips behind it.
redis_calls() {
    redis-cli -p "$REDIS_PORT" INFO commandstats | python3 -c '
import json, sys
out = {}
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("cmdstat_"):
        continue
    name, _, rest = line[len("cmdstat_"):].partition(":")
    f = dict(kv.split("=", 1) for kv in rest.split(","))
    if name in ("config", "info"):
        continue
    out[name] = {"calls": int(f["calls"]), "usec_per_call": float(f["usec_per_call"])}
print(json.dumps(out, sort_keys=True))'
}

# measure LABEL ARGS...: runs the load tool, adds the Redis command counts, appends the result.
measure() {
    local label="$1" out
    shift
    echo "== run $run/$RUNS: $label" >&2
    redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    out="$("$LOAD" "$@")"
    jq -c --argjson rc "$(redis_calls)" '. + {redis_calls: $rc}' <<<"$out" | tee -a "$RESULTS"
}

both=(--url "${URLS[0]}" --url "${URLS[1]}" --jwt-secret "$SECRET")
fan=("${both[@]}" --pairs "$PAIRS" --iterations "$ITERATIONS")
paced=("${both[@]}" --pairs "$PAIRS" --iterations "$PACED_ITERATIONS" --warmup 20 --rate "$PACED_RATE")
locks=("${both[@]}" --clients "$CLIENTS" --iterations "$LOCK_ITERATIONS" --resources "$CLIENTS")
# node_calls: the Redis calls both nodes made so far, by op, as {"op": {"calls": n}}.
node_calls() {
    local u
    for u in "${URLS[@]}"; do
        curl -fsS "$u/metrics"
    done | python3 -c '
import json, re, sys
out = {}
for line in sys.stdin:
    m = re.match(r"lockstep_redis_command_duration_seconds_count\{(.*)\} (\S+)", line)
    if not m:
        continue
    op = re.search(r"op=\"([^\"]*)\"", m.group(1))
    if op:
        d = out.setdefault(op.group(1), {"calls": 0})
        d["calls"] += int(float(m.group(2)))
print(json.dumps(out))'
}

# commands_per_op OP COUNT ARGS...: runs the load tool, prints {op, ops, seconds,
# commands_per_op, round_trips_per_op} (background calls subtracted, see COMMANDS above).
commands_per_op() {
    local op="$1" count="$2" t0 t1 calls before after
    shift 2
    echo "== commands per $op ($count)" >&2
    redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    before="$(node_calls)"
    t0="$(date +%s.%N)"
    "$LOAD" "$@" >/dev/null
    t1="$(date +%s.%N)"
    calls="$(redis_calls)"
    after="$(node_calls)"
    python3 - "$op" "$count" "$t0" "$t1" "$IDLE_SECONDS" "$idle" "$calls" "$idle_nodes" \
        "$before" "$after" <<'PY'
import json, sys
op, n, t0, t1, idle_s, idle, calls, idle_nodes, before, after = sys.argv[1:]
n, secs, idle_s = int(n), float(t1) - float(t0), float(idle_s)
idle, calls, idle_nodes = json.loads(idle), json.loads(calls), json.loads(idle_nodes)
before, after = json.loads(before), json.loads(after)
def per_op(counts, background):
    out = {}
    for name, c in sorted(counts.items()):
        bg = background.get(name, {}).get("calls", 0) * secs / idle_s
        v = max(c["calls"] - bg, 0) / n
        if v >= 0.005:
            out[name] = round(v, 2)
    return out
delta = {k: {"calls": v["calls"] - before.get(k, {}).get("calls", 0)} for k, v in after.items()}
cmds, rts = per_op(calls, idle), per_op(delta, idle_nodes)
print(json.dumps({"op": op, "ops": n, "seconds": round(secs, 1),
                  "commands_per_op": cmds, "commands_total": round(sum(cmds.values()), 2),
                  "round_trips_per_op": rts, "round_trips_total": round(sum(rts.values()), 2)}))
PY
}

if [[ "${COMMANDS:-0}" == 1 ]]; then
    IDLE_SECONDS="${IDLE_SECONDS:-5}"
    redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    first="$(node_calls)"
    sleep "$IDLE_SECONDS"
    idle="$(redis_calls)"
    idle_nodes="$(python3 -c '
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({k: {"calls": v["calls"] - a.get(k, {}).get("calls", 0)} for k, v in b.items()}))
' "$first" "$(node_calls)")"
    echo "idle two nodes, ${IDLE_SECONDS}s: $idle" >&2
    commands_per_op "lock.acquire + lock.release" $(( CLIENTS * LOCK_ITERATIONS )) \
        crossnode locks "${locks[@]}" --warmup 0
    commands_per_op "presence focus change" $(( PAIRS * ITERATIONS )) \
        crossnode presence "${fan[@]}" --warmup 0
    exit 0
fi

for run in $(seq 1 "$RUNS"); do
    measure "cursor A -> B ($PAIRS pairs)" crossnode cursor "${fan[@]}"
    measure "presence A -> B ($PAIRS pairs)" crossnode presence "${fan[@]}"
    if [[ "$PACED_RATE" != 0 ]]; then
        measure "cursor A -> B ($PAIRS pairs, $PACED_RATE/s each)" crossnode cursor "${paced[@]}"
        measure "presence A -> B ($PAIRS pairs, $PACED_RATE/s each)" crossnode presence "${paced[@]}"
    fi
    measure "locks on 2 nodes, shared room ($CLIENTS clients)" crossnode locks "${locks[@]}"
    measure "locks on 2 nodes, room per client ($CLIENTS clients)" \
        crossnode locks "${locks[@]}" --room-per-client
    measure "locks on node A only, room per client ($CLIENTS clients)" \
        locks --url "${URLS[0]}" --jwt-secret "$SECRET" --clients "$CLIENTS" \
        --iterations "$LOCK_ITERATIONS" --resources "$CLIENTS" --room-per-client
    measure "SET NX + DEL straight to redis ($CLIENTS clients)" \
        crossnode set --redis-url "$REDIS_URL" --clients "$CLIENTS" --iterations "$LOCK_ITERATIONS"
done

echo "== medians over $RUNS run(s) (µs)" >&2
jq -s -c '
  def med: sort | .[(length - 1) / 2 | floor];
  def r2: . * 100 | round / 100;
  (map(select(.measure == "cursor" and .rate_per_sender == 0))) as $cu
  | (map(select(.measure == "presence" and .rate_per_sender == 0))) as $pr
  | (map(select(.measure == "cursor" and .rate_per_sender > 0))) as $cup
  | (map(select(.measure == "presence" and .rate_per_sender > 0))) as $prp
  | (map(select(.mode == "locks" and .nodes == 2 and .shared_room))) as $ls
  | (map(select(.mode == "locks" and .nodes == 2 and (.shared_room | not)))) as $lo
  | (map(select(.mode == "locks" and .nodes == 1))) as $l1
  | (map(select(.measure == "set"))) as $s
  | {
      cursor_cross_p50: ($cu | map(.cross_node_us.p50) | med),
      cursor_cross_p99: ($cu | map(.cross_node_us.p99) | med),
      cursor_same_p50: ($cu | map(.same_node_us.p50) | med),
      cursor_same_p99: ($cu | map(.same_node_us.p99) | med),
      presence_cross_p50: ($pr | map(.cross_node_us.p50) | med),
      presence_cross_p99: ($pr | map(.cross_node_us.p99) | med),
      presence_same_p50: ($pr | map(.same_node_us.p50) | med),
      presence_same_p99: ($pr | map(.same_node_us.p99) | med),
      paced_cursor_cross_p50: ($cup | map(.cross_node_us.p50) | med),
      paced_cursor_cross_p99: ($cup | map(.cross_node_us.p99) | med),
      paced_cursor_same_p50: ($cup | map(.same_node_us.p50) | med),
      paced_cursor_same_p99: ($cup | map(.same_node_us.p99) | med),
      paced_presence_cross_p50: ($prp | map(.cross_node_us.p50) | med),
      paced_presence_cross_p99: ($prp | map(.cross_node_us.p99) | med),
      paced_presence_same_p50: ($prp | map(.same_node_us.p50) | med),
      paced_presence_same_p99: ($prp | map(.same_node_us.p99) | med),
      lock_shared_acquire_p50: ($ls | map(.acquire_us.p50) | med),
      lock_shared_acquire_p99: ($ls | map(.acquire_us.p99) | med),
      lock_shared_release_p50: ($ls | map(.release_us.p50) | med),
      lock_shared_acquires_per_s: ($ls | map(.acquires_per_s) | med),
      lock_own_acquire_p50: ($lo | map(.acquire_us.p50) | med),
      lock_own_acquire_p99: ($lo | map(.acquire_us.p99) | med),
      lock_own_release_p50: ($lo | map(.release_us.p50) | med),
      lock_own_acquires_per_s: ($lo | map(.acquires_per_s) | med),
      lock_one_node_acquire_p50: ($l1 | map(.acquire_us.p50) | med),
      lock_one_node_acquire_p99: ($l1 | map(.acquire_us.p99) | med),
      lock_one_node_acquires_per_s: ($l1 | map(.acquires_per_s) | med),
      set_nx_p50: ($s | map(.set_nx_us.p50) | med),
      set_nx_p99: ($s | map(.set_nx_us.p99) | med),
      del_p50: ($s | map(.del_us.p50) | med),
      sets_per_s: ($s | map(.sets_per_s) | med),
      errors_total: (map(.errors_total) | add),
      clients_aborted: (map(.clients_aborted) | add)
    }
  | . + {
      ratio_p50_lock_shared_over_set_nx: (.lock_shared_acquire_p50 / .set_nx_p50 | r2),
      ratio_p99_lock_shared_over_set_nx: (.lock_shared_acquire_p99 / .set_nx_p99 | r2),
      ratio_p50_lock_own_over_set_nx: (.lock_own_acquire_p50 / .set_nx_p50 | r2),
      ratio_p99_lock_own_over_set_nx: (.lock_own_acquire_p99 / .set_nx_p99 | r2),
      ratio_p50_lock_one_node_over_set_nx: (.lock_one_node_acquire_p50 / .set_nx_p50 | r2),
      ratio_p99_lock_one_node_over_set_nx: (.lock_one_node_acquire_p99 / .set_nx_p99 | r2)
    }' "$RESULTS"

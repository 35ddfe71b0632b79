#!/usr/bin/env bash
# Side by side: lockstep, Socket.IO 4 and a bare tokio-tungstenite relay, driven by the same
# Rust driver (`lockstep-load fanout`) with the same workload, one markdown table at the end.
#
#   loadtest/side-by-side.sh
#
# Workload: ROOMS rooms × MEMBERS members (one WebSocket each), every member sends a cursor
# frame RATE times a second carrying its send time; every other member of the room records the
# end-to-end latency. WARMUP seconds unmeasured, then DURATION seconds measured. With two nodes
# member i of a room connects to node i mod 2, so most deliveries cross nodes.
#
# Systems (SYSTEMS selects a subset, in this order by default):
#   relay            bare-relay (loadtest/src/bin/bare_relay.rs), one node: the floor
#   lockstep         lockstep on the private Redis, one node
#   lockstep-embedded lockstep with its in-process engines (no Redis), one node
#   socketio         Socket.IO 4 + @socket.io/redis-adapter (loadtest/socketio), one node
#   lockstep-x2      two lockstep nodes on one Redis
#   socketio-x2      two Socket.IO nodes on one Redis
# Each system gets fresh server processes and a flushed Redis. RUNS=N repeats the whole set,
# interleaved (A B C A B C), and the table shows per-column medians.
#
# Columns: deliveries/s received in the window; deliveries per server CPU-second (utime+stime
# of every server process over the window, from /proc/PID/stat, children excluded); latency
# p50 / p99 / max; server RSS at the end of the window, per node; Redis CPU-seconds over the
# window; the driver's own CPU-seconds; errors (connect, join, socket) and the share of
# expected deliveries that arrived (lockstep coalesces a receiver's pending cursors, latest
# wins, when its writer falls behind).
#
# Environment: ROOMS (100), MEMBERS (20), RATE (2), WARMUP (5), DURATION (20), RUNS (1),
# SYSTEMS, SKIP_BUILD=1 (use the binaries already built), LOCKSTEP_BIN=path (another gateway
# binary; the gateway is then not built), BENCH_TMPDIR=dir, BENCH_OUT=dir (keep every JSON
# result there), REDIS_SERVER (redis-server), NODE (node). lockstep's own settings pass through
# from the environment (e.g. LOCKSTEP_MESSAGES_PER_SECOND for RATE above ~90, its default budget
# being 100 messages/s per session). Results: docs/benchmarks.md, "Side by side".
# Needs: redis-server, redis-cli, node 20 + npm, jq, curl, python3.

source "$(dirname "$0")/lib.sh"

ROOMS="${ROOMS:-100}"
MEMBERS="${MEMBERS:-20}"
RATE="${RATE:-2}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-20}"
RUNS="${RUNS:-1}"
SYSTEMS="${SYSTEMS:-relay lockstep lockstep-embedded socketio lockstep-x2 socketio-x2}"
NODE="${NODE:-node}"
RELAY_BIN="$LOAD_TARGET/release/bare-relay"
SOCKETIO_DIR="$ROOT/loadtest/socketio"

WORK=""
REDIS_PID=""
DRIVER_PID=""
PIDS=()    # the servers of the system being measured
URLS=()

stop_servers() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        stop_pid "$p"
    done
    PIDS=()
    URLS=()
}

cleanup() {
    [[ -n "$DRIVER_PID" ]] && kill "$DRIVER_PID" 2>/dev/null
    stop_servers
    stop_pid "$REDIS_PID"
    REDIS_PID=""
    [[ -n "$WORK" ]] && rm -rf "$WORK"
    WORK=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in jq curl redis-cli "${REDIS_SERVER:-redis-server}"; do
    command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
case " $SYSTEMS " in
*" socketio"*) command -v "$NODE" >/dev/null || { echo "node is needed for socketio" >&2; exit 1; } ;;
esac

# Build: the gateway unless LOCKSTEP_BIN points at another binary; the load tool (both its
# binaries); the Socket.IO peer's modules when missing or older than its lock file.
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    if [[ -z "${LOCKSTEP_BIN:-}" && " $SYSTEMS " == *" lockstep"* ]]; then
        echo "building the gateway (cargo build --release in $ROOT)" >&2
        (cd "$ROOT" && cargo build --release --quiet)
    fi
    echo "building the load tool and bare-relay" >&2
    (cd "$ROOT/loadtest" && CARGO_TARGET_DIR="$LOAD_TARGET" cargo build --release --quiet)
fi
[[ -x "$LOAD" && -x "$RELAY_BIN" ]] || { echo "missing $LOAD or $RELAY_BIN (build loadtest)" >&2; exit 1; }
case " $SYSTEMS " in
*" lockstep"*) [[ -x "$SERVER_BIN" ]] || { echo "missing gateway binary $SERVER_BIN" >&2; exit 1; } ;;
esac
case " $SYSTEMS " in
*" socketio"*)
    if [[ ! -f "$SOCKETIO_DIR/node_modules/.package-lock.json" ||
          "$SOCKETIO_DIR/package-lock.json" -nt "$SOCKETIO_DIR/node_modules/.package-lock.json" ]]; then
        echo "npm ci in $SOCKETIO_DIR" >&2
        (cd "$SOCKETIO_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
    fi
    ;;
esac

WORK="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-sbs.XXXXXX)"
OUT="${BENCH_OUT:-$WORK}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
ulimit -n "$(ulimit -Hn)"
start_redis "$WORK"
SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"

# start_lockstep N REDIS(yes|no): N gateway nodes.
start_lockstep() {
    local n="$1" redis="$2" i port
    for i in $(seq 1 "$n"); do
        port="$(free_port)"
        local extra=()
        [[ "$redis" == yes ]] && extra+=(LOCKSTEP_REDIS_URL="$REDIS_URL")
        env LOCKSTEP_LISTEN="127.0.0.1:$port" \
            LOCKSTEP_NODE_ID="sbs-$i" \
            LOCKSTEP_JWT_SECRET="$SECRET" \
            LOCKSTEP_DATA_DIR="$WORK/lockstep-$i" \
            RUST_LOG="${RUST_LOG:-warn}" \
            "${extra[@]}" \
            "$SERVER_BIN" >"$WORK/lockstep-$i.log" 2>&1 &
        PIDS+=($!)
        URLS+=("http://127.0.0.1:$port")
        wait_ready "$!" "$WORK/lockstep-$i.log" curl -fsS "http://127.0.0.1:$port/readyz"
    done
}

# start_socketio N: N Socket.IO nodes on the private Redis.
start_socketio() {
    local n="$1" i port
    for i in $(seq 1 "$n"); do
        port="$(free_port)"
        (cd "$SOCKETIO_DIR" && PORT="$port" REDIS_URL="$REDIS_URL" exec "$NODE" server.js) \
            >"$WORK/socketio-$i.log" 2>&1 &
        PIDS+=($!)
        URLS+=("http://127.0.0.1:$port")
        wait_ready "$!" "$WORK/socketio-$i.log" curl -fsS "http://127.0.0.1:$port/healthz"
    done
}

start_relay() {
    local port
    port="$(free_port)"
    "$RELAY_BIN" "127.0.0.1:$port" >"$WORK/relay.log" 2>&1 &
    PIDS+=($!)
    URLS+=("http://127.0.0.1:$port")
    wait_ready "$!" "$WORK/relay.log" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
}

# measure SYSTEM: starts its servers, runs the driver, appends the result, stops them.
measure() {
    local sys="$1" target nodes redis
    case "$sys" in
    relay) target=relay nodes=1 redis=no ;;
    lockstep) target=lockstep nodes=1 redis=yes ;;
    lockstep-embedded) target=lockstep nodes=1 redis=no ;;
    socketio) target=socketio nodes=1 redis=yes ;;
    lockstep-x2) target=lockstep nodes=2 redis=yes ;;
    socketio-x2) target=socketio nodes=2 redis=yes ;;
    *) echo "unknown system $sys (see SYSTEMS in $0)" >&2; return 1 ;;
    esac
    echo "== run $run/$RUNS: $sys" >&2
    redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
    case "$target" in
    relay) start_relay ;;
    lockstep) start_lockstep "$nodes" "$redis" ;;
    socketio) start_socketio "$nodes" ;;
    esac
    local args=(fanout --target "$target" --rooms "$ROOMS" --members "$MEMBERS" --rate "$RATE"
        --warmup-secs "$WARMUP" --duration-secs "$DURATION" --jwt-secret "$SECRET")
    local i
    for i in "${!PIDS[@]}"; do
        args+=(--url "${URLS[$i]}" --server-pid "${PIDS[$i]}")
    done
    [[ "$redis" == yes ]] && args+=(--redis-pid "$REDIS_PID")
    local out
    # In the background and waited for, so that a TERM or ^C runs the trap at once.
    "$LOAD" "${args[@]}" >"$WORK/driver.json" &
    DRIVER_PID=$!
    wait "$DRIVER_PID"
    DRIVER_PID=""
    out="$(cat "$WORK/driver.json")"
    jq -c --arg s "$sys" --argjson run "$run" '. + {system: $s, run: $run}' <<<"$out" >>"$RESULTS"
    jq -c '{deliveries_per_s, deliveries_per_server_cpu_s, latency_us: (.latency_us | {p50, p99, max}), server_rss_kb, errors}' <<<"$out" >&2
    stop_servers
}

started="$(date -u +%FT%TZ)"
for run in $(seq 1 "$RUNS"); do
    for sys in $SYSTEMS; do
        measure "$sys"
    done
done

# The table: medians over the runs of each system.
echo
echo "side-by-side, $started, $(nproc) cores: $ROOMS rooms × $MEMBERS members, $RATE Hz each," \
    "${WARMUP}s warm-up, ${DURATION}s measured, RUNS=$RUNS (medians)"
echo
echo "| system | nodes | deliveries/s | deliveries per server CPU-s | p50 / p99 / max latency (ms) | server RSS per node (MB) | Redis CPU (s) | driver CPU (s) | errors | delivered |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for sys in $SYSTEMS; do
    jq -rs --arg s "$sys" '
        def med(f): map(f) | sort | .[(length - 1) / 2 | floor];
        def ms: . / 1000 | . * 10 | round / 10;
        def title: {
            "relay": "bare relay (tokio-tungstenite)",
            "lockstep": "lockstep + Redis",
            "lockstep-embedded": "lockstep embedded (no Redis)",
            "socketio": "Socket.IO 4 + redis-adapter",
            "lockstep-x2": "lockstep + Redis",
            "socketio-x2": "Socket.IO 4 + redis-adapter"
        }[.] // .;
        map(select(.system == $s)) as $r
        | if ($r | length) == 0 then empty else
          "| \($s | title) | \($r[0].nodes)"
          + " | \($r | med(.deliveries_per_s) | round)"
          + " | \($r | med(.deliveries_per_server_cpu_s // 0) | round)"
          + " | \($r | med(.latency_us.p50 // 0) | ms) / \($r | med(.latency_us.p99 // 0) | ms) / \($r | med(.latency_us.max // 0) | ms)"
          + " | \([range(0; $r[0].nodes) as $i | $r | med(.server_rss_kb[$i] // 0) / 1024 | round] | map(tostring) | join(" / "))"
          + " | \(if $r[0].redis_cpu_s == null then "–" else ($r | med(.redis_cpu_s) | . * 10 | round / 10) end)"
          + " | \($r | med(.driver_cpu_s) | . * 10 | round / 10)"
          + " | \($r | med(.errors_total))"
          + " | \($r | med(.delivery_ratio) * 100 | . * 10 | round / 10) % |"
          end' "$RESULTS"
done
if [[ -n "${BENCH_OUT:-}" ]]; then
    echo
    echo "(every result: $RESULTS)"
fi

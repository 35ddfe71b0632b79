# Shared by the benchmark scripts: build, start a throwaway gateway on a free loopback port,
# and always stop it again. Source it; do not run it.
#
# Sets ROOT, LOAD (the load tool), SERVER_PID, SERVER_URL, SERVER_LOG.
# Environment: SKIP_BUILD=1, LOCKSTEP_BIN=path, BENCH_TMPDIR=dir (for the data dir), RUST_LOG.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOAD_TARGET="${CARGO_TARGET_DIR_LOAD:-$ROOT/loadtest/target}"
LOAD="$LOAD_TARGET/release/lockstep-load"
# LOCKSTEP_BIN pins a gateway binary (e.g. a copy, while src/ is being edited).
SERVER_BIN="${LOCKSTEP_BIN:-$ROOT/target/release/lockstep}"
SERVER_PID=""
SERVER_DIR=""

# Builds the gateway and the load tool; SKIP_BUILD=1 uses the binaries already built.
build_all() {
    if [[ "${SKIP_BUILD:-0}" == 1 ]]; then
        [[ -x "$SERVER_BIN" && -x "$LOAD" ]] || { echo "SKIP_BUILD=1 but binaries are missing" >&2; return 1; }
        return 0
    fi
    echo "building the gateway (cargo build --release in $ROOT)" >&2
    (cd "$ROOT" && cargo build --release --quiet)
    echo "building the load tool" >&2
    (cd "$ROOT/loadtest" && CARGO_TARGET_DIR="$LOAD_TARGET" cargo build --release --quiet)
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server [ENV=VALUE ...]: starts the release binary directly (not `cargo run`, so that
# SERVER_PID is the gateway's own pid) with a temp data dir, and waits for /readyz.
start_server() {
    local port
    port="$(free_port)"
    # BENCH_TMPDIR=/dev/shm puts the audit file on tmpfs (fsync nearly free).
    SERVER_DIR="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-bench.XXXXXX)"
    SERVER_LOG="$SERVER_DIR/server.log"
    SERVER_URL="http://127.0.0.1:$port"
    # Sockets are files: give the gateway the whole hard limit.
    ulimit -n "$(ulimit -Hn)"
    env LOCKSTEP_LISTEN="127.0.0.1:$port" \
        LOCKSTEP_DATA_DIR="$SERVER_DIR/data" \
        RUST_LOG="${RUST_LOG:-warn}" \
        "$@" \
        "$SERVER_BIN" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        if curl -fsS "$SERVER_URL/readyz" >/dev/null 2>&1; then
            echo "gateway pid $SERVER_PID on $SERVER_URL" >&2
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "gateway exited during start-up:" >&2
            cat "$SERVER_LOG" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "gateway not ready after 10s:" >&2
    tail -50 "$SERVER_LOG" >&2
    return 1
}

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        # The drain closes sessions politely; do not wait for ever.
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
    if [[ -n "$SERVER_DIR" ]]; then
        rm -rf "$SERVER_DIR"
        SERVER_DIR=""
    fi
}

trap stop_server EXIT
trap 'exit 130' INT TERM

# median FILE JQ_PATH: the median of a numeric field over the JSON objects in FILE.
median() {
    jq -s "map($2) | sort | .[(length - 1) / 2 | floor]" "$1"
}

# --- shared by side-by-side.sh (and any script that runs several servers) ---

# start_redis DIR: a private redis-server on a free loopback port, no persistence, its log in
# DIR; sets REDIS_PID, REDIS_PORT, REDIS_URL. Stop it with stop_pid "$REDIS_PID".
start_redis() {
    local dir="$1"
    REDIS_PORT="$(free_port)"
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
    "${REDIS_SERVER:-redis-server}" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
        --appendonly no --dir "$dir" --logfile "$dir/redis.log" &
    REDIS_PID=$!
    for _ in $(seq 1 50); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || {
        echo "redis did not start:" >&2
        cat "$dir/redis.log" >&2
        return 1
    }
    echo "redis pid $REDIS_PID on $REDIS_URL" >&2
}

# stop_pid PID: SIGTERM, up to 10 s for a drain, then SIGKILL; quiet if it is gone already.
stop_pid() {
    local pid="$1"
    [[ -n "$pid" ]] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# wait_ready PID LOG PROBE...: runs PROBE (a command) every 0.1 s for up to 10 s until it
# succeeds; fails early, showing LOG, if PID exits.
wait_ready() {
    local pid="$1" log="$2"
    shift 2
    for _ in $(seq 1 100); do
        "$@" >/dev/null 2>&1 && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "pid $pid exited during start-up:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "pid $pid not ready after 10s:" >&2
    tail -50 "$log" >&2
    return 1
}

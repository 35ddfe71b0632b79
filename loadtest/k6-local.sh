#!/usr/bin/env bash
# The k6 studio scenario (loadtest/k6/studio.js) against a throwaway local cluster.
#
#   loadtest/k6-local.sh                         # 3 nodes, 150 VUs, 60 s
#   loadtest/k6-local.sh --smoke                 # CI: 3 nodes, 30 VUs, 15 s (about 25 s in all)
#   loadtest/k6-local.sh --vus 300 --duration 2m --nodes 3
#   loadtest/k6-local.sh --drain-after 20        # SIGTERM node 1 20 s into the run
#   loadtest/k6-local.sh -- --out json=run.json  # anything after -- goes to `k6 run`
#
# Starts a private redis-server (free loopback port, no persistence) and N release-build nodes
# on it (free ports, one random HS256 secret, temp data dirs), runs k6 with the node URLs and
# the secret, prints k6's summary, removes everything on exit, error or ^C (trap), and exits
# with k6's code: 0 = every threshold held, 99 = a threshold was crossed, other = k6 failed.
#
# Environment: SKIP_BUILD=1 (use target/release/lockstep as built), LOCKSTEP_BIN=path (a pinned
# gateway binary), LOCKSTEP_K6=path (a k6 binary; else scripts/ensure-k6.sh finds or installs
# one), SUMMARY_JSON=path (also write k6's end-of-test summary as JSON there), KEEP_LOGS=1
# (print the nodes' logs dir and keep it), and any studio.js knob (CURSOR_HZ, EDITOR_PERCENT,
# SCENES, SEGMENTS, P99_LOCK_MS, P99_PRESENCE_MS, P50_LOCK_MS, P50_PRESENCE_MS, RAMP_SECONDS)
# is passed on to k6.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES=3
VUS=150
DURATION=60s
DRAIN_AFTER=""
K6_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) VUS=30; DURATION=15s; shift ;;
        --vus) VUS="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --nodes) NODES="$2"; shift 2 ;;
        --drain-after) DRAIN_AFTER="$2"; shift 2 ;;
        --) shift; K6_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

SERVER_BIN="${LOCKSTEP_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/lockstep}"
WORK=""
REDIS_PID=""
NODE_PIDS=()
DRAIN_PID=""
K6_PID=""

cleanup() {
    local p
    [[ -n "$DRAIN_PID" ]] && kill "$DRAIN_PID" 2>/dev/null || true
    [[ -n "$K6_PID" ]] && kill "$K6_PID" 2>/dev/null || true
    for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${NODE_PIDS[@]}"; do
        # A node drains its sessions before it exits; do not wait for ever.
        for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    if [[ -n "$REDIS_PID" ]]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    if [[ -n "$WORK" ]]; then
        if [[ "${KEEP_LOGS:-0}" == 1 ]]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install -y redis-server)" >&2; exit 1; }
K6="$("$ROOT/scripts/ensure-k6.sh")"
if [[ "${SKIP_BUILD:-0}" != 1 && -z "${LOCKSTEP_BIN:-}" ]]; then
    echo "building the gateway (cargo build --release)" >&2
    (cd "$ROOT" && cargo build --release --quiet)
fi
[[ -x "$SERVER_BIN" ]] || { echo "no gateway binary at $SERVER_BIN" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lockstep-k6.XXXXXX")"
# Every VU is a socket on the node and one in k6.
ulimit -n "$(ulimit -Hn)"

REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "redis did not start" >&2; cat "$WORK/redis.log" >&2; exit 1; }

SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
URLS=()
for i in $(seq 1 "$NODES"); do
    port="$(free_port)"
    env LOCKSTEP_LISTEN="127.0.0.1:$port" \
        LOCKSTEP_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        LOCKSTEP_NODE_ID="k6-node-$i" \
        LOCKSTEP_JWT_SECRET="$SECRET" \
        LOCKSTEP_ADMIN_TOKEN="k6-local-admin-$SECRET" \
        LOCKSTEP_DATA_DIR="$WORK/node-$i" \
        RUST_LOG="${RUST_LOG:-warn}" \
        "$SERVER_BIN" >"$WORK/node-$i.log" 2>&1 &
    NODE_PIDS+=($!)
    URLS+=("http://127.0.0.1:$port")
done
for i in $(seq 0 $((NODES - 1))); do
    for _ in $(seq 1 100); do
        curl -fsS "${URLS[$i]}/readyz" >/dev/null 2>&1 && break
        kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || { echo "node $((i + 1)) exited:" >&2; cat "$WORK/node-$((i + 1)).log" >&2; exit 1; }
        sleep 0.1
    done
    curl -fsS "${URLS[$i]}/readyz" >/dev/null || { echo "node $((i + 1)) not ready after 10 s" >&2; exit 1; }
    echo "node $((i + 1)): pid ${NODE_PIDS[$i]} on ${URLS[$i]}" >&2
done
echo "redis: pid $REDIS_PID on 127.0.0.1:$REDIS_PORT; k6: $K6" >&2

if [[ -n "$DRAIN_AFTER" ]]; then
    (sleep "$DRAIN_AFTER"; echo "== SIGTERM node 1 (pid ${NODE_PIDS[0]})" >&2; kill -TERM "${NODE_PIDS[0]}") &
    DRAIN_PID=$!
fi

k6_env=(-e "LOCKSTEP_URLS=$(IFS=,; echo "${URLS[*]}")" -e "LOCKSTEP_JWT_SECRET=$SECRET"
        -e "VUS=$VUS" -e "DURATION=$DURATION")
for knob in CURSOR_HZ EDITOR_PERCENT SCENES SEGMENTS P99_LOCK_MS P99_PRESENCE_MS P50_LOCK_MS P50_PRESENCE_MS RAMP_SECONDS LOG_ERRORS; do
    [[ -n "${!knob:-}" ]] && k6_env+=(-e "$knob=${!knob}")
done
[[ -n "${SUMMARY_JSON:-}" ]] && K6_ARGS+=(--summary-export "$SUMMARY_JSON")

echo "== k6 run studio.js: $VUS VUs, $DURATION, $NODES nodes" >&2
# Where the CPU went (user + system seconds, from /proc; k6's sampled every 0.5 s while it runs).
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat" 2>/dev/null; }
"$K6" run --no-usage-report "${k6_env[@]}" "${K6_ARGS[@]}" "$ROOT/loadtest/k6/studio.js" &
K6_PID=$!
k6_cpu="?"
while kill -0 "$K6_PID" 2>/dev/null; do
    k6_cpu="$(cpu_of "$K6_PID" || echo "$k6_cpu")"
    sleep 0.5
done
set +e
wait "$K6_PID"
code=$?
set -e
K6_PID=""
cpu_line="cpu seconds: k6 ~$k6_cpu, redis $(cpu_of "$REDIS_PID")"
for i in $(seq 1 "$NODES"); do
    cpu_line+=", node-$i $(cpu_of "${NODE_PIDS[$((i - 1))]}" || echo "exited")"
done
echo "$cpu_line" >&2
for i in $(seq 1 "$NODES"); do
    n="$(grep -c -E ' (ERROR|WARN) ' "$WORK/node-$i.log" || true)"
    [[ "$n" != 0 ]] && echo "node $i logged $n warnings/errors (KEEP_LOGS=1 keeps $WORK)" >&2
done
echo "== k6 exit code $code (0 = thresholds held, 99 = a threshold crossed)" >&2
exit "$code"

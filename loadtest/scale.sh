#!/usr/bin/env bash
# The studio workload on two gateway nodes sharing one private Redis (issue 9, goal 5).
#
#   loadtest/scale.sh [ROOMS] [DURATION_S]        (defaults 1000 rooms × 20 members, 60 s)
#
# Starts a private redis-server (free loopback port, no persistence), two gateway nodes on it
# (free ports, one shared HS256 secret, temp data dirs, JSON-lines audit) and DRIVERS driver
# processes (`lockstep-load scale`, default 2): driver d drives rooms [d*R/D, (d+1)*R/D) (the
# last one also the remainder), and
# member m of every room connects to node m mod 2, so each room is split over both nodes and
# every process holds fewer than 20,000 sockets (the open-files hard limit here). Connections
# ramp up at CONNECT_RATE per second in total; once every driver has joined its rooms the
# workload warms up WARMUP_S, then the window of DURATION_S is measured: CPU (utime + stime
# from /proc) of each node, Redis and the drivers over exactly that window, RSS at its end,
# and Redis's INFO commandstats reset at its start. The drivers' results are merged with
# `lockstep-load scale-merge`. Progress goes to stderr; stdout gets one markdown table.
#
# The workload per room of MEMBERS (20): CURSOR_SENDERS (4, a fifth) send cursors at CURSOR_HZ
# (2); every member changes its focus every PRESENCE_EVERY_S (10); EDITORS (5, a quarter) take
# a lock every LOCK_EVERY_S (30) on one of LOCK_RESOURCES (8) resources of their room, never
# waiting, hold it LOCK_HOLD_MS (2000) and release it (asking ttl_ms LOCK_TTL_MS, 15000).
#
# The gateways run with their defaults: nothing in them refuses this load (one user per
# connection, one room per session, ≤ 2.1 messages/s per session against a budget of 100,
# 20 members against a cap of 500, /v1/ws outside the HTTP budget, tokens signed here).
#
# A size that does not fit still ends in a table: a driver stops its ramp after RAMP_TIMEOUT_S
# (default 120) or once more than 5 % of its joins failed, and the rest count as errors.
#
# Environment: LOCKSTEP_BIN=path (default: build the release binary), SKIP_BUILD=1, DRIVERS,
# CONNECT_RATE (default 500/s), WARMUP_S (default 10), RAMP_TIMEOUT_S, the workload knobs above,
# SCALE_JSON=file (also write the merged result with the server-side figures there),
# BENCH_TMPDIR=dir, REDIS_SERVER, NODE_ENV="K=V …" (extra gateway settings).

source "$(dirname "$0")/lib.sh"

ROOMS="${1:-1000}"
DURATION_S="${2:-60}"
MEMBERS="${MEMBERS:-20}"
DRIVERS="${DRIVERS:-2}"
CONNECT_RATE="${CONNECT_RATE:-500}"
WARMUP_S="${WARMUP_S:-10}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
WORKLOAD=(
    --members "$MEMBERS"
    --cursor-senders "${CURSOR_SENDERS:-4}"
    --cursor-hz "${CURSOR_HZ:-2}"
    --presence-every-s "${PRESENCE_EVERY_S:-10}"
    --editors "${EDITORS:-5}"
    --lock-every-s "${LOCK_EVERY_S:-30}"
    --lock-hold-ms "${LOCK_HOLD_MS:-2000}"
    --lock-resources "${LOCK_RESOURCES:-8}"
    --lock-ttl-ms "${LOCK_TTL_MS:-15000}"
)

WORK=""
REDIS_PID=""
NODE_PIDS=()
DRIVER_PIDS=()

cleanup() {
    local p
    for p in "${DRIVER_PIDS[@]}" "${NODE_PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${DRIVER_PIDS[@]}" "${NODE_PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    DRIVER_PIDS=()
    NODE_PIDS=()
    if [[ -n "$REDIS_PID" ]]; then
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
        REDIS_PID=""
    fi
    [[ -n "$WORK" ]] && rm -rf "$WORK"
    WORK=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v "$REDIS_SERVER" >/dev/null || {
    echo "redis-server is needed (apt-get install -y redis-server)" >&2
    exit 1
}
(( ROOMS >= DRIVERS )) || { echo "ROOMS ($ROOMS) must be at least DRIVERS ($DRIVERS)" >&2; exit 1; }
(( (ROOMS / DRIVERS + 1) * MEMBERS < 19900 )) || {
    echo "$(( (ROOMS / DRIVERS + 1) * MEMBERS )) connections per driver process: raise DRIVERS" >&2
    exit 1
}

# The gateway is built only when no LOCKSTEP_BIN is given; the load tool always (unless
# SKIP_BUILD=1).
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    if [[ -z "${LOCKSTEP_BIN:-}" ]]; then
        echo "building the gateway (cargo build --release in $ROOT)" >&2
        (cd "$ROOT" && cargo build --release --quiet)
    fi
    echo "building the load tool" >&2
    (cd "$ROOT/loadtest" && CARGO_TARGET_DIR="$LOAD_TARGET" cargo build --release --quiet)
fi
[[ -x "$SERVER_BIN" && -x "$LOAD" ]] || { echo "missing $SERVER_BIN or $LOAD" >&2; exit 1; }

WORK="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-scale.XXXXXX)"
ulimit -n "$(ulimit -Hn)"

start_redis "$WORK" || exit 1

SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
URLS=()
for node in a b; do
    port="$(free_port)"
    # shellcheck disable=SC2086 # NODE_ENV is a list of K=V words
    env LOCKSTEP_LISTEN="127.0.0.1:$port" \
        LOCKSTEP_REDIS_URL="$REDIS_URL" \
        LOCKSTEP_NODE_ID="scale-$node" \
        LOCKSTEP_JWT_SECRET="$SECRET" \
        LOCKSTEP_DATA_DIR="$WORK/node-$node" \
        RUST_LOG="${RUST_LOG:-warn}" \
        ${NODE_ENV:-} \
        "$SERVER_BIN" >"$WORK/node-$node.log" 2>&1 &
    NODE_PIDS+=($!)
    URLS+=("http://127.0.0.1:$port")
done
for i in 0 1; do
    for _ in $(seq 1 100); do
        curl -fsS "${URLS[$i]}/readyz" >/dev/null 2>&1 && break
        kill -0 "${NODE_PIDS[$i]}" 2>/dev/null || { echo "node $i exited during start-up" >&2; cat "$WORK"/node-*.log >&2; exit 1; }
        sleep 0.1
    done
    curl -fsS "${URLS[$i]}/readyz" >/dev/null || { echo "node $i not ready after 10s" >&2; exit 1; }
    echo "node $i pid ${NODE_PIDS[$i]} on ${URLS[$i]}" >&2
done

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# Baseline RSS of each node before any client: per-connection memory is counted above it.
RSS_BASE=("$(rss_kb "${NODE_PIDS[0]}")" "$(rss_kb "${NODE_PIDS[1]}")")

PER=$(( ROOMS / DRIVERS ))
RATE=$(python3 -c "print($CONNECT_RATE / $DRIVERS)")
echo "ramping up $(( ROOMS * MEMBERS )) connections ($ROOMS rooms × $MEMBERS) from $DRIVERS driver processes at $CONNECT_RATE/s" >&2
for d in $(seq 0 $(( DRIVERS - 1 ))); do
    # The last driver also takes the rooms left over by the division.
    mine=$PER
    (( d == DRIVERS - 1 )) && mine=$(( ROOMS - PER * (DRIVERS - 1) ))
    "$LOAD" scale --url "${URLS[0]}" --url "${URLS[1]}" --jwt-secret "$SECRET" \
        --rooms "$mine" --first-room $(( d * PER )) "${WORKLOAD[@]}" \
        --connect-rate "$RATE" --ramp-timeout-s "${RAMP_TIMEOUT_S:-120}" \
        --ready-file "$WORK/ready.$d" --go-file "$WORK/go" --stop-file "$WORK/stop" \
        --out "$WORK/driver.$d.json" >"$WORK/driver.$d.stdout" 2>"$WORK/driver.$d.log" &
    DRIVER_PIDS+=($!)
done

# Waits for every driver's ready file (its ramp is over); a driver that exits fails the run.
RAMP_START=$SECONDS
while :; do
    ready=0
    for d in $(seq 0 $(( DRIVERS - 1 ))); do
        [[ -e "$WORK/ready.$d" ]] && ready=$(( ready + 1 ))
        if ! kill -0 "${DRIVER_PIDS[$d]}" 2>/dev/null; then
            echo "driver $d exited during the ramp:" >&2
            tail -20 "$WORK/driver.$d.log" >&2
            exit 1
        fi
    done
    (( ready == DRIVERS )) && break
    if (( (SECONDS - RAMP_START) % 10 == 0 )); then
        tail -qn1 "$WORK"/driver.*.log >&2 2>/dev/null || true
        sleep 1
    fi
    sleep 0.2
done
grep -h "joined in" "$WORK"/driver.*.log >&2 || true
echo "warm-up ${WARMUP_S}s, then measuring ${DURATION_S}s" >&2
sleep "$WARMUP_S"

# utime + stime of a pid, in clock ticks (fields 14 and 15 of /proc/PID/stat; the command
# name in field 2 has no spaces here).
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
PIDS=("${NODE_PIDS[@]}" "$REDIS_PID" "${DRIVER_PIDS[@]}")

redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
declare -A T0
for p in "${PIDS[@]}"; do T0[$p]="$(ticks "$p")"; done
LOAD0="$(cut -d' ' -f1 /proc/loadavg)"
touch "$WORK/go"
START_NS=$(date +%s%N)
sleep "$DURATION_S"
touch "$WORK/stop"
END_NS=$(date +%s%N)
declare -A T1 RSS
for p in "${PIDS[@]}"; do
    T1[$p]="$(ticks "$p" 2>/dev/null || echo 0)"
    # A driver may already be a zombie (it stops as soon as the stop file appears): its
    # status has no VmRSS line, and awk then prints nothing.
    RSS[$p]="$(rss_kb "$p" 2>/dev/null || true)"
    RSS[$p]="${RSS[$p]:-0}"
done
LOAD1="$(cut -d' ' -f1 /proc/loadavg)"
redis-cli -p "$REDIS_PORT" INFO commandstats >"$WORK/commandstats.txt"
redis-cli -p "$REDIS_PORT" INFO memory >"$WORK/redis-memory.txt"
echo "window over; waiting for the drivers to wind down" >&2

for d in $(seq 0 $(( DRIVERS - 1 ))); do
    if ! wait "${DRIVER_PIDS[$d]}"; then
        echo "driver $d failed:" >&2
        tail -20 "$WORK/driver.$d.log" >&2
        exit 1
    fi
done
DRIVER_PIDS=()
# What the drivers said besides progress (failed joins are one line each: show a few).
grep -hv "ramp\|joined in\|open-files" "$WORK"/driver.*.log | head -20 >&2 || true
"$LOAD" scale-merge "$WORK"/driver.*.json >"$WORK/merged.json"

HZ="$(getconf CLK_TCK)"
server_json="$(
    for i in 0 1; do
        p="${NODE_PIDS[$i]}"
        echo "node ${RSS_BASE[$i]} $(( T1[$p] - T0[$p] )) ${RSS[$p]}"
    done
    echo "redis 0 $(( T1[$REDIS_PID] - T0[$REDIS_PID] )) ${RSS[$REDIS_PID]}"
    for p in "${PIDS[@]:3}"; do echo "driver 0 $(( T1[$p] - T0[$p] )) ${RSS[$p]}"; done
)"

python3 - "$WORK/merged.json" "$WORK/commandstats.txt" "$HZ" "$START_NS" "$END_NS" \
    "$LOAD0" "$LOAD1" "$(nproc)" "${SCALE_JSON:-}" "$ROOMS" "$MEMBERS" "$DRIVERS" <<PY
import json, sys
merged_f, cmd_f, hz, t0, t1, load0, load1, cores, out_f, rooms, members, drivers = sys.argv[1:]
m = json.load(open(merged_f))
hz = int(hz)
window = (int(t1) - int(t0)) / 1e9
procs = [l.split() for l in """$server_json""".strip().splitlines()]
nodes = [(int(t) / hz, int(r), int(b)) for k, b, t, r in procs if k == "node"]
redis = [(int(t) / hz, int(r)) for k, _, t, r in procs if k == "redis"][0]
drivers_cpu = sum(int(t) / hz for k, _, t, r in procs if k == "driver")
cmds = {}
for line in open(cmd_f):
    line = line.strip()
    if line.startswith("cmdstat_"):
        name, _, rest = line[len("cmdstat_"):].partition(":")
        f = dict(kv.split("=", 1) for kv in rest.split(","))
        if name in ("config", "info"):
            continue
        cmds[name] = {"calls": int(f["calls"]), "usec": int(f["usec"])}
total_calls = sum(c["calls"] for c in cmds.values())
m["server"] = {
    "window_s": round(window, 3),
    "nodes": [{"cpu_s": round(c, 2), "cores": round(c / window, 3), "rss_kb": r, "rss_before_clients_kb": b} for c, r, b in nodes],
    "redis": {"cpu_s": round(redis[0], 2), "cores": round(redis[0] / window, 3), "rss_kb": redis[1]},
    "drivers_cpu_s": round(drivers_cpu, 2),
    "redis_commandstats": cmds,
    "redis_commands_per_s": round(total_calls / window, 1),
    "loadavg_start_end": [float(load0), float(load1)],
    "cores": int(cores),
}
if out_f:
    json.dump(m, open(out_f, "w"), indent=1)

lat = m["latency_us"]
def ms(h, q):
    v = lat[h].get(q)
    return "–" if v is None else f"{v / 1000:.1f}"
def p(h):
    return f"{ms(h, 'p50')} / {ms(h, 'p99')} / {ms(h, 'max')}"
def ok(cond):
    return "yes" if cond else "**no**"
def p99(h):
    return lat[h].get("p99", 10**12) / 1000
pres = [lat["presence_cross_node"].get("p99", 0), lat["presence_same_node"].get("p99", 0)]
per_s = m["per_s"]
conns = m["connections"]
rows = [
    ("connections (joined / planned)", f"{conns:,} / {m['connections_planned']:,} ({rooms} rooms × {members}, 2 nodes, {drivers} driver processes)", "20,000", ok(conns >= 20000 and conns == m["connections_planned"])),
    ("ramp", f"{m['ramp_s']:.0f} s", "", ""),
    ("measured window", f"{window:.0f} s (load average {load0} → {load1} on {cores} cores)", "", ""),
    ("cursor deliveries/s (sent/s)", f"{per_s['cursor_deliveries']:,.0f} ({per_s['cursors_sent']:,.0f})", "", ""),
    ("presence deliveries/s (sent/s)", f"{per_s['presence_deliveries']:,.0f} ({per_s['presence_sent']:,.0f})", "", ""),
    ("lock acquires/s (lock_held answers)", f"{per_s['lock_acquires']:,.1f} ({m['counts']['lock_held']})", "", ""),
    ("cursor cross-node p50 / p99 / max (ms)", p("cursor_cross_node"), "p99 ≤ 10", ok(p99("cursor_cross_node") <= 10)),
    ("cursor same-node p50 / p99 / max (ms)", p("cursor_same_node"), "", ""),
    ("presence cross-node p50 / p99 / max (ms)", p("presence_cross_node"), "p99 ≤ 50", ok(max(pres) / 1000 <= 50)),
    ("presence same-node p50 / p99 / max (ms)", p("presence_same_node"), "p99 ≤ 50", ok(max(pres) / 1000 <= 50)),
    ("lock acquire p50 / p99 / max (ms)", p("lock_acquire"), "p99 ≤ 100", ok(p99("lock_acquire") <= 100)),
    ("lock release p50 / p99 / max (ms)", p("lock_release"), "", ""),
    ("errors", f"{m['errors_total']} {json.dumps(m['errors']) if m['errors'] else ''}".strip(), "0", ok(m["errors_total"] == 0)),
    ("lost locks", f"{m['lost_locks_total']} {json.dumps(m['lost_locks']) if m['lost_locks'] else ''}".strip(), "0", ok(m["lost_locks_total"] == 0)),
]
for i, (c, r, b) in enumerate(nodes):
    per = (r - b) * 1024 / max(conns / 2, 1) / 1000
    rows.append((f"node {'AB'[i]} CPU (cores) / RSS", f"{c / window:.2f} / {r / 1024:.0f} MB ({per:.1f} KB per connection above the {b / 1024:.0f} MB before clients)", "", ""))
rows.append(("Redis CPU (cores) / commands/s", f"{redis[0] / window:.2f} / {total_calls / window:,.0f}", "", ""))
rows.append(("driver CPU (cores, all processes)", f"{drivers_cpu / window:.2f}", "", ""))
print("| scale run | measured | target | met |")
print("|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
PY

#!/usr/bin/env bash
# The Yjs document benchmark (issue 11; numbers in docs/benchmarks.md, "Yjs documents").
# Starts a private redis-server, a private PostgreSQL (initdb/pg_ctl into a temp dir) and two
# release lockstep nodes on free loopback ports, runs the scenarios with the Node driver
# (loadtest/yjs/driver.mjs: yjs, y-websocket and ws from tests/yjs/node_modules), and writes
# $YJS_OUT/results.jsonl (one JSON object per run) and $YJS_OUT/summary.md (medians).
#
#   loadtest/yjs.sh                         all scenarios, RUNS=3
#   SCENARIOS="latency" LAT_DOCS="1 5" loadtest/yjs.sh
#
# Scenarios (SCENARIOS, default "latency memory coldjoin compaction"):
#   latency     LAT_DOCS documents × EDITORS editors (alternating between the two nodes), each
#               typing RATE updates/s for DURATION s after WARMUP s; edit → other editors p50–p99.
#               PERF=1 adds one run of PERF_DOCS documents with `perf record` on node A.
#   memory      MEM_DOCS documents × MEM_CLIENTS connections on node A (fresh nodes per run);
#               RSS per loaded document and per extra connection.
#   coldjoin    JOIN_SIZES-byte documents built through node A by 4 editors, compacted into
#               Postgres; then, per run, both nodes restarted and a y-websocket provider joins
#               (connect → `sync`). TAIL=1 also times "snapshot + TAIL_ENTRIES-entry log tail".
#   compaction  LOG_ENTRIES updates from 50 typists written into a document's Redis log while
#               no node has it loaded; a client loads it; time until the compactor has merged
#               and trimmed everything (end to end: reads, merges, Postgres upserts, XTRIM).
#
# Environment: SKIP_BUILD=1 (use target/release/lockstep as is), LOCKSTEP_BIN=path, RUNS,
# YJS_OUT (default: a temp dir, printed), BENCH_TMPDIR (where the servers' files go).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=lib.sh
source "$ROOT/loadtest/lib.sh"

SCENARIOS="${SCENARIOS:-latency memory coldjoin compaction}"
RUNS="${RUNS:-3}"
LAT_DOCS="${LAT_DOCS:-1 5 20}"
EDITORS="${EDITORS:-50}"
RATE="${RATE:-2}"
WARMUP="${WARMUP:-5}"
DURATION="${DURATION:-20}"
PROCS="${PROCS:-1}"
PERF="${PERF:-1}"
PERF_DOCS="${PERF_DOCS:-5}"
MEM_DOCS="${MEM_DOCS:-1000 4000}"
MEM_CLIENTS="${MEM_CLIENTS:-2}"
JOIN_SIZES="${JOIN_SIZES:-1000000 10000000}"
TAIL="${TAIL:-1}"
TAIL_ENTRIES="${TAIL_ENTRIES:-10000}"
LOG_ENTRIES="${LOG_ENTRIES:-50000}"
DRIVER="$ROOT/loadtest/yjs/driver.mjs"

if [[ "${SKIP_BUILD:-0}" != 1 && -z "${LOCKSTEP_BIN:-}" ]]; then
    echo "building the gateway (cargo build --release in $ROOT)" >&2
    (cd "$ROOT" && cargo build --release --quiet)
fi
[[ -x "$SERVER_BIN" ]] || { echo "no gateway binary at $SERVER_BIN" >&2; exit 1; }
# Node >= 20.11 and the npm clients of tests/yjs.
# shellcheck source=../scripts/ensure-deps.sh
[[ "$(node -e 'const [a,b]=process.versions.node.split(".").map(Number);console.log(a>20||(a==20&&b>=11)?1:0)' 2>/dev/null)" == 1 ]] \
    || source "$ROOT/scripts/ensure-deps.sh"
[[ -d "$ROOT/tests/yjs/node_modules/y-websocket" ]] || (cd "$ROOT/tests/yjs" && npm ci --no-audit --no-fund >&2)

WORK="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-yjs.XXXXXX)"
OUT="${YJS_OUT:-$WORK/out}"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
ulimit -n "$(ulimit -Hn)"
SECRET="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
NODE_PIDS=("" "")
NODE_PORTS=("$(free_port)" "$(free_port)")
URLS=("http://127.0.0.1:${NODE_PORTS[0]}" "http://127.0.0.1:${NODE_PORTS[1]}")
PG_DIR=""

# --- PostgreSQL: a private cluster, as tests/yjs/harness.mjs starts it (runuser as root) ---
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
pg() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$PG_BIN/$1" "${@:2}"; else "$PG_BIN/$1" "${@:2}"; fi
}
start_postgres() {
    # Its own temp dir: the postgres user cannot enter $WORK (mode 0700, owned by us).
    PG_DIR="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-yjs-pg.XXXXXX)"
    [[ "$(id -u)" == 0 ]] && chown postgres:postgres "$PG_DIR"
    pg initdb -D "$PG_DIR/data" -A trust -U postgres --no-sync -E UTF8 >"$WORK/initdb.log"
    PG_PORT="$(free_port)"
    # Durable commits as in production (fsync on): a snapshot store is a real commit here.
    pg pg_ctl -D "$PG_DIR/data" -l "$PG_DIR/log" -w start \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" >/dev/null
    PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
    echo "postgres on $PG_PORT" >&2
}
psqlq() { psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -At -c "$1"; }

# --- the two nodes; restarted with the same ports, so a node comes back cold ---
start_node() {
    local i="$1"
    env LOCKSTEP_LISTEN="127.0.0.1:${NODE_PORTS[$i]}" \
        LOCKSTEP_NODE_ID="yjs-bench-$i" \
        LOCKSTEP_REDIS_URL="$REDIS_URL" \
        LOCKSTEP_DATABASE_URL="$PG_URL" \
        LOCKSTEP_JWT_SECRET="$SECRET" \
        LOCKSTEP_DATA_DIR="$WORK/node-$i" \
        LOCKSTEP_YJS_MAX_DOCS="${MAX_DOCS:-20000}" \
        LOCKSTEP_YJS_MAX_UPDATE_BYTES=$((16 << 20)) \
        LOCKSTEP_YJS_MAX_DOC_BYTES=$((256 << 20)) \
        LOCKSTEP_HTTP_REQUESTS_PER_SECOND_PER_IP=1000000 \
        LOCKSTEP_HTTP_REQUESTS_PER_SECOND_PER_USER=1000000 \
        LOCKSTEP_HTTP_BURST=1000000 \
        RUST_LOG="${RUST_LOG:-warn}" \
        "$SERVER_BIN" >>"$WORK/node-$i.log" 2>&1 &
    NODE_PIDS[$i]=$!
    wait_ready "${NODE_PIDS[$i]}" "$WORK/node-$i.log" curl -fsS "${URLS[$i]}/readyz"
}
stop_nodes() { stop_pid "${NODE_PIDS[0]}"; stop_pid "${NODE_PIDS[1]}"; }
# Node A first: with a database it runs the migrations.
restart_nodes() { stop_nodes; start_node 0; start_node 1; }

cleanup() {
    stop_nodes
    [[ -n "${REDIS_PID:-}" ]] && stop_pid "$REDIS_PID"
    if [[ -n "$PG_DIR" ]]; then
        pg pg_ctl -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
    if [[ -z "${YJS_OUT:-}" ]]; then echo "results in $OUT (work dir kept: $WORK)" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

xlen() { redis-cli -p "$REDIS_PORT" XLEN "lockstep:yd:{$1}:log"; }
# wait_compacted DOC SECONDS: until the document's log is empty (merged into Postgres, trimmed).
wait_compacted() {
    local end=$((SECONDS + $2))
    while (( $(xlen "$1") > 0 )); do
        (( SECONDS < end )) || { echo "$1 not compacted after $2 s ($(xlen "$1") entries)" >&2; return 1; }
        sleep 0.2
    done
}
drive() { node "$DRIVER" "$@"; }
record() { jq -c "$1" >>"$RESULTS"; tail -1 "$RESULTS" >&2; }

start_redis "$WORK"
start_postgres
restart_nodes
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); node $(node --version)" >&2

scenario_latency() {
    local docs run
    for docs in $LAT_DOCS; do
        for run in $(seq 1 "$RUNS"); do
            drive latency --urls "${URLS[0]},${URLS[1]}" --secret "$SECRET" --docs "$docs" \
                --editors "$EDITORS" --rate "$RATE" --warmup "$WARMUP" --duration "$DURATION" \
                --procs "$PROCS" --pids "${NODE_PIDS[0]},${NODE_PIDS[1]}" --prefix "lat${docs}r$run" \
                | record ".run = $run | .load = \"$(cut -d' ' -f1-3 /proc/loadavg)\""
        done
    done
    if [[ "$PERF" == 1 ]] && command -v perf >/dev/null; then
        drive latency --urls "${URLS[0]},${URLS[1]}" --secret "$SECRET" --docs "$PERF_DOCS" \
            --editors "$EDITORS" --rate "$RATE" --warmup 5 --duration 15 --procs "$PROCS" \
            --pids "${NODE_PIDS[0]},${NODE_PIDS[1]}" --prefix "perf" >"$WORK/perf-run.json" &
        local d=$!
        # The editors connect first (a few seconds), then 5 s of warm-up: record inside the window.
        sleep $((EDITORS * PERF_DOCS / 200 + 8))
        perf record -F 499 -g -p "${NODE_PIDS[0]}" -o "$WORK/perf.data" -- sleep 10 >/dev/null 2>&1 || true
        wait "$d"
        record '.run = "perf"' <"$WORK/perf-run.json"
        perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
            | grep -v '^$' | grep -E '^ +[0-9]' | head -40 >"$OUT/perf-latency.txt" || true
    fi
}

scenario_memory() {
    local docs run
    for docs in $MEM_DOCS; do
        for run in $(seq 1 "$RUNS"); do
            restart_nodes
            sleep 2
            local r0
            r0="$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ { print $2 }' | tr -d '\r')"
            drive memory --url "${URLS[0]}" --secret "$SECRET" --docs "$docs" --clients "$MEM_CLIENTS" \
                --pid "${NODE_PIDS[0]}" --prefix "mem${docs}r$run" >"$WORK/mem.json"
            local r1
            r1="$(redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ { print $2 }' | tr -d '\r')"
            record ".run = $run | .redis_bytes_per_doc = (($r1 - $r0) / $docs | floor)" <"$WORK/mem.json"
        done
    done
}

scenario_coldjoin() {
    local size run k doc tails=0
    [[ "$TAIL" == 1 ]] && tails="$RUNS"
    for size in $JOIN_SIZES; do
        doc="big:$size"
        restart_nodes
        drive build --url "${URLS[0]}" --secret "$SECRET" --doc "$doc" --target-bytes "$size" \
            --tails "$tails" --tail-entries "$TAIL_ENTRIES" --out "$WORK/build-$size.json" >/dev/null
        record '.scenario = "build"' <"$WORK/build-$size.json"
        # Entries under the compactor's 500 threshold wait for its 30 s age rule.
        wait_compacted "$doc" 120
        local snap
        snap="$(psqlq "SELECT octet_length(state) FROM lockstep.documents WHERE doc = '$doc'")"
        local chars
        chars="$(jq .text_chars "$WORK/build-$size.json")"
        for run in $(seq 1 "$RUNS"); do
            restart_nodes
            drive join --url "${URLS[0]}" --secret "$SECRET" --doc "$doc" --expect-chars "$chars" \
                --pid "${NODE_PIDS[0]}" \
                | record ".run = $run | .kind = \"snapshot only\" | .target_bytes = $size | .snapshot_bytes = $snap | .tail_entries = 0"
        done
        for k in $(seq 0 $((tails - 1))); do
            wait_compacted "$doc" 60
            restart_nodes
            redis-cli -p "$REDIS_PORT" --pipe <"$WORK/build-$size.json.tail$k.resp" >/dev/null
            local entries
            entries="$(xlen "$doc")"
            snap="$(psqlq "SELECT octet_length(state) FROM lockstep.documents WHERE doc = '$doc'")"
            chars="$(jq ".tails[$k].text_chars_after" "$WORK/build-$size.json")"
            drive join --url "${URLS[0]}" --secret "$SECRET" --doc "$doc" --expect-chars "$chars" \
                --pid "${NODE_PIDS[0]}" \
                | record ".run = $((k + 1)) | .kind = \"snapshot + log tail\" | .target_bytes = $size | .snapshot_bytes = $snap | .tail_entries = $entries"
        done
    done
}

scenario_compaction() {
    local run doc
    for run in $(seq 1 "$RUNS"); do
        doc="log:$run"
        restart_nodes
        drive genlog --doc "$doc" --entries "$LOG_ENTRIES" --out "$WORK/log-$run.json" >/dev/null
        redis-cli -p "$REDIS_PORT" --pipe <"$WORK/log-$run.json.resp" >/dev/null
        local entries
        entries="$(xlen "$doc")"
        local t0
        t0="$(date +%s.%N)"
        # The join loads the document (snapshot: none; log: every entry), which hands it to node
        # A's compactor; it stays loaded for the 30 s unload grace after the client leaves.
        drive join --url "${URLS[0]}" --secret "$SECRET" --doc "$doc" \
            --expect-chars "$(jq .text_chars "$WORK/log-$run.json")" --pid "${NODE_PIDS[0]}" >"$WORK/join.json"
        wait_compacted "$doc" 120
        local t2
        t2="$(date +%s.%N)"
        # Each round is audited: lock_acquired (its start), document_compacted (merged entries,
        # snapshot bytes) and lock_released (its end), all with the round's fencing token.
        local stats q
        q="WITH r AS (
            SELECT token, min(at) FILTER (WHERE kind = 'lock_acquired') AS s,
                   max(at) FILTER (WHERE kind = 'lock_released') AS e,
                   max((detail->>'merged')::bigint) FILTER (WHERE kind = 'document_compacted') AS merged
            FROM lockstep.audit_events WHERE room = '$doc' GROUP BY token)
            SELECT json_build_object('rounds', count(*), 'merged', sum(merged),
                'busy_s', extract(epoch FROM sum(e - s)), 'span_s', extract(epoch FROM max(e) - min(s)),
                'round_s', json_agg(round(extract(epoch FROM e - s)::numeric, 3) ORDER BY s))
            FROM r WHERE merged IS NOT NULL AND e IS NOT NULL"
        # Audit records reach Postgres through the node's outbox, a moment after the trim.
        for _ in $(seq 1 100); do
            stats="$(psqlq "$q")"
            [[ "$(jq '.merged' <<<"$stats")" == "$entries" ]] && break
            sleep 0.2
        done
        psqlq "SELECT at, kind, token, detail FROM lockstep.audit_events WHERE room = '$doc' ORDER BY at" >"$OUT/audit-$doc.txt"
        local snap
        snap="$(psqlq "SELECT octet_length(state) FROM lockstep.documents WHERE doc = '$doc'")"
        jq -c --slurpfile j "$WORK/join.json" --argjson st "$stats" \
            ".scenario = \"compaction\" | .run = $run | .log_entries = $entries
             | .load_and_sync_ms = \$j[0].sync_ms | .complete = \$j[0].complete
             | . + \$st | .entries_per_s = (.merged / .busy_s | floor)
             | .mb_per_s = (.update_bytes / .busy_s / 1e6 * 100 | round / 100)
             | .end_to_end_entries_per_s = (.merged / .span_s | floor)
             | .snapshot_bytes = $snap | .join_to_log_empty_s = ($t2 - $t0 | . * 100 | round / 100)" \
            "$WORK/log-$run.json" >>"$RESULTS"
        tail -1 "$RESULTS" >&2
    done
}

for s in $SCENARIOS; do
    echo "== $s" >&2
    "scenario_$s"
done

bash "$ROOT/loadtest/yjs/summary.sh" "$RESULTS" "$OUT/perf-latency.txt" >"$OUT/summary.md"
cat "$OUT/summary.md"

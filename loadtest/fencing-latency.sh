#!/usr/bin/env bash
# What strict fencing costs: lock.acquire over Redis with and without a Postgres database.
#
#   loadtest/fencing-latency.sh [CLIENTS] [ITERATIONS]   (defaults 20 and 2000; RUNS=3 for medians)
#
# Starts a private redis-server and a private PostgreSQL cluster (initdb + pg_ctl into a temp
# dir on a free loopback port; as root through `runuser -u postgres`), then per run, one gateway
# at a time on that Redis: without a database, then with LOCKSTEP_DATABASE_URL (every grant is
# registered in lockstep.fences before it is answered: one Postgres round trip, a durable
# commit), each `locks --room-per-client` (one room per client, own resources). Then `pgbench`
# runs the registration statement alone with as many clients (the Postgres floor). One JSON
# object per measurement on stdout, then the medians and the difference. Everything is
# stopped and removed on exit (trap).
#
# Environment: RUNS, SKIP_BUILD=1, LOCKSTEP_BIN=path, BENCH_TMPDIR=dir (the Postgres data dir
# goes there too: /dev/shm takes the disk out of the commit), REDIS_SERVER, PG_BIN (default:
# the newest /usr/lib/postgresql/*/bin).

source "$(dirname "$0")/lib.sh"

CLIENTS="${1:-20}"
ITERATIONS="${2:-2000}"
RUNS="${RUNS:-1}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"

WORK=""
REDIS_PID=""
PG_DATA=""
as_pg=()
[[ "$(id -u)" == 0 ]] && as_pg=(runuser -u postgres --)

cleanup() {
    stop_server
    if [[ -n "$PG_DATA" ]]; then
        "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
        PG_DATA=""
    fi
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

[[ -x "$PG_BIN/initdb" ]] || { echo "PostgreSQL is needed (apt-get install -y postgresql)" >&2; exit 1; }
build_all
WORK="$(mktemp -d -p "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}" lockstep-fencing.XXXXXX)"
chmod 755 "$WORK"

REDIS_PORT="$(free_port)"
"$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!

PG_PORT="$(free_port)"
mkdir -p "$WORK/pg"
[[ ${#as_pg[@]} -gt 0 ]] && chown postgres:postgres "$WORK/pg"
PG_DATA="$WORK/pg/data"
"${as_pg[@]}" "$PG_BIN/initdb" -D "$PG_DATA" -A trust -U postgres --no-sync -E UTF8 >/dev/null
"${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$WORK/pg/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pg" start >/dev/null
DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
echo "redis on $REDIS_PORT, postgres on $PG_PORT" >&2

RESULTS="$WORK/results.jsonl"
common=(--clients "$CLIENTS" --iterations "$ITERATIONS" --resources "$CLIENTS" --room-per-client)
for run in $(seq 1 "$RUNS"); do
    for db in none postgres; do
        echo "== run $run/$RUNS: locks over Redis, database: $db" >&2
        extra=()
        [[ "$db" == postgres ]] && extra=(LOCKSTEP_DATABASE_URL="$DB_URL")
        start_server LOCKSTEP_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
            LOCKSTEP_HEARTBEAT_INTERVAL=1h \
            LOCKSTEP_MESSAGES_PER_SECOND=1000000 LOCKSTEP_MESSAGE_BURST=1000000 "${extra[@]}"
        "$LOAD" locks --url "$SERVER_URL" "${common[@]}" \
            | jq -c --arg db "$db" '. + {database: $db}' | tee -a "$RESULTS"
        stop_server
    done
done

# The registration alone, as the gateway sends it (migrations ran at the gateway's start).
cat >"$WORK/register.sql" <<'SQL'
\set t random(1, 1000000000)
SELECT lockstep.fence_register('scene:pgbench', 'segment:' || :client_id, :t);
SQL
echo "== pgbench: fence_register alone, $CLIENTS clients" >&2
pg_lat="$("$PG_BIN/pgbench" -n -h 127.0.0.1 -p "$PG_PORT" -U postgres -c "$CLIENTS" -T 5 \
    -f "$WORK/register.sql" postgres 2>/dev/null | awk '/latency average/ {print $4 * 1000}')"
echo "{\"mode\":\"pgbench\",\"clients\":$CLIENTS,\"latency_avg_us\":${pg_lat:-null}}" | tee -a "$RESULTS"

echo "== medians over $RUNS run(s) (µs)" >&2
jq -s -c '
  def med: sort | .[(length - 1) / 2 | floor];
  (map(select(.mode == "locks" and .database == "none"))) as $n
  | (map(select(.mode == "locks" and .database == "postgres"))) as $p
  | {
      redis_only_acquire_p50: ($n | map(.acquire_us.p50) | med),
      redis_only_acquire_p99: ($n | map(.acquire_us.p99) | med),
      with_postgres_acquire_p50: ($p | map(.acquire_us.p50) | med),
      with_postgres_acquire_p99: ($p | map(.acquire_us.p99) | med),
      pgbench_fence_register_avg: (map(select(.mode == "pgbench")) | .[0].latency_avg_us)
    }
  | . + {postgres_adds_p50: (.with_postgres_acquire_p50 - .redis_only_acquire_p50)}' "$RESULTS"

#!/usr/bin/env bash
# A local lockstep cluster for trying it by hand: one Redis and three gateway nodes on
# loopback (ports 8081-8083 by default), sharing an HS256 secret so a token works anywhere.
#
#   scripts/local-cluster.sh            # build, start, print a token, wait for Ctrl-C
#   NODES=5 BASE_PORT=9000 scripts/local-cluster.sh
#
# Open http://127.0.0.1:8081/?token=<token> and http://127.0.0.1:8082/?token=<token2>
# in two tabs: each tab is on another node and they see each other.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-3}
BASE_PORT=${BASE_PORT:-8081}
REDIS_PORT=${REDIS_PORT:-6390}
SECRET=${LOCKSTEP_JWT_SECRET:-local-cluster-secret-change-me-0123456789}
WORK=$(mktemp -d)
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install -y redis-server)"; exit 1; }
cargo build --release --quiet

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  --logfile "$WORK/redis.log" &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

for i in $(seq 1 "$NODES"); do
  port=$((BASE_PORT + i - 1))
  LOCKSTEP_LISTEN=127.0.0.1:$port \
  LOCKSTEP_REDIS_URL=redis://127.0.0.1:$REDIS_PORT \
  LOCKSTEP_NODE_ID=node-$i \
  LOCKSTEP_JWT_SECRET=$SECRET \
  LOCKSTEP_ADMIN_TOKEN=${LOCKSTEP_ADMIN_TOKEN:-local-admin-token} \
  LOCKSTEP_DATA_DIR=$WORK/node-$i \
    ./target/release/lockstep > "$WORK/node-$i.log" 2>&1 &
  pids+=($!)
done
for i in $(seq 1 "$NODES"); do
  port=$((BASE_PORT + i - 1))
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  echo "node-$i  http://127.0.0.1:$port/   (log: $WORK/node-$i.log)"
done

# Tokens signed with the shared secret (editor everywhere, valid 24 h).
token() {
  python3 - "$SECRET" "$1" <<'PY'
import base64, hashlib, hmac, json, sys, time
secret, sub = sys.argv[1].encode(), sys.argv[2]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": sub, "name": sub.capitalize(), "rooms": {"*": "editor"},
                       "exp": int(time.time()) + 86400}).encode())
sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
}
echo
echo "alice: http://127.0.0.1:$BASE_PORT/?token=$(token alice)"
echo "bob:   http://127.0.0.1:$((BASE_PORT + 1))/?token=$(token bob)"
echo
echo "Redis on 127.0.0.1:$REDIS_PORT. Ctrl-C stops everything."
wait

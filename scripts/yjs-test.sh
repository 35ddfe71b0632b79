#!/usr/bin/env bash
# Real Yjs clients against lockstep (tests/yjs, issue 11): yjs 13.6 + y-websocket 3.1 and
# @hocuspocus/provider 4.8 in Node, and y-websocket in headless Chromium, against two or three
# lockstep nodes sharing a private redis-server and a private PostgreSQL (all started by the
# tests on free loopback ports, in temp dirs, and stopped again).
#
#   scripts/yjs-test.sh                      # every file (sync, crash, restart, hocuspocus, chromium, demo)
#   scripts/yjs-test.sh sync.test.mjs        # only the files named (relative to tests/yjs)
#
# Needs: Node.js >= 20.11 with npm; cargo (or LOCKSTEP_BIN pointing at a built gateway);
# redis-server and redis-cli; PostgreSQL binaries under /usr/lib/postgresql/*/bin (initdb,
# pg_ctl, psql; as root they run through `runuser -u postgres`); Chromium at /usr/bin/chromium
# (or CHROMIUM_PATH), installed from apt here as scripts/browser-test.sh does; no browser is
# downloaded. The Hocuspocus test is skipped (with its reason) until the endpoint exists;
# LOCKSTEP_YJS_HOCUSPOCUS=1 runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

need() { command -v "$1" >/dev/null || { echo "yjs-test: $1 not found ($2)" >&2; exit 1; }; }
need node "Node.js >= 20.11"
need npm "npm comes with Node.js"
need redis-server "apt-get install -y redis-server"
need redis-cli "apt-get install -y redis-server"
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 11) ? 0 : 1)' \
  || { echo "yjs-test: Node.js >= 20.11 required, found $(node --version)" >&2; exit 1; }
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
  || { echo "yjs-test: PostgreSQL binaries not found (apt-get install -y postgresql)" >&2; exit 1; }

CHROMIUM=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq chromium >/dev/null
fi
export CHROMIUM_PATH=$CHROMIUM

if [ -z "${LOCKSTEP_BIN:-}" ]; then
  cargo build --quiet --bin lockstep
  LOCKSTEP_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/lockstep"
fi
export LOCKSTEP_BIN

cd tests/yjs
npm ci --no-audit --no-fund --loglevel=error
# The Yjs demo's bundle the binary embeds (GET /yjs-demo.js) must be what its source builds.
bash "$root/scripts/check-demo-bundle.sh" --yjs
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(sync.test.mjs lock.test.mjs crash.test.mjs restart.test.mjs hocuspocus.test.mjs chromium.test.mjs demo.test.mjs)
# One file at a time: each starts its own Redis, Postgres and nodes, and the machine is small.
exec node --test --test-concurrency=1 "${FILES[@]}"

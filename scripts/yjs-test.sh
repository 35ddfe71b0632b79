#!/usr/bin/env bash
# Real Yjs clients against lockstep (tests/yjs, issue 11): yjs 13.6 + y-websocket 3.1 and
# @hocuspocus/provider 4.8 in Node, and y-websocket in headless Chromium, against two or three
# lockstep nodes sharing a private redis-server and a private PostgreSQL (all started by the
# tests on free loopback ports, in temp dirs, and stopped again).
#
#   scripts/yjs-test.sh                      # every file (sync, lock, crash, restart, hocuspocus, chromium, demo)
#   scripts/yjs-test.sh sync.test.mjs        # only the files named (relative to tests/yjs)
#
# Needs: Node.js >= 20.11 with npm; cargo (or LOCKSTEP_BIN pointing at a built gateway);
# redis-server and redis-cli; PostgreSQL binaries under /usr/lib/postgresql/*/bin (initdb,
# pg_ctl, psql; as root they run through `runuser -u postgres`); Chromium at /usr/bin/chromium
# (or CHROMIUM_PATH), installed from apt here as scripts/browser-test.sh does; no browser is
# downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

suite=yjs-test
source scripts/lib/node-suite.sh
need_node
need redis-server "apt-get install -y redis-server"
need redis-cli "apt-get install -y redis-server"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
  || { echo "yjs-test: PostgreSQL binaries not found (apt-get install -y postgresql)" >&2; exit 1; }

CHROMIUM=${CHROMIUM_PATH:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq chromium >/dev/null
fi
export CHROMIUM_PATH=$CHROMIUM

use_lockstep_bin

cd tests/yjs
npm ci --no-audit --no-fund --loglevel=error
# The Yjs demo's bundle the binary embeds (GET /yjs-demo.js) must be what its source builds.
bash "$root/scripts/check-demo-bundle.sh" --yjs
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(sync.test.mjs lock.test.mjs crash.test.mjs restart.test.mjs hocuspocus.test.mjs chromium.test.mjs demo.test.mjs)
# One file at a time: each starts its own Redis, Postgres and nodes, and the machine is small.
exec node --test --test-concurrency=1 "${FILES[@]}"

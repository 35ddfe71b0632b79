#!/usr/bin/env bash
# Browser tests of the demo page (GET /) and the operator console (GET /admin): builds the
# gateway (debug), starts one dev-mode node on a free loopback port with a temp data dir and a
# random admin token, and drives the pages in headless Chromium (tests/browser/demo.test.mjs,
# tests/browser/admin.test.mjs; playwright-core, Node's test runner).
#
#   scripts/browser-test.sh                 # both files, ~20 s once built (a cold debug build takes ~95 s)
#   scripts/browser-test.sh admin.test.mjs  # only the files named (relative to tests/browser)
#
# Needs Node >= 20 and npm. Chromium comes from apt (/usr/bin/chromium); no browser is downloaded.
# Screenshots of the pages land in ${LOCKSTEP_SCREENSHOTS:-/tmp/lockstep-browser}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CHROMIUM=${CHROMIUM_PATH:-/usr/bin/chromium}

if [ ! -x "$CHROMIUM" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # The emoji font only makes screenshots faithful (🔒 in badges); the test does not need it.
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null
fi

(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

cargo build --quiet --bin lockstep
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/lockstep"

WORK=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# Dev mode needs no JWT key: drop any LOCKSTEP_* settings inherited from the caller's shell.
for v in $(compgen -e | grep '^LOCKSTEP_' || true); do unset "$v"; done

# The console signs in with this; the tests get it by env (LOCKSTEP_ADMIN_TOKEN).
ADMIN_TOKEN="browser-test-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

PORT=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
LOCKSTEP_LISTEN="127.0.0.1:$PORT" LOCKSTEP_DATA_DIR="$WORK/data" LOCKSTEP_ADMIN_TOKEN="$ADMIN_TOKEN" "$BIN" >"$WORK/server.log" 2>&1 &
server_pid=$!

URL="http://127.0.0.1:$PORT"
for _ in $(seq 100); do
  if ! kill -0 "$server_pid" 2>/dev/null; then echo "lockstep exited early:"; cat "$WORK/server.log"; exit 1; fi
  curl -fsS "$URL/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$URL/healthz" >/dev/null || { echo "lockstep not healthy on $URL:"; cat "$WORK/server.log"; exit 1; }

cd tests/browser
status=0
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(demo.test.mjs admin.test.mjs)
LOCKSTEP_URL="$URL" LOCKSTEP_ADMIN_TOKEN="$ADMIN_TOKEN" CHROMIUM_PATH="$CHROMIUM" node --test "${FILES[@]}" || status=$?
if [ "$status" -ne 0 ]; then echo "--- server log ---"; tail -n 50 "$WORK/server.log"; fi
exit "$status"

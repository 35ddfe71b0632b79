#!/usr/bin/env bash
# The JavaScript SDK's tests (clients/js), from a fresh clone:
#   npm ci → build (tsc + the esbuild browser bundle) → typecheck → unit tests (node:test,
#   in-process fake server) → integration tests against the real gateway binary (dev mode,
#   a token-refresh node, and a two-node drain on a private redis-server) → publint and
#   attw on the packed package → the browser bundle's gzip size budget → the copy embedded
#   in the demo (src/http/demo/lockstep-client.js) matches a fresh build.
# Needs Node.js >= 20.11 with npm (the packages run on Node >= 18; their tests use node:test
# flags from 20.11), cargo and redis-server (scripts/test.sh installs them).
# LOCKSTEP_BIN: use that gateway binary instead of building target/debug/lockstep.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

need() { command -v "$1" >/dev/null || { echo "js-test: $1 not found ($2)" >&2; exit 1; }; }
need node "Node.js >= 20.11"
need npm "npm comes with Node.js"
need redis-server "the drain test starts a private one"
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 11) ? 0 : 1)' \
  || { echo "js-test: Node.js >= 20.11 required, found $(node --version) (source scripts/ensure-deps.sh installs one)" >&2; exit 1; }

if [ -z "${LOCKSTEP_BIN:-}" ]; then
  cargo build --quiet --bin lockstep
  LOCKSTEP_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/lockstep"
fi
export LOCKSTEP_BIN

cd clients/js
npm ci --no-audit --no-fund --loglevel=error
# Workspaces run in path order, so packages/client is built before packages that use it.
npm run build --workspaces --if-present
npm run typecheck --workspaces --if-present
npm test --workspaces --if-present
npm run test:integration --workspaces --if-present
for pkg in packages/client packages/react; do
  (cd "$pkg" && npx --no-install publint --strict && npx --no-install attw --pack . --profile esm-only)
done
npm run size -w @lockstep/client

embedded="$root/src/http/demo/lockstep-client.js"
if [ -f "$embedded" ]; then
  if ! cmp -s "$embedded" packages/client/dist/lockstep.browser.js; then
    echo "js-test: $embedded is stale: bash scripts/check-demo-bundle.sh --update, then rebuild the binary" >&2
    exit 1
  fi
  echo "js-test: the demo's embedded bundle matches the build"
fi
echo "js-test: all passed"

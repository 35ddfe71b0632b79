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

suite=js-test
source scripts/lib/node-suite.sh
need_node
need redis-server "the drain test starts a private one"

use_lockstep_bin

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

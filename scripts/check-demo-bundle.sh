#!/usr/bin/env bash
# Checks that the SDK bundle the binary embeds (src/http/demo/lockstep-client.js, served at
# GET /lockstep-client.js) is exactly what @lockstep/client's source builds today
# (clients/js/packages/client/dist/lockstep.browser.js). The copy is committed so that
# `cargo run --release` serves a working demo on a machine without Node.
#
#   scripts/check-demo-bundle.sh            # rebuild the SDK, fail if the embedded copy differs
#   scripts/check-demo-bundle.sh --update   # rebuild the SDK and refresh the embedded copy
#
# Needs Node.js + npm (scripts/ensure-deps.sh installs them). esbuild is pinned in
# clients/js/package-lock.json, so the same source gives the same bytes on every machine.
set -euo pipefail
cd "$(dirname "$0")/.."

EMBEDDED=src/http/demo/lockstep-client.js
BUILT=clients/js/packages/client/dist/lockstep.browser.js
update=false
case "${1:-}" in
  --update) update=true ;;
  "") ;;
  *) echo "usage: $0 [--update]" >&2; exit 2 ;;
esac

if [ ! -f clients/js/package.json ]; then
  echo "check-demo-bundle: clients/js is missing: nothing to build the bundle from" >&2
  exit 1
fi
(
  cd clients/js
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  npm run --silent build -w @lockstep/client >/dev/null
)
[ -f "$BUILT" ] || { echo "check-demo-bundle: the SDK build did not produce $BUILT" >&2; exit 1; }

if $update; then
  if cmp -s "$BUILT" "$EMBEDDED"; then
    echo "check-demo-bundle: $EMBEDDED is already current ($(wc -c <"$EMBEDDED") bytes)"
  else
    cp "$BUILT" "$EMBEDDED"
    echo "check-demo-bundle: refreshed $EMBEDDED ($(wc -c <"$EMBEDDED") bytes); rebuild the binary and commit it"
  fi
  exit 0
fi

if ! cmp -s "$BUILT" "$EMBEDDED"; then
  echo "check-demo-bundle: FAIL: $EMBEDDED (embedded in the binary, $(wc -c <"$EMBEDDED") bytes)" >&2
  echo "  differs from $BUILT, built from clients/js now ($(wc -c <"$BUILT") bytes)." >&2
  echo "  The demo page would run an SDK that is not the one in the source tree. Refresh it with" >&2
  echo "    bash scripts/check-demo-bundle.sh --update" >&2
  echo "  then rebuild the binary and commit $EMBEDDED." >&2
  exit 1
fi
echo "check-demo-bundle: ok: $EMBEDDED matches the SDK source ($(wc -c <"$EMBEDDED") bytes, $(gzip -9c "$EMBEDDED" | wc -c) gzipped)"

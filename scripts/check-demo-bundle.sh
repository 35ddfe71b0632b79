#!/usr/bin/env bash
# Checks that the two bundles the binary embeds are exactly what their sources build today:
#   - src/http/demo/lockstep-client.js (GET /lockstep-client.js, the main demo's SDK) against
#     @lockstep/client's build (clients/js/packages/client/dist/lockstep.browser.js);
#   - src/http/demo/yjs-demo.js (GET /yjs-demo.js, the Yjs demo page /yjs) against a fresh
#     esbuild of src/http/demo/yjs-app.mjs with yjs + y-websocket from tests/yjs/node_modules.
# The copies are committed so that `cargo run --release` serves working demos on a machine
# without Node.
#
#   scripts/check-demo-bundle.sh            # rebuild both, fail if an embedded copy differs
#   scripts/check-demo-bundle.sh --update   # rebuild both and refresh the embedded copies
#   scripts/check-demo-bundle.sh --yjs      # only the Yjs bundle (scripts/yjs-test.sh runs this;
#                                           # scripts/js-test.sh checks the SDK one)
#
# Needs Node.js + npm (scripts/ensure-deps.sh installs them). esbuild and the Yjs packages are
# pinned in clients/js/package-lock.json and tests/yjs/package-lock.json, and the Yjs build's
# options are fixed below (target, minify, no source map, legal comments inline), so the same
# source gives the same bytes on every machine.
set -euo pipefail
cd "$(dirname "$0")/.."

EMBEDDED=src/http/demo/lockstep-client.js
BUILT=clients/js/packages/client/dist/lockstep.browser.js
YJS_EMBEDDED=src/http/demo/yjs-demo.js
YJS_SOURCE=src/http/demo/yjs-app.mjs
update=false
sdk=true
for arg in "$@"; do
  case "$arg" in
    --update) update=true ;;
    --yjs) sdk=false ;;
    *) echo "usage: $0 [--update] [--yjs]" >&2; exit 2 ;;
  esac
done

if $sdk; then
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
fi

[ -f tests/yjs/package-lock.json ] || { echo "check-demo-bundle: tests/yjs is missing: nothing to build the Yjs bundle from" >&2; exit 1; }
[ -d tests/yjs/node_modules/yjs ] || (cd tests/yjs && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
YJS_BUILT=$(mktemp -d)/yjs-demo.js
trap 'rm -rf "$(dirname "$YJS_BUILT")"' EXIT
# From tests/yjs so that `esbuild`, `yjs` and `y-websocket` resolve from its node_modules (the
# entry point lives outside that package: nodePaths points its imports there too).
(
  cd tests/yjs
  SRC="../../$YJS_SOURCE" OUT="$YJS_BUILT" node --input-type=module -e '
    import { build } from "esbuild";
    import { readFileSync } from "node:fs";
    const v = (p) => JSON.parse(readFileSync(`node_modules/${p}/package.json`, "utf8")).version;
    await build({
      entryPoints: [process.env.SRC],
      outfile: process.env.OUT,
      nodePaths: [new URL("node_modules", `file://${process.cwd()}/`).pathname],
      bundle: true,
      format: "esm",
      platform: "browser",
      target: "es2020",
      minify: true,
      sourcemap: false,
      legalComments: "inline",
      charset: "ascii",
      banner: { js: `/* lockstep Yjs demo (src/http/demo/yjs-app.mjs) + yjs ${v("yjs")}, y-websocket ${v("y-websocket")}, y-protocols ${v("y-protocols")}, lib0 ${v("lib0")} (MIT). Built by scripts/check-demo-bundle.sh: do not edit. */` },
      logLevel: "error",
    });
  '
)
[ -f "$YJS_BUILT" ] || { echo "check-demo-bundle: the Yjs build did not produce a bundle" >&2; exit 1; }

size() { echo "$(wc -c <"$1") bytes, $(gzip -9c "$1" | wc -c) gzipped"; }

# compare <built> <embedded> <what it is built from>
failed=false
compare() {
  local built=$1 embedded=$2 from=$3
  if $update; then
    if cmp -s "$built" "$embedded"; then
      echo "check-demo-bundle: $embedded is already current ($(size "$embedded"))"
    else
      cp "$built" "$embedded"
      echo "check-demo-bundle: refreshed $embedded ($(size "$embedded")); rebuild the binary and commit it"
    fi
  elif ! cmp -s "$built" "$embedded"; then
    echo "check-demo-bundle: FAIL: $embedded (embedded in the binary, $(wc -c <"$embedded" 2>/dev/null || echo 0) bytes)" >&2
    echo "  differs from a fresh build of $from ($(wc -c <"$built") bytes)." >&2
    echo "  The demo would run code that is not the one in the source tree. Refresh it with" >&2
    echo "    bash scripts/check-demo-bundle.sh --update" >&2
    echo "  then rebuild the binary and commit $embedded." >&2
    failed=true
  else
    echo "check-demo-bundle: ok: $embedded matches $from ($(size "$embedded"))"
  fi
}
if $sdk; then compare "$BUILT" "$EMBEDDED" "the SDK source (clients/js)"; fi
compare "$YJS_BUILT" "$YJS_EMBEDDED" "$YJS_SOURCE + tests/yjs/node_modules"
if $failed; then exit 1; fi

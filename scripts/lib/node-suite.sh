# Sourced by the scripts that run a Node test suite against the gateway (js-test.sh,
# yjs-test.sh): the checks they share and the binary they test. The caller sets `suite` (its
# name in messages) and `root` (the repository) first.
#
#   need CMD WHY        stop with a clear message when CMD is missing
#   need_node           Node.js >= 20.11 with npm (its test runner flags)
#   use_lockstep_bin    export LOCKSTEP_BIN, building target/debug/lockstep when unset

need() { command -v "$1" >/dev/null || { echo "$suite: $1 not found ($2)" >&2; exit 1; }; }

need_node() {
  need node "Node.js >= 20.11"
  need npm "npm comes with Node.js"
  node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 11) ? 0 : 1)' \
    || { echo "$suite: Node.js >= 20.11 required, found $(node --version) (source scripts/ensure-deps.sh installs one)" >&2; exit 1; }
}

use_lockstep_bin() {
  if [ -z "${LOCKSTEP_BIN:-}" ]; then
    cargo build --quiet --bin lockstep
    LOCKSTEP_BIN="${CARGO_TARGET_DIR:-$root/target}/debug/lockstep"
  fi
  export LOCKSTEP_BIN
}

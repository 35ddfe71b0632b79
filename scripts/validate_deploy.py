#!/usr/bin/env python3
"""Offline validation of lockstep's deployment files (called by scripts/validate-deploy.sh).

What is checked, and with what:

- Kubernetes manifests (k8s/, k8s/monitoring/, the chart's renders, the kustomize builds):
  built-in kinds with kubernetes-validate's strict schemas (unknown fields refused) for the
  oldest supported (1.30) and the newest bundled Kubernetes; the prometheus-operator kinds
  (ServiceMonitor, PrometheusRule) against JSON schemas derived from the operator's CRD
  models (PyPI package cloudcoil-models-prometheus-operator, generated from the CRDs' OpenAPI
  schemas), made strict the same way (additionalProperties: false wherever properties are
  listed).
- The chart: helm.lint(strict=True) and renders (Helm v4's own SDK) with the default values
  and every helm/lockstep/ci/*-values.yaml; a values typo must be refused by the schema.
- kustomize builds of k8s/ and k8s/monitoring/ (`kubectl kustomize`, offline).
- Alert rules: `promtool check rules` and `promtool test rules` (done by the shell script);
  here: the PrometheusRule and the chart's copy hold exactly the plain rules file's groups, the
  dashboard's queries parse as PromQL (promtool, as recording rules), the chart's dashboard is
  the same file.
- Settings: every LOCKSTEP_* name the code reads (`env = "..."` in src/config/, plus
  `env::var("LOCKSTEP_...")` elsewhere, test-only hooks excepted) is in values.yaml, in the
  rendered ConfigMap/Secret/Deployment env of some chart render, and in k8s/ (ConfigMap,
  Secret template or Deployment env; commented out in the ConfigMap when unset by default).
- Metrics: every lockstep_* metric referenced in k8s/monitoring/ and helm/ is listed in the
  metrics table of docs/operations.md (or LOCKSTEP_METRICS_DOC, e.g. the catalogue), and
  histograms are referenced only as _bucket/_sum/_count.
- Drain timing: terminationGracePeriodSeconds >= preStop sleep + LOCKSTEP_DRAIN_TIMEOUT.
- TLS (helm/lockstep/ci/tls-values.yaml): the Redis and Postgres certificate Secrets are
  mounted where the settings point (LOCKSTEP_REDIS_TLS_* in the ConfigMap, sslrootcert in the
  URL), in the pods and in the migration job; k8s/ mounts the same paths.

Exits 1 with every failure listed.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CHART = os.path.join(ROOT, "helm", "lockstep")
K8S_VERSIONS = ["1.30.0", None]  # None: the newest schemas kubernetes-validate bundles
# Read by the code but deliberately not deployable.
TEST_ONLY_ENV = {"LOCKSTEP_AUDIT_ACK_DELAY_MS"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

failures: list[str] = []
passed = 0


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"FAIL {msg}", flush=True)


def ok(msg: str) -> None:
    global passed
    passed += 1
    print(f"ok   {msg}", flush=True)


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------------------------
# Schemas


def _strict(schema):
    """Refuse unknown fields, as kubernetes-validate --strict does for built-in kinds."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


_crd_validators = {}


def crd_validator(kind: str):
    if kind not in _crd_validators:
        import jsonschema
        from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

        model = getattr(monitoring_v1, kind)
        schema = _strict(model.model_json_schema(by_alias=True, mode="validation"))
        _crd_validators[kind] = jsonschema.Draft202012Validator(schema)
    return _crd_validators[kind]


def validate_doc(doc: dict, where: str) -> bool:
    """Validates one manifest; returns False (and records why) when it is invalid."""
    import kubernetes_validate as kv

    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        fail(f"{where}: not a Kubernetes object")
        return False
    label = f"{where}: {doc['kind']}/{doc.get('metadata', {}).get('name', '?')}"
    if doc["kind"] in CRD_KINDS:
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            fail(f"{label}: apiVersion {doc['apiVersion']}, expected monitoring.coreos.com/v1")
            return False
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
        if errors:
            for e in errors[:5]:
                path = "/".join(str(p) for p in e.absolute_path)
                fail(f"{label}: {path}: {e.message[:300]}")
            return False
        return True
    good = True
    for version in K8S_VERSIONS:
        v = version or kv.latest_version()
        try:
            kv.validate(doc, v, strict=True)
        except kv.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            fail(f"{label} (Kubernetes {v}): {path}: {e.message[:300]}")
            good = False
        except kv.SchemaNotFoundError:
            fail(f"{label}: no schema for {doc['apiVersion']} {doc['kind']} in Kubernetes {v}")
            good = False
    return good


def validate_stream(text: str, where: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    bad = sum(0 if validate_doc(d, where) else 1 for d in docs)
    if not bad and docs:
        ok(f"{where}: {len(docs)} object(s) valid ({', '.join(sorted({d['kind'] for d in docs}))})")
    return docs


# ---------------------------------------------------------------------------------------------
# k8s/


def check_plain_manifests() -> list[dict]:
    docs = []
    skip = {"kustomization.yaml", "lockstep-rules.yaml", "lockstep-rules.test.yaml"}
    for path in sorted(glob.glob(os.path.join(ROOT, "k8s", "*.yaml")) +
                       glob.glob(os.path.join(ROOT, "k8s", "monitoring", "*.yaml"))):
        if os.path.basename(path) in skip:
            continue
        with open(path) as f:
            docs += validate_stream(f.read(), rel(path))
    return docs


def check_kustomize() -> None:
    kubectl = shutil_which("kubectl")
    if not kubectl:
        fail("kubectl not found: cannot build the kustomizations (kubectl kustomize)")
        return
    for d in ["k8s", "k8s/monitoring"]:
        r = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"kubectl kustomize {d}: {r.stderr.strip()[:500]}")
            continue
        docs = validate_stream(r.stdout, f"kustomize {d}")
        wrong = [f"{x['kind']}/{x['metadata']['name']}" for x in docs
                 if x["kind"] != "Namespace" and x["metadata"].get("namespace") != "lockstep"]
        if wrong:
            fail(f"kustomize {d}: not in namespace lockstep: {wrong}")


def shutil_which(name: str):
    import shutil
    return shutil.which(name)


# ---------------------------------------------------------------------------------------------
# Helm


def load_values(path: str | None) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def check_chart() -> list[tuple[str, list[dict]]]:
    import helm_python as helm

    renders = []
    value_files = [None] + sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    for vf in value_files:
        name = "defaults" if vf is None else rel(vf)
        values = load_values(vf)
        report = helm.lint(CHART, values, strict=True, namespace="lockstep")
        problems = report.get("errors", []) + [
            f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m["severity"] >= 2]
        if problems:
            for p in problems:
                fail(f"helm lint --strict ({name}): {p}")
        else:
            ok(f"helm lint --strict ({name})")
        chart = helm.Chart.load(CHART)
        try:
            out = chart.render(values, name="lockstep", namespace="lockstep", is_install=True)
        except helm.HelmError as e:
            fail(f"helm render ({name}): {e}")
            continue
        text = "\n---\n".join(v for k, v in sorted(out.items()) if not k.endswith("NOTES.txt"))
        renders.append((name, validate_stream(text, f"helm render ({name})")))

    # The schema must refuse a misspelt setting (it would otherwise be silently ignored).
    typo = {"config": {"LOCKSTEP_HEARBEAT_INTERVAL": "10s"}}
    try:
        report = helm.lint(CHART, typo, strict=True)
        refused = bool(report.get("errors")) or any(m["severity"] >= 3 for m in report["messages"])
    except helm.HelmError:
        refused = True
    if refused:
        ok("values.schema.json refuses a misspelt setting (LOCKSTEP_HEARBEAT_INTERVAL)")
    else:
        fail("values.schema.json accepted config.LOCKSTEP_HEARBEAT_INTERVAL (a typo)")
    return renders


# ---------------------------------------------------------------------------------------------
# Settings coverage


def code_env_names() -> set[str]:
    names = set()
    for path in glob.glob(os.path.join(ROOT, "src", "config", "*.rs")):
        with open(path) as f:
            names |= set(re.findall(r'env\s*=\s*"(LOCKSTEP_[A-Z0-9_]+)"', f.read()))
    if not names:
        fail("src/config/: no env = \"LOCKSTEP_...\" found (parser out of date?)")
    for path in glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True):
        with open(path) as f:
            names |= set(re.findall(r'env::var(?:_os)?\(\s*"(LOCKSTEP_[A-Z0-9_]+)"', f.read()))
    return names - TEST_ONLY_ENV


def rendered_env_names(docs: list[dict]) -> set[str]:
    names = set()
    for d in docs:
        if d["kind"] == "ConfigMap":
            names |= set((d.get("data") or {}).keys())
        elif d["kind"] == "Secret":
            names |= set((d.get("data") or {}).keys()) | set((d.get("stringData") or {}).keys())
        elif d["kind"] in ("Deployment", "Job"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in c.get("env", [])}
    return names


def check_env_coverage(plain_docs: list[dict], renders) -> None:
    names = code_env_names()
    values = load_values(os.path.join(CHART, "values.yaml"))
    in_values = set(values.get("config", {})) | set(values.get("secrets", {}))
    missing = sorted(names - in_values)
    if missing:
        fail(f"helm/lockstep/values.yaml lacks settings the code reads: {missing}")
    else:
        ok(f"values.yaml covers all {len(names)} LOCKSTEP_* settings the code reads")

    rendered = set()
    for _, docs in renders:
        rendered |= rendered_env_names(docs)
    missing = sorted(names - rendered)
    if missing:
        fail(f"no chart render sets {missing} (ConfigMap, Secret or Deployment env)")
    else:
        ok("every setting reaches a rendered ConfigMap/Secret/Deployment env")

    # With the defaults, every non-empty default must reach the pods.
    if renders and renders[0][0] == "defaults":
        default_names = rendered_env_names(renders[0][1])
        lost = sorted(k for k, v in values.get("config", {}).items()
                      if str(v) != "" and k not in default_names)
        if lost:
            fail(f"default render drops settings that have defaults: {lost}")
        else:
            ok("default render carries every setting that has a default")

    plain = rendered_env_names(plain_docs)
    with open(os.path.join(ROOT, "k8s", "configmap.yaml")) as f:
        plain |= set(re.findall(r"^\s*#\s*(LOCKSTEP_[A-Z0-9_]+):", f.read(), re.M))
    missing = sorted(names - plain)
    if missing:
        fail(f"k8s/ (configmap.yaml, secret.example.yaml, deployment.yaml) lacks {missing}")
    else:
        ok("k8s/ lists every setting (ConfigMap, Secret template or Deployment env)")


# ---------------------------------------------------------------------------------------------
# Metrics


def documented_metrics() -> tuple[dict[str, str], str]:
    """Metric name -> type from the reference document's table."""
    doc = os.environ.get("LOCKSTEP_METRICS_DOC") or os.path.join(ROOT, "docs", "operations.md")
    with open(doc) as f:
        text = f.read()
    found: dict[str, str] = {}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):  # docs/operations.md: | `name` / `name2` | type | labels | ... |
            cells = [c.strip() for c in s.strip("|").split("|")]
            names = re.findall(r"`(lockstep_[a-z0-9_]+)", cells[0]) if cells else []
            kind = cells[1].split()[0].lower() if len(cells) > 1 and cells[1] else ""
            for n in names:
                found[n] = kind
        elif re.match(r"^lockstep_[a-z0-9_]+", s):  # catalogue: name{labels}  type  meaning
            m = re.match(r"^(lockstep_[a-z0-9_]+)\S*\s+(\w+)", s)
            if m:
                found[m.group(1)] = m.group(2).lower()
    return found, doc


def referenced_metrics() -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    files = glob.glob(os.path.join(ROOT, "k8s", "monitoring", "*")) + [
        p for p in glob.glob(os.path.join(CHART, "**", "*"), recursive=True) if os.path.isfile(p)]
    for path in files:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            text = f.read()
        # Recording rules (level:metric:operation) are ours, not the gateway's: the metric
        # inside them is checked where the rule's expression uses it.
        text = re.sub(r"[a-z_]*:lockstep_[a-z0-9_]+:[a-z0-9_]+", "", text)
        for name in re.findall(r"(?<![A-Za-z0-9_])lockstep_[a-z0-9_]+", text):
            refs.setdefault(name, set()).add(rel(path))
    return refs


def check_metrics() -> None:
    documented, doc = documented_metrics()
    if not documented:
        fail(f"{rel(doc)}: no metrics table found")
        return
    refs = referenced_metrics()
    if not refs:
        fail("no lockstep_* metric referenced in k8s/monitoring/ or helm/ (parser out of date?)")
    bad = 0
    for name, where in sorted(refs.items()):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in documented:
            if documented[name] == "histogram":
                fail(f"{name} is a histogram: use {name}_bucket/_sum/_count ({sorted(where)})")
                bad += 1
        elif base != name and documented.get(base) == "histogram":
            pass
        else:
            fail(f"{name} is not in the metrics table of {rel(doc)} ({', '.join(sorted(where))})")
            bad += 1
    if not bad:
        ok(f"all {len(refs)} metric names referenced are in {rel(doc)} ({len(documented)} listed)")


# ---------------------------------------------------------------------------------------------
# Rules and dashboard consistency


def check_rules_and_dashboard() -> None:
    mon = os.path.join(ROOT, "k8s", "monitoring")
    rules = load_values(os.path.join(mon, "lockstep-rules.yaml"))
    pr = load_values(os.path.join(mon, "prometheusrule.yaml"))
    if pr.get("spec") != rules:
        fail("k8s/monitoring/prometheusrule.yaml spec differs from lockstep-rules.yaml")
    else:
        ok("prometheusrule.yaml holds exactly lockstep-rules.yaml's groups")
    for name in ["lockstep-rules.yaml", "lockstep-dashboard.json"]:
        with open(os.path.join(mon, name), "rb") as a, \
                open(os.path.join(CHART, "files", name), "rb") as b:
            if a.read() != b.read():
                fail(f"helm/lockstep/files/{name} differs from k8s/monitoring/{name}: copy it")
            else:
                ok(f"helm/lockstep/files/{name} is k8s/monitoring/{name}")

    with open(os.path.join(mon, "lockstep-dashboard.json")) as f:
        dash = json.load(f)
    exprs = []
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            exprs.append((p.get("title", "?"), t["expr"]))
    if not exprs:
        fail("dashboard has no queries")
        return
    # Grafana variables become values promtool accepts; each query becomes a recording rule.
    subst = {"$__rate_interval": "5m", "$namespace": "lockstep", "$pod": ".*"}
    group = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, (title, e) in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        group["groups"][0]["rules"].append({"record": f"dashboard_query_{i}", "expr": e})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(group, f)
    r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode != 0:
        fail(f"dashboard queries do not parse: {(r.stdout + r.stderr).strip()[:800]}")
    else:
        ok(f"dashboard: {len(exprs)} queries in {len(dash['panels'])} panels parse as PromQL")


# ---------------------------------------------------------------------------------------------
# Drain timing


def check_drain(plain_docs: list[dict], renders) -> None:
    def seconds(s: str) -> int:
        m = re.fullmatch(r"(\d+)s", s)
        if not m:
            raise ValueError(s)
        return int(m.group(1))

    def check(where, docs):
        cm = {}
        for d in docs:
            if d["kind"] == "ConfigMap":
                cm.update(d.get("data") or {})
        for d in docs:
            if d["kind"] != "Deployment":
                continue
            spec = d["spec"]["template"]["spec"]
            c = spec["containers"][0]
            pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
            if pre is None:
                fail(f"{where}: no preStop sleep")
                continue
            drain = seconds(cm.get("LOCKSTEP_DRAIN_TIMEOUT", "10s"))
            grace = spec.get("terminationGracePeriodSeconds", 30)
            # At least 5 s for the audit flush and the process exit.
            if grace < pre + drain + 5:
                fail(f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre} + "
                     f"LOCKSTEP_DRAIN_TIMEOUT {drain} + 5")
            else:
                ok(f"{where}: grace {grace}s >= preStop {pre}s + drain {drain}s + 5s")

    check("k8s/", plain_docs)
    for name, docs in renders:
        check(f"helm ({name})", docs)


def check_tls(plain_docs: list[dict], renders) -> None:
    def mounts(docs, kind):
        out = {}
        for d in docs:
            if d["kind"] != kind:
                continue
            spec = d["spec"]["template"]["spec"]
            secrets = {v["name"]: v["secret"]["secretName"]
                       for v in spec.get("volumes", []) if "secret" in v}
            for m in spec["containers"][0].get("volumeMounts", []):
                if m["name"] in secrets:
                    out[m["mountPath"]] = secrets[m["name"]]
        return out

    def check(where, docs, redis_secret, pg_secret, expect_cm):
        cm = {}
        for d in docs:
            if d["kind"] == "ConfigMap" and "LOCKSTEP_LISTEN" in (d.get("data") or {}):
                cm.update(d.get("data") or {})
        dep = mounts(docs, "Deployment")
        job = mounts(docs, "Job")
        bad = []
        if dep.get("/etc/lockstep/tls/redis") != redis_secret:
            bad.append(f"Deployment does not mount {redis_secret} at /etc/lockstep/tls/redis")
        if dep.get("/etc/lockstep/tls/postgres") != pg_secret:
            bad.append(f"Deployment does not mount {pg_secret} at /etc/lockstep/tls/postgres")
        if job.get("/etc/lockstep/tls/postgres") != pg_secret:
            bad.append(f"migration Job does not mount {pg_secret} at /etc/lockstep/tls/postgres")
        for k, v in expect_cm.items():
            if cm.get(k) != v:
                bad.append(f"ConfigMap {k}={cm.get(k)!r}, expected {v!r}")
        if bad:
            fail(f"{where}: " + "; ".join(bad))
        else:
            ok(f"{where}: Redis and Postgres TLS Secrets mounted where the settings point")

    check("k8s/", plain_docs, "lockstep-redis-tls", "lockstep-postgres-tls", {})
    tls = [(n, d) for n, d in renders if n.endswith("tls-values.yaml")]
    if not tls:
        fail("no helm/lockstep/ci/tls-values.yaml render")
    for name, docs in tls:
        check(f"helm ({name})", docs, "lockstep-redis-tls", "lockstep-postgres-tls", {
            "LOCKSTEP_REDIS_TLS_CA": "/etc/lockstep/tls/redis/ca.crt",
            "LOCKSTEP_REDIS_TLS_CERT": "/etc/lockstep/tls/redis/tls.crt",
            "LOCKSTEP_REDIS_TLS_KEY": "/etc/lockstep/tls/redis/tls.key",
        })


def main() -> int:
    plain = check_plain_manifests()
    check_kustomize()
    renders = check_chart()
    check_env_coverage(plain, renders)
    check_metrics()
    check_rules_and_dashboard()
    check_drain(plain, renders)
    check_tls(plain, renders)
    print(f"{passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

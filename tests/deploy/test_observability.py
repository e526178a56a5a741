"""The Prometheus configuration, the alerts and the Grafana dashboard, checked offline.

Grafana itself cannot be had here, so its provisioned dashboard is checked instead: its
structure (what Grafana needs to load it), its datasource (the provisioned one), and every
PromQL expression of it and of the alerts: valid PromQL (``promtool check rules`` on a rules
file made of them) that names only metrics the code really exports and jobs the scrape
configuration really has.

promtool comes from the PATH, else from the offline Prometheus image
(``deploy/offline/build-debian-image.sh prometheus``, built here when missing, as the
compose test would).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from api.metrics import ApiMetrics, _Fleet
from workers import metrics as worker_metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "actfleet-dashboard.json"
PROMETHEUS_IMAGE = os.environ.get("ACTFLEET_PROMETHEUS_IMAGE", "actfleet/prometheus:bookworm")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "and", "or", "unless", "on",
    "ignoring", "group_left", "group_right", "bool", "offset", "rate", "irate", "increase",
    "deriv", "delta", "absent", "vector", "scalar", "histogram_quantile", "clamp_min",
    "topk", "bottomk", "time", "le", "inf", "nan",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every sample name the API's and the workers' /metrics can show."""
    families: list[Metric] = [
        *REGISTRY.collect(),  # workers.metrics registers there (imported above)
        *ApiMetrics().registry.collect(),
        *_Fleet({"completed": 1}, 0, 0).collect(),
    ]
    assert worker_metrics.TASKS_FINISHED is not None
    return {f.name + s for f in families for s in SUFFIXES[f.type]}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label matchers, groupings, ranges and
    function names left out)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\(?))", text):
        word, call = m.group(0), m.group(1)
        if call or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def job_matchers(expr: str) -> set[str]:
    return set(re.findall(r'job\s*=\s*"([^"]+)"', expr))


def scrape_jobs() -> set[str]:
    compose = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in compose["scrape_configs"]}
    # on Kubernetes the job label is actfleet-<component> (prometheus-kubernetes.yml)
    assert {"actfleet-api", "actfleet-worker"} <= jobs
    return jobs


def panels(dashboard: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def promtool() -> list[str]:
    """The command that runs promtool with /work as the folder given to ``run``."""
    if shutil.which("promtool"):
        return ["promtool"]
    if os.environ.get("ACTFLEET_SKIP_DOCKER") == "1":
        pytest.skip("no promtool on PATH and ACTFLEET_SKIP_DOCKER=1")
    if subprocess.run(
        ["docker", "image", "inspect", PROMETHEUS_IMAGE], capture_output=True
    ).returncode:
        build = subprocess.run(
            [str(DEPLOY / "offline" / "build-debian-image.sh"), "prometheus"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert build.returncode == 0, build.stderr[-3000:]
    return ["docker", "run", "--rm", "--network", "none", "--entrypoint", "promtool"]


def run_promtool(promtool: list[str], folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    for f in [folder, *folder.iterdir()]:
        f.chmod(0o755 if f.is_dir() else 0o644)  # the image's promtool is not root
    if promtool == ["promtool"]:
        cmd = [*promtool, *(a.replace("/work", str(folder)) for a in args)]
    else:
        cmd = [*promtool[:-2], "-v", f"{folder}:/work:ro", *promtool[-2:], PROMETHEUS_IMAGE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_alerts_and_both_scrape_configs_pass_promtool(promtool: list[str], tmp_path: Path) -> None:
    for name in ("prometheus.yml", "prometheus-kubernetes.yml", "alerts.yml"):
        shutil.copy(DEPLOY / "prometheus" / name, tmp_path / name)
    for config in ("prometheus.yml", "prometheus-kubernetes.yml"):
        # the configs name /etc/prometheus/alerts.yml, where compose mounts the folder
        text = (tmp_path / config).read_text().replace("/etc/prometheus/", "/work/")
        (tmp_path / config).write_text(text)
    rules = run_promtool(promtool, tmp_path, "check", "rules", "/work/alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout
    out = run_promtool(promtool, tmp_path, "check", "config", "/work/prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    # Debian builds Prometheus without Kubernetes service discovery, so its promtool refuses
    # kubernetes_sd_configs; elsewhere (or with the registry image) it checks that one too.
    out = run_promtool(promtool, tmp_path, "check", "config", "/work/prometheus-kubernetes.yml")
    if "field kubernetes_sd_configs not found" not in out.stdout + out.stderr:
        assert out.returncode == 0, out.stdout + out.stderr


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling (the keep and replace actions), or None when dropped."""
    out = dict(labels)
    for c in configs:
        value = c.get("separator", ";").join(out.get(n, "") for n in c["source_labels"])
        m = re.fullmatch(c.get("regex", "(.*)"), value)
        action = c.get("action", "replace")
        if action == "keep":
            if not m:
                return None
        elif action == "replace":
            if m:
                out[c["target_label"]] = m.expand(
                    re.sub(r"\$(\d+)", r"\\\1", c.get("replacement", "$1"))
                )
        else:
            raise AssertionError(f"relabel() does not implement {action}")
    return out


def test_kubernetes_scrape_config_finds_the_pods_of_the_manifests() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    for name in ("api", "worker"):
        (dep,) = [
            d for d in yaml.safe_load_all((DEPLOY / "k8s" / "base" / f"{name}.yaml").read_text())
            if d and d["kind"] == "Deployment"
        ]  # fmt: skip
        meta = dep["spec"]["template"]["metadata"]
        # what Kubernetes service discovery gives Prometheus for one of its pods
        pod = {
            "__address__": "10.1.2.3:8000",
            "__metrics_path__": "/metrics",
            "__meta_kubernetes_namespace": "actfleet",
            "__meta_kubernetes_pod_name": f"{name}-abc",
            **{
                "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-z0-9]", "_", k): v
                for k, v in meta["annotations"].items()
            },
            **{
                "__meta_kubernetes_pod_label_" + re.sub(r"[^a-z0-9]", "_", k): v
                for k, v in meta["labels"].items()
            },
        }
        target = relabel(pod, job["relabel_configs"])
        assert target is not None, f"the {name} pods are not scraped"
        port = meta["annotations"]["prometheus.io/port"]
        assert target["__address__"] == f"10.1.2.3:{port}"
        assert target["__metrics_path__"] == meta["annotations"]["prometheus.io/path"]
        assert target["job"] == f"actfleet-{name}"  # the alerts' and the dashboard's jobs
    unannotated = {"__address__": "10.1.2.4:6379", "__meta_kubernetes_namespace": "actfleet"}
    assert relabel(unannotated, job["relabel_configs"]) is None


def test_every_dashboard_expression_is_valid_promql(promtool: list[str], tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    rules: dict[str, Any] = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "5m")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    out = run_promtool(promtool, tmp_path, "check", "rules", "/work/dashboard-rules.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    # ... and the check is real: a broken expression fails it
    rules["groups"][0]["rules"].append({"record": "dashboard:broken", "expr": "sum(rate(x[5m])"})
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    assert run_promtool(
        promtool, tmp_path, "check", "rules", "/work/dashboard-rules.yml"
    ).returncode


def test_dashboard_and_alerts_name_only_metrics_the_code_exports() -> None:
    exported = exported_names() | {"up"}
    jobs = scrape_jobs()
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, (
            f"{expr!r} names {sorted(names - exported)}, which nothing exports"
        )
        assert job_matchers(expr) <= jobs, expr
        used |= names
    # the headline metrics (workers/metrics.py) are all on the dashboard
    assert {
        "actfleet_tasks_finished_total",
        "actfleet_task_duration_seconds_bucket",
        "actfleet_llm_request_seconds_bucket",
        "actfleet_sandbox_acquire_seconds_bucket",
        "actfleet_queue_depth",
        "actfleet_tasks_running",
    } <= used


def test_metric_name_extraction_sees_a_misspelt_metric() -> None:
    expr = 'sum by (status) (rate(actfleet_task_finished_total{status="error"}[5m])) / on() up'
    assert metric_names(expr) == {"actfleet_task_finished_total", "up"}
    assert "actfleet_task_finished_total" not in exported_names()


def test_dashboard_is_loadable_and_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for key in ("uid", "title", "panels", "schemaVersion", "time"):
        assert key in dashboard, key
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    (prom,) = [d for d in datasources if d["type"] == "prometheus"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "actfleet.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")

    # a panel names the provisioned datasource, or a datasource variable of its type
    variables = {
        f"${{{v['name']}}}" for v in dashboard.get("templating", {}).get("list", [])
        if v["type"] == "datasource" and v["query"] == "prometheus"
    }  # fmt: skip
    ours = {prom["uid"], *variables}

    ids = []
    for p in panels(dashboard):
        ids.append(p["id"])
        assert {"type", "title", "gridPos"} <= set(p), p.get("title")
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] in ours, p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t.get("refId"), p["title"]
            assert t.get("datasource", p["datasource"])["uid"] in ours, p["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

"""deploy/k8s: every manifest of both overlays against the Kubernetes schemas, offline.

The overlays (``keda``, ``hpa``) only add resources to ``base`` (no patches), so rendering
one is loading its ``resources`` (files, or folders with a kustomization of their own) and
setting the namespace: ``render`` does that, and where a kustomize of v4 or later is on
the machine (``kubectl kustomize``) its output is compared with ours. Debian's
kubernetes-client (kubectl 1.20, kustomize v2.0.3) cannot load a folder from
``resources``, and no newer renderer installs from the package registries.

Built-in kinds go through ``kubernetes-validate`` in strict mode (an unknown field is an
error). The KEDA ScaledObject goes through the JSON schema of the pydantic models that
``cloudcoil-models-keda`` generates from KEDA's CRDs, made strict the way the API server
prunes: an object with declared properties accepts no other.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from store.keys import TASK_QUEUE

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ("keda", "hpa")
# Native sidecars (the dind init container with restartPolicy: Always) need 1.29.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
KEDA_MODELS_VERSION = "2.16.1"  # cloudcoil-models-keda 2.16.1.x: KEDA 2.16.1's CRDs
NAMESPACED = {
    "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment", "PodDisruptionBudget",
    "NetworkPolicy", "HorizontalPodAutoscaler", "ScaledObject",
}  # fmt: skip


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(folder: Path) -> list[dict[str, Any]]:
    """What ``kustomize build folder`` gives for a kustomization of resources and a
    namespace (the only fields ours use; anything else is refused, not ignored)."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "namespace", "resources"}
    assert not unknown, f"{folder}: render() does not implement {unknown}"
    docs: list[dict[str, Any]] = []
    for entry in kust["resources"]:
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else load_docs(path)
    for doc in docs:
        if "namespace" in kust and doc["kind"] in NAMESPACED:
            doc.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def strict(schema: Any) -> Any:
    """``additionalProperties: false`` on every object that lists its properties."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def scaledobject_schema() -> dict[str, Any]:
    from importlib.metadata import version

    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    assert version("cloudcoil-models-keda").startswith(KEDA_MODELS_VERSION)
    return strict(ScaledObject.model_json_schema(by_alias=True))


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / request.param)


@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_every_builtin_manifest_is_valid_for_kubernetes(
    overlay: tuple[str, list[dict[str, Any]]], k8s_version: str
) -> None:
    _, docs = overlay
    builtin = [d for d in docs if d["kind"] != "ScaledObject"]
    assert len(builtin) >= 15
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_strict_validation_refuses_an_unknown_field() -> None:
    (worker,) = by_kind(render(K8S / "hpa"), "Deployment", "worker")
    bad = copy.deepcopy(worker)
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


def test_scaledobject_matches_the_keda_schema_and_the_queue(
    scaledobject_schema: dict[str, Any],
) -> None:
    docs = render(K8S / "keda")
    (so,) = by_kind(docs, "ScaledObject")
    jsonschema.validate(so, scaledobject_schema)
    # ... and a typo would not pass
    bad = copy.deepcopy(so)
    bad["spec"]["minReplicas"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, scaledobject_schema)

    # it scales the worker Deployment on the Celery queue, at one loop per waiting task
    target = so["spec"]["scaleTargetRef"]
    assert by_kind(docs, target.get("kind", "Deployment"), target["name"])
    assert target["name"] == "worker"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == TASK_QUEUE
    (config,) = by_kind(docs, "ConfigMap", "actfleet-config")
    assert trigger["metadata"]["listLength"] == config["data"]["ACTFLEET_WORKER_CONCURRENCY"]
    host = trigger["metadata"]["address"].split(".", 1)[0]
    assert by_kind(docs, "Service", host), "the trigger's address names the Redis Service"
    assert re.match(r"redis://redis[:.]", config["data"]["ACTFLEET_REDIS_URL"])


def test_one_autoscaler_per_overlay() -> None:
    keda, hpa = render(K8S / "keda"), render(K8S / "hpa")
    assert len(by_kind(keda, "ScaledObject")) == 1 and not by_kind(keda, "HorizontalPodAutoscaler")
    assert len(by_kind(hpa, "HorizontalPodAutoscaler")) == 1 and not by_kind(hpa, "ScaledObject")


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return dict(doc["spec"]["template"]["metadata"]["labels"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_worker_grace_period_outlasts_its_shutdown_grace() -> None:
    docs = render(K8S / "hpa")
    (config,) = by_kind(docs, "ConfigMap", "actfleet-config")
    (worker,) = by_kind(docs, "Deployment", "worker")
    grace_s = float(config["data"]["ACTFLEET_WORKER_SHUTDOWN_GRACE_S"])
    assert (
        worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= grace_s + 20
    )  # the grace, 15 s for the hand-backs, a margin


def test_budgets_policies_and_scrape_annotations_select_the_real_pods() -> None:
    docs = render(K8S / "keda")
    pods = {
        d["metadata"]["name"]: pod_labels(d)
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert [n for n, labels in pods.items() if selects(pdb["spec"]["selector"], labels)] == [
            pdb["metadata"]["name"]
        ]
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for name in ("api", "worker", "redis"):
        assert [
            n for n, labels in pods.items() if selects(policies[name]["podSelector"], labels)
        ] == [name]
    # the worker reaches no private address outside the rules that name a peer
    (public,) = [r for r in policies["worker"]["egress"] if "ipBlock" in r["to"][0]]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(
        public["to"][0]["ipBlock"]["except"]
    )
    for name in ("api", "worker"):
        (dep,) = by_kind(docs, "Deployment", name)
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        ports = {
            p["containerPort"]
            for c in dep["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        assert notes["prometheus.io/scrape"] == "true" and int(notes["prometheus.io/port"]) in ports


def test_sandboxes_get_no_network_in_the_cluster() -> None:
    docs = render(K8S / "keda")
    (config,) = by_kind(docs, "ConfigMap", "actfleet-config")
    assert config["data"]["ACTFLEET_SANDBOX_ALLOW_NETWORK"] == "false"
    (worker,) = by_kind(docs, "Deployment", "worker")
    (dind,) = [
        c for c in worker["spec"]["template"]["spec"]["initContainers"] if c["name"] == "dind"
    ]
    assert "--bridge=none" in dind["args"] and "--iptables=false" in dind["args"]


def kustomize_v4_or_later() -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    m = re.search(r"Kustomize Version: v(\d+)", out)
    return [kubectl, "kustomize"] if m and int(m.group(1)) >= 4 else None


@pytest.mark.parametrize("name", OVERLAYS)
def test_render_agrees_with_kustomize_where_one_is_installed(name: str) -> None:
    cmd = kustomize_v4_or_later()
    if cmd is None:
        pytest.skip("no kustomize >= v4 here (none installs from the package registries)")
    proc = subprocess.run([*cmd, str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    theirs = [d for d in yaml.safe_load_all(proc.stdout) if d]

    def key(d: dict[str, Any]) -> tuple[str, str, str]:
        return d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "")

    assert sorted(map(key, theirs)) == sorted(map(key, render(K8S / name)))
    assert sorted(theirs, key=key) == sorted(render(K8S / name), key=key)

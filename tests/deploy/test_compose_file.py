"""docker-compose.yml and docker-compose.offline.yml as written, without running them
(tests/e2e/test_compose.py brings the stack up): what Debian's docker-compose 1.29 accepts,
host ports a test or a second stack can move, the grace periods the worker needs, and an
offline override that points at the images the offline build makes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
OFFLINE = yaml.safe_load((REPO / "docker-compose.offline.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def default_of(value: str) -> str:
    """``${VAR:-default}`` -> ``default``."""
    m = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    assert m, f"{value!r} is not ${{VAR:-default}}"
    return m.group(1)


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", duration)
    assert m, duration
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def test_compose_1_29_accepts_the_top_level_keys() -> None:
    assert set(COMPOSE) <= {"services", "volumes", "networks", "x-actfleet-env", "x-actfleet-image"}
    assert "name" not in COMPOSE and "version" not in COMPOSE


def test_every_published_port_is_an_env_var_defaulting_to_the_documented_one() -> None:
    documented = {"api": "8000", "fake-llm": "8900", "prometheus": "9090", "grafana": "3000"}
    published = {}
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            m = re.fullmatch(r"(\$\{[^}]*\}):(\$\{[^}]*\}):(\d+)", port)
            assert m, f"{name}: {port!r} is not ${{ADDR}}:${{PORT}}:container"
            addr, host, container = m.groups()
            assert default_of(addr) == "0.0.0.0", port
            published[name] = default_of(host)
            assert container == documented[name], port
    assert published == documented


def test_the_stack_needs_no_grafana_and_the_fake_model_only_for_demos() -> None:
    profiles = {n: s.get("profiles") for n, s in SERVICES.items()}
    assert profiles.pop("grafana") == ["grafana"]
    assert profiles.pop("fake-llm") == ["demo"]
    assert set(profiles.values()) == {None}  # redis, api, worker, prometheus: always


def test_worker_grace_and_health() -> None:
    worker = SERVICES["worker"]
    grace_s = float(default_of(worker["environment"]["ACTFLEET_WORKER_SHUTDOWN_GRACE_S"]))
    assert (
        seconds(default_of(worker["stop_grace_period"])) >= grace_s + 20
    )  # the grace, 15 s for the hand-backs, a margin
    probe = " ".join(worker["healthcheck"]["test"])
    assert "127.0.0.1:9101/healthz" in probe
    assert worker["environment"]["ACTFLEET_WORKER_METRICS_PORT"] == "9101"
    assert "/readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])
    for name in ("redis", "api", "worker", "prometheus"):
        assert "healthcheck" in SERVICES[name], name


def test_redis_refuses_writes_when_full_rather_than_evicting_tasks() -> None:
    cmd = SERVICES["redis"]["command"]
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert flags["--maxmemory-policy"] == "noeviction"
    assert (flags["--appendonly"], flags["--appendfsync"]) == ("yes", "everysec")
    assert (
        flags["--protected-mode"] == "no"
    )  # Debian's build keeps it on; the port is not published
    assert "ports" not in SERVICES["redis"]


def test_offline_override_uses_the_images_the_offline_build_makes() -> None:
    assert set(OFFLINE["services"]) == {"redis", "prometheus"}
    script = (REPO / "deploy" / "offline" / "build-debian-image.sh").read_text()
    for name, svc in OFFLINE["services"].items():
        assert set(svc) == {"image"}
        image = default_of(svc["image"])
        assert f"{image}}}" in script, f"build-debian-image.sh {name} does not build {image}"
    build_all = (REPO / "deploy" / "build-offline-images.sh").read_text()
    for step in (
        "sandbox_images/build.sh",
        "deploy/build-service-image.sh",
        'build-debian-image.sh" redis',
        'build-debian-image.sh" prometheus',
    ):
        assert step in build_all, step


def compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.offline.yml"]]
)
def test_docker_compose_renders_it_with_moved_ports(files: list[str]) -> None:
    cmd = compose()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/docker.sh installs it")
        pytest.skip("no docker-compose here")
    env = dict(
        os.environ,
        ACTFLEET_PUBLISH_ADDR="127.0.0.1",
        ACTFLEET_API_PORT="18001",
        ACTFLEET_PROMETHEUS_PORT="18002",
    )
    args = [*cmd, "-p", "actfleet-config-test"]
    for f in files:
        args += ["-f", str(REPO / f)]
    proc = subprocess.run(
        [*args, "--profile", "demo", "config"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    rendered = yaml.safe_load(proc.stdout)["services"]
    assert rendered["api"]["ports"] == ["127.0.0.1:18001:8000/tcp"] or rendered["api"]["ports"][0][
        "published"
    ] in (18001, "18001")
    images = {n: s["image"] for n, s in rendered.items()}
    offline = len(files) == 2
    assert images["redis"] == ("actfleet/redis:bookworm" if offline else "redis:7")
    assert images["prometheus"].startswith("actfleet/prometheus" if offline else "prom/prometheus")

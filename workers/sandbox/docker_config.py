"""What a sandbox container is made of: the labels, the server's hardening settings and the
``create_container`` arguments. Pure functions and frozen data; no I/O.

None of this is chosen by the model: a task spec's ``sandbox`` section only selects an allowed
image and resources within ``Hardening``'s caps (``DockerProvider.request_for``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import docker
from docker.types import LogConfig, Ulimit

from agent.models import SandboxSpec

# Labels on every sandbox container: the reaper's only source of truth.
LABEL_SANDBOX = "actfleet.sandbox"  # "1": made by actfleet
LABEL_TASK = "actfleet.task"  # the task id ("" while waiting in a warm pool)
LABEL_WORKER = "actfleet.worker"  # the worker that owns it
LABEL_EXPIRES = "actfleet.expires"  # unix seconds after which it may be removed
LABEL_POOL = "actfleet.pool"  # "1" if it was pre-started for a warm pool
LABEL_FLEET = "actfleet.fleet"  # the deployment (Settings.fleet): a reaper reaps only its own

DEFAULT_IMAGE = "actfleet-sandbox:latest"
WORKDIR = "/work"
SANDBOX_USER = "10001:10001"

_MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Hardening:
    """Server-side limits and settings every sandbox container gets (never from a task)."""

    pids_limit: int = 256
    workdir_mb: int = 256  # tmpfs at /work: the only writable place besides /tmp
    workdir_files: int = 10_000  # files and directories /work may hold (its inodes)
    tmp_mb: int = 64
    shm_mb: int = 16
    nofile: int = 1024
    fsize_mb: int = 256  # largest file a process may write
    log_max_size: str = "1m"
    user: str = SANDBOX_USER
    max_memory_mb: int = 4096  # caps on what a task spec may ask for (more is refused)
    max_cpus: float = 4.0
    network_name: str = "actfleet-sandbox"  # bridge without inter-container traffic


@dataclass(frozen=True, slots=True)
class ContainerRequest:
    """What a container is made of; also the warm pool's key."""

    image: str
    network: bool = False
    memory_mb: int = SandboxSpec().memory_mb
    cpus: float = SandboxSpec().cpus


def container_config(
    request: ContainerRequest,
    *,
    name: str,
    labels: dict[str, str],
    hardening: Hardening,
    api: docker.APIClient,
) -> dict[str, Any]:
    """Keyword arguments for ``APIClient.create_container``: the hardened container."""
    mount_opts = f"rw,nosuid,nodev,uid={_uid(hardening.user)},gid={_gid(hardening.user)}"
    host_config = api.create_host_config(
        network_mode=hardening.network_name if request.network else "none",
        read_only=True,
        tmpfs={
            WORKDIR: f"{mount_opts},size={hardening.workdir_mb}m,"
            f"nr_inodes={hardening.workdir_files},mode=0700",
            "/tmp": f"{mount_opts},noexec,size={hardening.tmp_mb}m,mode=1777",
        },
        shm_size=hardening.shm_mb * _MB,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],  # seccomp: the daemon's default profile
        privileged=False,
        pids_limit=hardening.pids_limit,
        mem_limit=request.memory_mb * _MB,
        memswap_limit=request.memory_mb * _MB,  # == memory: no swap
        nano_cpus=int(request.cpus * 1e9),
        ulimits=[
            Ulimit(name="nofile", soft=hardening.nofile, hard=hardening.nofile),
            Ulimit(name="fsize", soft=hardening.fsize_mb * _MB, hard=hardening.fsize_mb * _MB),
        ],
        log_config=LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": hardening.log_max_size, "max-file": "1"},
        ),
        init=True,
        ipc_mode="private",
        oom_score_adj=500,  # under host memory pressure, a sandbox goes before the worker
        auto_remove=False,  # we read OOMKilled from the dead container, then remove it
        mounts=[],
        binds=[],
    )
    return {
        "image": request.image,
        "name": name,
        "user": hardening.user,
        "working_dir": WORKDIR,
        "stdin_open": True,
        "tty": False,
        "hostname": "sandbox",
        "environment": {},
        "labels": labels,
        "host_config": host_config,
    }


def _uid(user: str) -> str:
    return user.split(":", 1)[0]


def _gid(user: str) -> str:
    parts = user.split(":", 1)
    return parts[1] if len(parts) > 1 else parts[0]

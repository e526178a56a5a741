"""Sandbox backends behind ``agent.sandbox.SandboxProvider``.

``bwrap``: one runner process per task under bubblewrap (local, fast, no daemon).
``docker``: one hardened container per task, with a warm pool and a reaper (production).
Both speak the same framed protocol to the same runner (``protocol.py``) and share one
session layer (``session.py``: restarts, files and setup_code, the wording the model reads),
so that the same fault gives the same outcome on either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.sandbox import SandboxProvider
    from config.settings import Settings


def make_provider(settings: Settings, worker_id: str) -> SandboxProvider:
    """The provider that ``settings.sandbox`` names, configured from ``settings``."""
    if settings.sandbox == "docker":
        from workers.sandbox.docker import DockerProvider
        from workers.sandbox.docker_config import Hardening

        return DockerProvider(
            worker_id=worker_id,
            image=settings.sandbox_image,
            allow_network=settings.sandbox_allow_network,
            pool_min_size=settings.pool_min,
            pool_max_size=settings.pool_max,
            pool_idle_ttl_s=settings.pool_idle_s,
            pool_max_age_s=settings.pool_max_age_s,
            hardening=Hardening(
                workdir_mb=settings.sandbox_work_mb,
                workdir_files=settings.sandbox_work_files,
                max_memory_mb=settings.sandbox_max_memory_mb,
                max_cpus=settings.sandbox_max_cpus,
            ),
            fleet=settings.fleet,
        )
    from workers.sandbox.bwrap import BwrapProvider

    return BwrapProvider(
        pool_min_size=settings.pool_min,
        pool_max_size=settings.pool_max,
        pool_idle_ttl_s=settings.pool_idle_s,
        pool_max_age_s=settings.pool_max_age_s,
        allow_network=settings.sandbox_allow_network,
        work_mb=settings.sandbox_work_mb,
        work_files=settings.sandbox_work_files,
        max_memory_mb=settings.sandbox_max_memory_mb,
        max_cpus=settings.sandbox_max_cpus,
        zygote=settings.bwrap_zygote,
    )

"""The server's caps on what a task's ``sandbox`` section may ask for, as both backends
enforce them. The API refuses such a task at submission (``api.bodies.spec_rules``); a
backend refuses it again, for a task queued before the caps were lowered."""

from __future__ import annotations

from agent.models import SandboxSpec


def over_caps(asked: SandboxSpec, max_memory_mb: int | None, max_cpus: float | None) -> str | None:
    """Why ``asked`` is more than the caps (None: no cap), or None if it is not."""
    if max_memory_mb is not None and asked.memory_mb > max_memory_mb:
        return (
            f"sandbox.memory_mb: {asked.memory_mb} is over this server's cap of "
            f"{max_memory_mb} MB (ACTFLEET_SANDBOX_MAX_MEMORY_MB)"
        )
    if max_cpus is not None and asked.cpus > max_cpus:
        return (
            f"sandbox.cpus: {asked.cpus:g} is over this server's cap of {max_cpus:g} "
            "(ACTFLEET_SANDBOX_MAX_CPUS)"
        )
    return None


def refusal(
    asked: SandboxSpec, allow_network: bool, max_memory_mb: int | None, max_cpus: float | None
) -> str | None:
    """Why a backend refuses a task's ``sandbox`` section (``SandboxRefused``), or None:
    network access this server does not give, or more than its caps."""
    if asked.network and not allow_network:
        return "sandbox.network: this server does not give tasks network access"
    return over_caps(asked, max_memory_mb, max_cpus)

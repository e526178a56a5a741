"""Per-sandbox cgroups (v1 memory and pids controllers) for the bwrap backend.

rlimits are per process: a sandbox that forks could hold its memory limit once per process.
A cgroup caps the whole sandbox. Each sandbox gets ``<own cgroup>/actfleet/<name>`` under
the memory and pids hierarchies, nested in the worker's own cgroup so the worker's limits
still apply. The sandbox joins it with ``join_command``: a shell that writes its own pid
into the cgroups and then execs the rest of the command, so nothing the sandbox starts can
run outside it. Where cgroup v1 is not mounted or not writable, ``Cgroups.detect`` returns
None and the sandbox keeps its rlimits only.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where this process's sandbox cgroups live, one base directory per controller."""

    bases: dict[str, Path]

    @classmethod
    def detect(cls, root: Path = ROOT) -> Cgroups | None:
        bases = {}
        for controller in CONTROLLERS:
            own = _own_path(controller)
            hierarchy = root / controller
            if own is None or not (hierarchy / "cgroup.procs").exists():
                return None
            base = hierarchy / own.lstrip("/") / "actfleet"
            try:
                base.mkdir(exist_ok=True)
            except OSError:
                return None
            if not os.access(base, os.W_OK):
                return None
            bases[controller] = base
        found = cls(bases)
        found.remove_stale()
        return found

    def create(self, name: str, memory_bytes: int, pids_max: int) -> list[Path]:
        """Make the sandbox's cgroups; returns the ``cgroup.procs`` files to join."""
        memory = self.bases["memory"] / name
        pids = self.bases["pids"] / name
        memory.mkdir()
        pids.mkdir()
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):  # only with swap accounting
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(pids_max))
        return [memory / "cgroup.procs", pids / "cgroup.procs"]

    def oom_killed(self, name: str) -> bool:
        """Did the kernel kill a process of this sandbox for memory?"""
        try:
            text = (self.bases["memory"] / name / "memory.oom_control").read_text()
        except OSError:
            return False
        fields = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        return int(fields.get("oom_kill", "0")) > 0

    def remove(self, name: str, wait_s: float = 2.0) -> None:
        """Remove the sandbox's cgroups once its processes are gone (best effort)."""
        deadline = time.monotonic() + wait_s
        for base in self.bases.values():
            path = base / name
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)

    def remove_stale(self) -> None:
        """Empty cgroups left by a worker that died (rmdir fails on one still in use)."""
        for base in self.bases.values():
            for path in base.iterdir():
                if path.is_dir():
                    with contextlib.suppress(OSError):
                        path.rmdir()


def join_command(procs_files: list[Path], command: list[str]) -> list[str]:
    """``command``, started inside the cgroups whose ``cgroup.procs`` files are given."""
    writes = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(procs_files)))
    script = f'{writes} && shift {len(procs_files)} && exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *map(str, procs_files), *command]


def _own_path(controller: str) -> str | None:
    """This process's cgroup path in a v1 hierarchy, from /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None

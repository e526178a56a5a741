"""Per-sandbox cgroups (v1 memory and pids controllers) for the bwrap backend, and the two
CPU cgroups that all of them share.

rlimits are per process: a sandbox that forks could hold its memory limit once per process.
A cgroup caps the whole sandbox. Each sandbox gets ``<own cgroup>/actfleet/<name>`` under
the memory and pids hierarchies, nested in the worker's own cgroup so the worker's limits
still apply. The sandbox joins it with ``join_command``: a shell that writes its own pid
into the cgroups and then execs the rest of the command, so nothing the sandbox starts can
run outside it. Where cgroup v1 is not mounted or not writable, ``Cgroups.detect`` returns
None and the sandbox keeps its rlimits only.

CPU: sandboxes run niced, but with the kernel's autogroup scheduling (the default on many
distributions) nice only ranks processes within one session, and every sandbox starts its
own session, so each sandbox weighed as much as the whole fleet. Where the v1 ``cpu``
controller is writable, sandboxes instead join one of two CPU groups beside the worker
(autogroup does not apply outside the root group):

- ``<own cpu cgroup>/actfleet`` (``cpu.shares`` a tenth of the default) while a sandbox
  starts ahead of demand for the warm pool, and once it is being killed: a wave of refills,
  or the kernel's teardown of a wave of finished sandboxes, yields to everything else;
- ``<own cpu cgroup>/actfleet-busy`` (the default weight) from the moment a task has it:
  all busy sandboxes together weigh as much as one worker thread, so code that spins cannot
  starve the fleet, yet a runner woken with a task's code gets a core promptly (its wait
  for one counts against the task, as time spent neither in the model nor in the code).

Both are priorities, not caps: idle CPU is theirs.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")
STALE_AFTER_S = 60.0  # an empty sandbox cgroup this old is no sibling's just-made one
WARM_CPU_SHARES = 102  # of the default 1024: the weight of nice 10 against nice 0
BUSY_CPU_SHARES = 1024  # every busy sandbox together: one worker thread's weight


@dataclass(frozen=True, slots=True)
class CpuGroups:
    """The ``cgroup.procs`` files of the two shared CPU groups."""

    warm: Path  # sandboxes starting for the warm pool, and dying ones
    busy: Path  # sandboxes a task holds

    @staticmethod
    def move(pids: list[int], procs: Path) -> None:
        """Move these processes into the group of ``procs`` (one of the two); a process
        gone meanwhile is skipped. What they start later starts there."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                procs.write_text(str(pid))


@dataclass(frozen=True, slots=True)
class Cgroups:
    """Where this process's sandbox cgroups live, one base directory per controller."""

    bases: dict[str, Path]
    cpu: CpuGroups | None = None  # None: the v1 cpu controller is not writable here

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
        found = cls(bases, _cpu_groups(root))
        found.remove_stale()
        return found

    def create(self, name: str, memory_bytes: int, pids_max: int) -> list[Path]:
        """Make the sandbox's memory and pids cgroups; returns their ``cgroup.procs``
        files, to join with one of ``cpu``'s."""
        memory = self.bases["memory"] / name
        pids = self.bases["pids"] / name
        memory.mkdir()
        pids.mkdir()
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):  # only with swap accounting
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (pids / "pids.max").write_text(str(pids_max))
        return [memory / "cgroup.procs", pids / "cgroup.procs"]

    def members(self, name: str) -> list[int]:
        """The pids of every process the sandbox has now (its pids cgroup's members)."""
        try:
            text = (self.bases["pids"] / name / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

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

    def remove_stale(self, older_than_s: float = STALE_AFTER_S) -> None:
        """Empty cgroups left by a worker that died. A sibling worker in the same cgroup
        makes a sandbox's cgroups a moment before the sandbox joins them, so an empty one
        is stale only once it is older than ``older_than_s``; one in use refuses rmdir."""
        cutoff = time.time() - older_than_s
        for base in self.bases.values():
            for path in base.iterdir():
                with contextlib.suppress(OSError):
                    if path.is_dir() and path.stat().st_mtime < cutoff:
                        path.rmdir()


def _cpu_groups(root: Path) -> CpuGroups | None:
    """The warm and busy CPU groups beside this process's own; None where the v1 cpu
    controller is not mounted or not writable."""
    own = _own_path("cpu")
    hierarchy = root / "cpu"
    if own is None or not (hierarchy / "cgroup.procs").exists():
        return None
    parent = hierarchy / own.lstrip("/")
    procs = []
    try:
        for name, shares in (("actfleet", WARM_CPU_SHARES), ("actfleet-busy", BUSY_CPU_SHARES)):
            group = parent / name
            group.mkdir(exist_ok=True)
            (group / "cpu.shares").write_text(str(shares))
            procs.append(group / "cgroup.procs")
    except OSError:
        return None
    return CpuGroups(*procs)


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

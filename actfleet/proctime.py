"""CPU time of process trees, read from ``/proc``: what ``actfleet bench fleet`` charges.

A process's ``utime + stime`` (every thread) is its own CPU; its ``cutime + cstime`` is
that of the children it has waited for, their own reaped children included. So a tree's
CPU at one instant is, over its live processes, the sum of both: a child that has exited
and been reaped has moved into its parent's ``cutime`` and is counted once either way.
What a tree's processes hand to processes outside it (a Docker daemon running a
container, a double-forked daemon reparented to init) is not in it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class TreeCPU:
    own_s: float  # the root process itself
    descendants_s: float  # everything below it: live descendants and the ones reaped

    @property
    def total_s(self) -> float:
        return self.own_s + self.descendants_s

    def __sub__(self, earlier: TreeCPU) -> TreeCPU:
        return TreeCPU(self.own_s - earlier.own_s, self.descendants_s - earlier.descendants_s)


@dataclass(frozen=True, slots=True)
class _Proc:
    ppid: int
    own_s: float
    reaped_s: float


def _processes(proc: Path) -> dict[int, _Proc]:
    table: dict[int, _Proc] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        # comm may hold spaces and parentheses: the fields start after the last ")"
        fields = raw[raw.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        table[int(entry.name)] = _Proc(ppid, (utime + stime) * _TICK_S, (cutime + cstime) * _TICK_S)
    return table


def tree_cpu(roots: Mapping[str, int], proc: Path = Path("/proc")) -> dict[str, TreeCPU]:
    """The CPU so far of each named root process's tree (a root that is gone reads 0)."""
    table = _processes(proc)
    children: dict[int, list[int]] = {}
    for pid, p in table.items():
        children.setdefault(p.ppid, []).append(pid)
    out: dict[str, TreeCPU] = {}
    for name, root in roots.items():
        if root not in table:
            out[name] = TreeCPU(0.0, 0.0)
            continue
        below = table[root].reaped_s
        stack = list(children.get(root, ()))
        while stack:
            pid = stack.pop()
            below += table[pid].own_s + table[pid].reaped_s
            stack.extend(children.get(pid, ()))
        out[name] = TreeCPU(table[root].own_s, below)
    return out

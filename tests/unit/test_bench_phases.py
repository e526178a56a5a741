"""The fleet bench's split of a task's overhead, from its records and event timestamps."""

from __future__ import annotations

from typing import Any

import pytest

from actfleet.benchfleet import capacity_figures, cpu_per_task, phase_overheads
from actfleet.fakellm import FakeLLMServer
from actfleet.proctime import TreeCPU
from agent.models import TaskSpec
from store.records import TaskRecord


def event(kind: str, ts: float, **data: float) -> dict[str, Any]:
    return {"type": kind, "turn": 1, "attempt": 1, "ts": ts, "data": data}


def test_each_phase_is_its_gap_less_the_model_and_the_code() -> None:
    # Given a task claimed at 100.0 that ran a two-turn loop against a model of 1 s latency:
    # started 2 ms after the claim; a reply the client took 1.003 s for, 4 ms after its
    # request was due; code that ran 0.5 s, reported 1 ms late; the answer; finished 6 ms on
    rec = TaskRecord(
        "t1", "ten", TaskSpec(prompt="p"), created_at=99.0, started_at=100.0, finished_at=102.521
    )
    events = [
        event("task.queued", 99.0),
        event("task.started", 100.002),
        event("llm.reply", 101.009, latency_s=1.003),  # 1.007 after the start: 4 ms of wait
        event("exec.result", 101.510, duration_s=0.5),
        event("llm.reply", 102.515, latency_s=1.001),  # 1.005 after the exec: 4 ms of wait
        event("task.finished", 102.6),  # the bench counts to finished_at, not this
    ]
    # When the phases are worked out
    phases = phase_overheads([rec], [events], latency_s=1.0)
    # Then each is what was spent besides the model and the code, in ms
    assert phases["start"]["p50"] == pytest.approx(2.0, abs=0.01)
    assert phases["model_wait"]["p50"] == pytest.approx(4.0, abs=0.01)
    assert phases["model_client"]["p95"] == pytest.approx(2.9, abs=0.01)  # 3 ms and 1 ms
    assert phases["exec"]["p50"] == pytest.approx(1.0, abs=0.01)
    assert phases["finish"]["p50"] == pytest.approx(6.0, abs=0.01)


def test_tasks_that_never_ran_are_left_out() -> None:
    queued = TaskRecord("t2", "ten", TaskSpec(prompt="p"), created_at=1.0)
    phases = phase_overheads([queued], [[event("task.queued", 1.0)]], latency_s=1.0)
    assert all(v != v for p in phases.values() for v in p.values())  # NaN: no samples


def test_cpu_per_task_splits_the_process_trees_and_adds_up() -> None:
    cpu = {
        "bench_and_fake_llm": TreeCPU(own_s=0.3, descendants_s=99.0),  # its children: the stack
        "api": TreeCPU(0.2, 0.1),
        "redis": TreeCPU(0.4, 0.0),
        "worker0": TreeCPU(1.0, 2.0),  # below a worker: its sandboxes
        "worker1": TreeCPU(1.0, 1.0),
    }
    figures = cpu_per_task(cpu, tasks=100)
    assert figures == {
        "total": 60.0,
        "workers": 20.0,
        "sandboxes": 30.0,
        "api": 3.0,
        "redis": 4.0,
        "bench_and_fake_llm": 3.0,
    }


def test_goodput_is_against_what_the_model_servers_capacity_allows() -> None:
    # given K=16 slots, T=3 turns of L=2 s: at best 16 / 6 tasks per second
    server = FakeLLMServer(capacity=16)
    server.served, server.rejected, server.peak_in_service, server.busy_s = 900, 5, 16, 1700.0
    figures = capacity_figures(
        16, 200, 3, 2.0, {"completed": 290, "error": 10}, 120.0, server, None
    )
    assert figures["goodput_ideal_tasks_per_s"] == pytest.approx(16 / 6, abs=1e-3)
    assert figures["goodput"] == pytest.approx((290 / 120) / (16 / 6), abs=1e-4)
    assert figures["error_tasks"] == 10
    assert figures["model_server"]["utilization"] == pytest.approx(1700 / (16 * 120), abs=1e-4)
    # fewer loops than slots: the loops are the bound
    few = capacity_figures(16, 4, 3, 2.0, {"completed": 10}, 10.0, server, None)
    assert few["goodput_ideal_tasks_per_s"] == pytest.approx(4 / 6, abs=1e-3)

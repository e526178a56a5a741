"""``actfleet bench fleet``: N tasks of T turns through the real API, queue, workers and
sandboxes, against ``fake-llm`` answering after L seconds, with C tasks in flight.

Figures: throughput, task latency p50/p95 (created -> finished), orchestration overhead
per turn (a task's run time not spent in the model or in user code, divided by its turns)
and efficiency = ideal time / actual time, where ideal = ceil(N / C) * T * L: what a fleet
with no overhead at all would need.

``model_server_late_ms`` is how long after L fake-llm itself sent its replies: it shares
the machine with the fleet, and its lateness counts as overhead in the figures above
(strictly: model time is taken as exactly L per call), though a remote model would not
add it.

``phase_overhead_ms`` splits the overhead by where in a task it falls (``phase_overheads``).
Two figures say where the rest goes between tasks: ``first_wave_started_s``, when the C-th
task started (after submission began), and ``dispatch_gap_ms``, how long a freed loop waits
for its next task: the k-th task to start after the first wave should start the moment the
k-th task finished, and the gap is the difference.

``cpu_ms_per_task`` is the CPU time every process the bench started used from submission
to the last finish (``actfleet.proctime``: the API, the workers and the sandboxes below
them, Redis, and this process, which runs fake-llm), divided by N. Docker sandboxes run
under the Docker daemon, outside those trees: with ``--backend docker`` they are missing.

With ``model_capacity`` K, fake-llm serves at most K requests at once and answers 429
(``Retry-After: 1``) beyond, and the workers run behind the model gate
(``ACTFLEET_MODEL_MAX_INFLIGHT``, ``model_max_inflight``, by default 2K: set too high, so the
adaptive limit must find K). ``goodput`` is completed tasks per second against the ideal
that K allows, min(K, C) / (T * L); ``model_gate`` holds the gate's and the server's figures.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any

import httpx
import redis
from rich.console import Console

from actfleet.fakellm import FakeLLMServer
from actfleet.proctime import TreeCPU, tree_cpu
from actfleet.stack import LocalStack
from config.settings import Settings
from store.apikeys import create_key
from store.keys import Keys
from store.records import TaskRecord
from workers.gatestore import RedisGateStore, server_id

MODEL_RETRY_AFTER_S = 1.0


def fleet_script(turns: int) -> list[dict[str, Any]]:
    """T model replies per task: T-1 code actions (each using the previous turn's
    variable, so sandbox state matters), then the answer."""
    if turns == 1:
        return [{"when": {}, "reply": "<solution>1</solution>"}]
    rules: list[dict[str, Any]] = [
        {"when": {"turn": 1}, "reply": "<execute>\nx = 1\nprint(x)\n</execute>"}
    ]
    for turn in range(2, turns):
        rules.append({"when": {"turn": turn}, "reply": "<execute>\nx += 1\nprint(x)\n</execute>"})
    rules.append(
        {
            "when": {"last_regex": r"Observation:\s*(?P<out>\S+)"},
            "reply": "<solution>{out}</solution>",
        }
    )
    return rules


def _wait_for_pools(r: redis.Redis, keys: Keys, workers: int, size: int) -> None:
    """Until every worker reports ``size`` idle sandboxes (its status key), or 120 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = [r.get(k) for k in r.scan_iter(keys.worker("*"))]
        idle = [json.loads(s).get("pool_idle", 0) for s in statuses if s]
        if len(idle) >= workers and min(idle) >= size:
            return
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def p50_p95_ms(seconds: list[float]) -> dict[str, float]:
    return {q: round(percentile(seconds, f) * 1000, 2) for q, f in (("p50", 0.5), ("p95", 0.95))}


def run_fleet_bench(
    settings: Settings,
    *,
    tasks: int,
    turns: int,
    latency_s: float,
    concurrency: int,
    workers: int = 1,
    warm_pool: bool = True,
    model_capacity: int | None = None,
    model_max_inflight: int | None = None,
    progress: Console | None = None,
) -> dict[str, Any]:
    if tasks < 1 or turns < 1 or concurrency < 1 or latency_s < 0:
        raise ValueError("tasks, turns and concurrency must be >= 1 and latency >= 0")
    if model_capacity is not None and model_max_inflight is None:
        model_max_inflight = 2 * model_capacity
    say = progress.print if progress else (lambda *a, **k: None)
    with FakeLLMServer(
        script=fleet_script(turns),
        latency_s=latency_s,
        capacity=model_capacity,
        retry_after_s=MODEL_RETRY_AFTER_S,
    ) as llm:
        env = {
            "OPENAI_BASE_URL": llm.url,
            "OPENAI_API_KEY": "bench",
            "ACTFLEET_SANDBOX": settings.sandbox,
            "ACTFLEET_MODEL": "bench",
            "ACTFLEET_LOG_LEVEL": "WARNING",
            "ACTFLEET_MAX_ACTIVE_PER_TENANT": str(max(tasks, 1000)),
        }
        if model_max_inflight is not None:
            env["ACTFLEET_MODEL_MAX_INFLIGHT"] = str(model_max_inflight)
        per_worker = math.ceil(concurrency / workers)
        if warm_pool:  # as an operator would size it: a warm sandbox per loop
            env |= {"ACTFLEET_POOL_MIN": str(per_worker), "ACTFLEET_POOL_MAX": str(per_worker)}
        else:
            env |= {"ACTFLEET_POOL_MIN": "0", "ACTFLEET_POOL_MAX": "0"}
        say(
            f"starting the stack: {workers} worker process(es) x {per_worker} loops, {settings.sandbox}"
        )
        with LocalStack(
            redis_url=settings.redis_url, workers=workers, concurrency=per_worker, env=env
        ) as stack:
            assert stack.redis_url is not None
            r = redis.Redis.from_url(stack.redis_url)
            keys = Keys(settings.key_prefix)
            api_key, _ = create_key(r, keys, "bench", "bench fleet")
            if warm_pool:
                say("waiting for the workers' warm pools to fill")
                _wait_for_pools(r, keys, workers, per_worker)
            body = "\n".join(
                json.dumps(
                    {
                        "prompt": f"bench task {i}",
                        "custom_id": f"t{i}",
                        "limits": {"max_turns": turns + 1},
                        "expected": {"answer": str(max(turns - 1, 1)), "grader": "exact"},
                    }
                )
                for i in range(tasks)
            )
            http = httpx.Client(
                base_url=stack.api_url,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=60,
            )
            say(f"submitting {tasks} tasks of {turns} turns, model latency {latency_s:g}s")
            roots = _roots(stack)
            cpu_before = tree_cpu(roots)
            t0 = time.time()
            resp = http.post(
                "/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"}
            )
            resp.raise_for_status()
            batch_id = resp.json()["id"]
            submit_s = time.time() - t0
            while True:
                status = http.get(f"/v1/batches/{batch_id}").json()
                done = int(status.get("finished", 0))
                if progress:
                    progress.print(f"  {done}/{tasks} finished", end="\r")
                if done >= tasks:
                    break
                time.sleep(2.0)
            cpu = {k: v - cpu_before[k] for k, v in tree_cpu(roots).items()}
            gate = _gate_figures(stack, r, keys, llm, model_max_inflight)
            ids = [i.decode() for i in r.lrange(keys.batch_tasks(batch_id), 0, -1)]  # type: ignore[union-attr]
            pipe = r.pipeline(transaction=False)
            for task_id in ids:
                pipe.hgetall(keys.task(task_id))
            records = [TaskRecord.from_hash(h) for h in pipe.execute()]
            for task_id in ids:
                pipe.xrange(keys.events(task_id))
            streams = [
                [json.loads(fields[b"e"]) for _, fields in entries] for entries in pipe.execute()
            ]
            # From the records, not the poll: the poll interval must not count as overhead.
            wall_s = max(r.finished_at or t0 for r in records) - t0
            http.close()
            r.close()
        late = list(llm.late_s)

    latencies, overheads, llm_extra, loop_extra = [], [], [], []
    statuses: dict[str, int] = {}
    failures: dict[str, int] = {}  # failure class -> count, for the tasks that did not complete
    for rec in records:
        statuses[rec.status.value] = statuses.get(rec.status.value, 0) + 1
        if rec.result is not None and rec.result.failure_class is not None:
            key = f"{rec.result.failure_class.value}: {(rec.result.error or '')[:80]}"
            failures[key] = failures.get(key, 0) + 1
        if rec.finished_at is None or rec.result is None:
            continue
        latencies.append(rec.finished_at - rec.created_at)
        res = rec.result
        if rec.started_at is not None and res.turns:
            run_s = rec.finished_at - rec.started_at
            model_s = res.usage.llm_calls * latency_s
            overheads.append((run_s - model_s - res.timings.exec_s) / res.turns)
            # where it went: the model client beyond the model's own latency, and the rest
            llm_extra.append((res.timings.llm_s - model_s) / res.turns)
            loop_extra.append((run_s - res.timings.llm_s - res.timings.exec_s) / res.turns)
    phases = phase_overheads(records, streams, latency_s)
    started = sorted(rec.started_at - t0 for rec in records if rec.started_at is not None)
    finished = sorted(rec.finished_at - t0 for rec in records if rec.finished_at is not None)
    first_wave = started[: min(concurrency, len(started))]
    gaps = [s - f for s, f in zip(started[concurrency:], finished, strict=False)]
    ideal_s = math.ceil(tasks / concurrency) * turns * latency_s
    return {
        "tasks": tasks,
        "turns": turns,
        "latency_s": latency_s,
        "concurrency": concurrency,
        "worker_processes": workers,
        "warm_pool": warm_pool,
        "backend": settings.sandbox,
        "statuses": statuses,
        "failures": failures,
        "submit_s": round(submit_s, 3),
        "wall_s": round(wall_s, 3),
        "ideal_s": round(ideal_s, 3),
        "efficiency": round(ideal_s / wall_s, 4) if wall_s else 0.0,
        "throughput_tasks_per_s": round(tasks / wall_s, 3),
        "first_wave_started_s": round(first_wave[-1], 3) if first_wave else None,
        # none when every task fits in the first wave
        "dispatch_gap_ms": p50_p95_ms(gaps) if gaps else {"p50": None, "p95": None},
        "task_latency_s": {
            "p50": round(percentile(latencies, 0.5), 3),
            "p95": round(percentile(latencies, 0.95), 3),
        },
        # fake-llm's lateness past L (a remote model has none)
        "model_server_late_ms": p50_p95_ms(late),
        "overhead_per_turn_ms": {
            **p50_p95_ms(overheads),
            "mean": round(statistics.fmean(overheads) * 1000, 2) if overheads else None,
            "of_which_model_client_p50": round(percentile(llm_extra, 0.5) * 1000, 2),
            "of_which_outside_model_calls_p50": round(percentile(loop_extra, 0.5) * 1000, 2),
        },
        "phase_overhead_ms": phases,
        "cpu_ms_per_task": cpu_per_task(cpu, tasks),
        "cpu_cores_busy": round(sum(c.total_s for c in cpu.values()) / wall_s, 3)
        if wall_s
        else 0.0,
        **capacity_figures(
            model_capacity, concurrency, turns, latency_s, statuses, wall_s, llm, gate
        ),
    }


def _roots(stack: LocalStack) -> dict[str, int]:
    """The processes whose trees the bench charges, by role."""
    roots = {"bench_and_fake_llm": os.getpid()}
    api, *_ = stack.procs
    roots["api"] = api.pid
    for i, proc in enumerate(stack.worker_procs):
        roots[f"worker{i}"] = proc.pid
    if stack.redis is not None and stack.redis.proc is not None:
        roots["redis"] = stack.redis.proc.pid
    return roots


def cpu_per_task(cpu: dict[str, TreeCPU], tasks: int) -> dict[str, float]:
    """CPU ms per task, in total and by where it went. This process's own CPU only: the
    stack's processes are its children, charged on their own lines."""

    def ms(seconds: float) -> float:
        return round(seconds * 1000 / tasks, 2)

    workers = [c for name, c in cpu.items() if name.startswith("worker")]
    parts = {
        "workers": ms(sum(c.own_s for c in workers)),
        "sandboxes": ms(sum(c.descendants_s for c in workers)),
        "api": ms(cpu["api"].total_s) if "api" in cpu else 0.0,
        "redis": ms(cpu["redis"].total_s) if "redis" in cpu else 0.0,
        "bench_and_fake_llm": ms(cpu["bench_and_fake_llm"].own_s),
    }
    return {"total": round(sum(parts.values()), 2), **parts}


def _gate_figures(
    stack: LocalStack, r: redis.Redis, keys: Keys, llm: FakeLLMServer, cap: int | None
) -> dict[str, Any] | None:
    """The model gate's figures: from Redis (the fleet's limit) and from the workers'
    metrics files (every process's overloads and slot waits)."""
    if cap is None:
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    state = RedisGateStore(r, keys, server_id(llm.url)).state(cap)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(stack.metrics_dir))
    overloads: dict[str, float] = {}
    wait_sum = wait_count = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "actfleet_llm_overloads_total":
                signal = sample.labels.get("signal", "?")
                overloads[signal] = overloads.get(signal, 0.0) + sample.value
            elif sample.name == "actfleet_llm_slot_wait_seconds_sum":
                wait_sum += sample.value
            elif sample.name == "actfleet_llm_slot_wait_seconds_count":
                wait_count += sample.value
    return {
        "max_inflight": cap,
        "final_limit": round(state.limit, 2),
        "limit_decreases": state.epoch,
        "overloads_seen": {k: int(v) for k, v in sorted(overloads.items())},
        "slot_wait_mean_ms": round(wait_sum / wait_count * 1000, 2) if wait_count else None,
        "requests": int(wait_count),
    }


def capacity_figures(
    capacity: int | None,
    concurrency: int,
    turns: int,
    latency_s: float,
    statuses: dict[str, int],
    wall_s: float,
    llm: FakeLLMServer,
    gate: dict[str, Any] | None,
) -> dict[str, Any]:
    """Goodput against what the model server's capacity allows, and the gate's figures."""
    out: dict[str, Any] = {"error_tasks": statuses.get("error", 0)}
    if gate is not None:
        out["model_gate"] = gate
    if capacity is None:
        return out
    completed = statuses.get("completed", 0)
    rate = completed / wall_s if wall_s else 0.0
    ideal = min(capacity, concurrency) / (turns * latency_s) if latency_s else None
    out["model_capacity"] = capacity
    out["goodput_tasks_per_s"] = round(rate, 3)
    out["goodput_ideal_tasks_per_s"] = round(ideal, 3) if ideal else None
    out["goodput"] = round(rate / ideal, 4) if ideal else None
    out["model_server"] = {
        "served": llm.served,
        "rejected_429": llm.rejected,
        "peak_in_service": llm.peak_in_service,
        "utilization": round(llm.busy_s / (capacity * wall_s), 4) if wall_s else None,
    }
    return out


PHASES = ("start", "model_wait", "model_client", "exec", "finish")


def phase_overheads(
    records: list[TaskRecord], streams: list[list[dict[str, Any]]], latency_s: float
) -> dict[str, dict[str, float]]:
    """Where a task's overhead goes, from its events' timestamps (one worker clock):

    - ``start``: the claim to the ``task.started`` event (which the claim itself writes, so
      0 unless a task resumed; the claim's round trip shows in the first ``model_wait``);
    - ``model_wait``: a model reply's event minus the event before it, minus the model
      client's own measured latency: the previous step's append and the request's making;
    - ``model_client``: the client's measured latency minus L (the client, the wire and
      fake-llm's lateness);
    - ``exec``: an execution's event minus the reply before it, minus the runner's own
      duration: the reply's append and the sandbox round trip (wake-ups included);
    - ``finish``: the last step's event to ``finished_at`` (the grading; ``FINISH`` writes
      that step with the result).

    Each figure is p50 and p95 over every occurrence, in ms.
    """
    samples: dict[str, list[float]] = {k: [] for k in PHASES}
    for rec, events in zip(records, streams, strict=True):
        if rec.started_at is None or rec.finished_at is None or len(events) < 2:
            continue
        prev: float | None = None
        for ev in events:
            kind, ts, data = ev["type"], float(ev["ts"]), ev.get("data") or {}
            if kind == "task.started":
                samples["start"].append(ts - rec.started_at)
            elif kind == "llm.reply" and prev is not None:
                client_s = float(data.get("latency_s", 0.0))
                samples["model_wait"].append(ts - prev - client_s)
                samples["model_client"].append(client_s - latency_s)
            elif kind == "exec.result" and prev is not None:
                samples["exec"].append(ts - prev - float(data.get("duration_s", 0.0)))
            elif kind == "task.finished" and prev is not None:
                samples["finish"].append(rec.finished_at - prev)
            prev = ts
    return {name: p50_p95_ms(v) for name, v in samples.items()}

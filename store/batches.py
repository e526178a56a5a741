"""Batches on the API's asyncio client: the record, status counts, results, cancel.

A batch is ``{p}:batch:{id}`` (hash: id, tenant, total, created_at, cancel_requested, and
for a batch with a webhook: webhook_url; FINISH adds finished_at when it schedules
batch.finished), ``{p}:batch:{id}:tasks`` (the task ids in input order) and
``{p}:batch:{id}:counts``: the counters (``store.keys``) that every status transition of
one of its tasks moves in the same script (``store.scripts``). A status poll reads those
two hashes, whatever the batch's size; results and exports read the task records a page
at a time. ``tally`` computes the same counters from the records, for checks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from agent.models import TERMINAL_STATUSES, Status
from agent.text import text_of
from store.api_store import ApiStore

READ_CHUNK = 1000  # task ids per pipelined read


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    total: int
    created_at: float
    cancel_requested: bool = False
    webhook_url: str | None = None  # batch.finished goes there (FINISH schedules it)

    def to_hash(self) -> dict[str, str]:
        h = {
            "id": self.id,
            "tenant": self.tenant,
            "total": str(self.total),
            "created_at": repr(self.created_at),
            "cancel_requested": "1" if self.cancel_requested else "0",
        }
        if self.webhook_url:
            h["webhook_url"] = self.webhook_url
        return h

    @classmethod
    def from_hash(cls, h: dict[Any, Any]) -> BatchRecord:
        d = {text_of(k): text_of(v) for k, v in h.items()}
        return cls(
            id=d["id"],
            tenant=d["tenant"],
            total=int(d["total"]),
            created_at=float(d["created_at"]),
            cancel_requested=d.get("cancel_requested") == "1",
            webhook_url=d.get("webhook_url") or None,
        )


COUNTERS = ("finished", "turns", "prompt_tokens", "completion_tokens", "correct", "succeeded")


class BatchStore:
    def __init__(self, tasks: ApiStore) -> None:
        self.tasks = tasks
        self.client = tasks.client
        self.keys = tasks.keys

    async def get(self, tenant: str, batch_id: str) -> BatchRecord | None:
        h = await self.client.hgetall(self.keys.batch(batch_id))
        if not h:
            return None
        batch = BatchRecord.from_hash(h)
        return batch if batch.tenant == tenant else None

    async def ids(self, batch_id: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[list[str]]:
        """The batch's task ids in input order, ``chunk_size`` at a time."""
        start = 0
        while True:
            chunk = await self.client.lrange(
                self.keys.batch_tasks(batch_id), start, start + chunk_size - 1
            )
            if not chunk:
                return
            yield [text_of(i) for i in chunk]
            start += len(chunk)

    async def counters(self, batch_id: str) -> dict[str, int]:
        """The batch's counters (``store.keys``), summed over the shards."""
        pipe = self.client.pipeline(transaction=False)
        for shard in self.keys.shard_ids:
            pipe.hgetall(self.keys.batch_counts(batch_id, shard))
        return sum_counters(await pipe.execute())

    async def stats(self, batch: BatchRecord) -> dict[str, Any]:
        """The batch's status, from its counters: one read per shard whatever its size."""
        c = await self.counters(batch.id)
        counts = {s.value: max(0, c.get(s.value, 0)) for s in Status}
        finished = c.get("finished", 0)
        turns, good = c.get("turns", 0), c.get("succeeded", 0)
        prompt, completion = c.get("prompt_tokens", 0), c.get("completion_tokens", 0)
        done = finished >= batch.total
        if batch.cancel_requested:
            state = "cancelled" if done else "cancelling"
        else:
            state = "finished" if done else "running"
        return {
            "id": batch.id,
            "status": state,
            "total": batch.total,
            "finished": finished,
            "counts": counts,
            "success_rate": round(good / finished, 6) if finished else None,
            "mean_turns": round(turns / finished, 6) if finished else None,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "created_at": batch.created_at,
            "cancel_requested": batch.cancel_requested,
        }

    async def results(
        self, batch: BatchRecord, trajectory: bool = False, chunk_size: int = READ_CHUNK
    ) -> AsyncIterator[dict[str, Any]]:
        """One result line per task, in input order; unfinished tasks show their status.

        Reads ``chunk_size`` task records at a time, so a reader holds at most that many
        results (and trajectories) however large the batch is.
        """
        fields = ["custom_id", "status", "attempt", "result", "finished_at", "action_format"]
        async for ids in self.ids(batch.id, chunk_size):
            pipe = self.client.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self.keys.task(task_id), fields)
            for task_id, values in zip(ids, await pipe.execute(), strict=True):
                custom_id, status, attempt, result, finished_at, action_format = (
                    None if v is None else text_of(v) for v in values
                )
                line = _result_line(
                    task_id, custom_id, status, attempt, result, finished_at, trajectory
                )
                line["action_format"] = action_format or "code"
                yield line

    async def cancel(self, batch: BatchRecord) -> dict[str, int]:
        """Cancel every unfinished task; finished ones keep their results."""
        await self.client.hset(self.keys.batch(batch.id), "cancel_requested", "1")
        cancelled = requested = already = 0
        async for ids in self.ids(batch.id):
            before = await self.tasks.request_cancel_many(ids)
            queued = [i for i, st in zip(ids, before, strict=True) if st == Status.QUEUED]
            requested += sum(1 for st in before if st == Status.RUNNING)
            already += sum(1 for st in before if st is not None and st in TERMINAL_STATUSES)
            n = await self.tasks.finish_cancelled_many(
                [(i, batch.tenant, batch.id, 0) for i in queued]
            )
            cancelled += n
            requested += len(queued) - n  # a worker took these meanwhile: it will stop them
        return {"cancelled": cancelled, "stopping": requested, "already_finished": already}


def sum_counters(hashes: Iterable[dict[Any, Any]]) -> dict[str, int]:
    """Counters read from each shard's counts hash, added up (flags excluded)."""
    out: dict[str, int] = {}
    for h in hashes:
        for k, v in h.items():
            name = text_of(k)
            if name != "webhook":
                out[name] = out.get(name, 0) + int(v)
    return out


def tally(records: Iterable[tuple[str, dict[str, Any] | None]]) -> dict[str, int]:
    """The counters a batch's transitions keep (``store.keys``), recounted from its tasks'
    (status, result) pairs: what the counts hash must hold once no task is moving."""
    out = {s.value: 0 for s in Status} | dict.fromkeys(COUNTERS, 0)
    for status, result in records:
        out[status] += 1
        if status not in TERMINAL_STATUSES or result is None:
            continue
        usage = result.get("usage") or {}
        out["finished"] += 1
        out["turns"] += int(result.get("turns") or 0)
        out["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        out["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        out["correct"] += result.get("correct") is True
        out["succeeded"] += status == Status.COMPLETED and result.get("correct") is not False
    return out


def _result_line(
    task_id: str,
    custom_id: str | None,
    status: str | None,
    attempt: str | None,
    result: str | None,
    finished_at: str | None,
    trajectory: bool,
) -> dict[str, Any]:
    r: dict[str, Any] = json.loads(result) if result else {}
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "task_id": task_id,
        "status": status or "missing",
        "answer": r.get("answer"),
        "correct": r.get("correct"),
        "failure_class": r.get("failure_class"),
        "turns": r.get("turns", 0),
        "usage": r.get("usage"),
        "timings": r.get("timings"),
        "attempt": int(attempt) if attempt else 0,
        "error": r.get("error"),
        "finished_at": float(finished_at) if finished_at else None,
    }
    if trajectory:
        line["messages"] = r.get("messages", [])
    return line

"""Evaluation reports: per-batch figures and paired comparisons, from results lines.

Pure: ``build_report`` takes each batch's results lines (what ``GET
/v1/batches/{id}/results`` streams, or a results JSONL file) and returns a ``Report``
that the CLI prints as tables, as one JSON document, or as HTML (``actfleet.report_html``).

A task *succeeds* when it completed and its answer was not graded wrong (the batch
status's ``success_rate``); tasks still queued or running are counted apart and left out
of every figure. Two batches are compared on the ``custom_id``s both finished: the
difference of their success rates with Newcombe's paired interval, the exact McNemar
test, and the tasks one solved and the other did not.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.models import TERMINAL_STATUSES
from agent.stats import mcnemar_exact, mean, paired_difference, quantile, wilson

CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class TaskRow:
    """What a report needs from one finished task."""

    custom_id: str | None
    status: str
    succeeded: bool
    correct: bool | None
    failure_class: str | None
    turns: int
    total_tokens: int
    total_s: float
    answer: str | None
    error: str | None

    @classmethod
    def of(cls, line: Mapping[str, Any]) -> TaskRow:
        usage = line.get("usage") or {}
        timings = line.get("timings") or {}
        status = str(line.get("status"))
        correct = line.get("correct")
        answer = line.get("answer")
        return cls(
            custom_id=line.get("custom_id"),
            status=status,
            succeeded=status == "completed" and correct is not False,
            correct=correct if isinstance(correct, bool) else None,
            failure_class=line.get("failure_class"),
            turns=int(line.get("turns") or 0),
            total_tokens=int(usage.get("total_tokens") or 0),
            total_s=float(timings.get("total_s") or 0.0),
            answer=None if answer is None else str(answer),
            error=line.get("error"),
        )


@dataclass(frozen=True, slots=True)
class BatchSummary:
    label: str
    source: str  # the batch id or the file it was read from
    action_format: str  # "code", "json", "text", or "mixed"
    finished: int
    unfinished: int
    succeeded: int
    success_rate: float | None
    success_ci: tuple[float, float]
    graded: int
    correct: int
    mean_turns: float | None
    turns: dict[int, int]  # turns -> tasks
    tokens: dict[str, float | int | None]
    wall_s: dict[str, float | None]
    statuses: dict[str, int]
    failure_classes: dict[str, int]
    rows: tuple[TaskRow, ...] = field(repr=False, default=())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("rows")
        d["success_ci"] = list(self.success_ci)
        d["turns"] = {str(k): v for k, v in self.turns.items()}
        return d


@dataclass(frozen=True, slots=True)
class Comparison:
    """Batch ``a`` against batch ``b`` on the tasks both finished."""

    a: str
    b: str
    paired: int
    both: int
    only_a: int
    only_b: int
    neither: int
    rate_a: float | None
    rate_b: float | None
    difference: float | None  # rate_a - rate_b
    difference_ci: tuple[float, float]
    p_value: float  # exact McNemar, two-sided
    solved_only_by_a: tuple[str, ...]
    solved_only_by_b: tuple[str, ...]
    mean_turns_a: float | None
    mean_turns_b: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("difference_ci", "solved_only_by_a", "solved_only_by_b"):
            d[key] = list(d[key])
        return d


@dataclass(frozen=True, slots=True)
class Report:
    batches: tuple[BatchSummary, ...]
    comparisons: tuple[Comparison, ...]
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "batches": [b.to_dict() for b in self.batches],
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def summarize(
    source: str, lines: Iterable[Mapping[str, Any]], label: str | None = None
) -> BatchSummary:
    """The figures of one batch from its results lines."""
    rows: list[TaskRow] = []
    unfinished = 0
    formats: set[str] = set()
    for line in lines:
        formats.add(str(line.get("action_format") or "code"))
        if line.get("status") in TERMINAL_STATUSES:
            rows.append(TaskRow.of(line))
        else:
            unfinished += 1
    n = len(rows)
    succeeded = sum(r.succeeded for r in rows)
    graded = [r for r in rows if r.correct is not None]
    tokens = [r.total_tokens for r in rows]
    wall = [r.total_s for r in rows]
    action_format = formats.pop() if len(formats) == 1 else ("mixed" if formats else "code")
    return BatchSummary(
        label=label or source,
        source=source,
        action_format=action_format,
        finished=n,
        unfinished=unfinished,
        succeeded=succeeded,
        success_rate=succeeded / n if n else None,
        success_ci=wilson(succeeded, n, CONFIDENCE),
        graded=len(graded),
        correct=sum(1 for r in graded if r.correct),
        mean_turns=mean([r.turns for r in rows]),
        turns=dict(sorted(Counter(r.turns for r in rows).items())),
        tokens={"total": sum(tokens), "mean": mean(tokens)},
        wall_s={
            "mean": mean(wall),
            "p50": quantile(wall, 0.5),
            "p95": quantile(wall, 0.95),
            "max": max(wall) if wall else None,
        },
        statuses=dict(sorted(Counter(r.status for r in rows).items())),
        failure_classes=dict(
            sorted(Counter(r.failure_class for r in rows if r.failure_class).items())
        ),
        rows=tuple(rows),
    )


def compare(a: BatchSummary, b: BatchSummary) -> Comparison | None:
    """``a`` against ``b`` on the custom_ids both finished; ``None`` when they share none."""
    by_a = {r.custom_id: r for r in a.rows if r.custom_id is not None}
    by_b = {r.custom_id: r for r in b.rows if r.custom_id is not None}
    shared = [cid for cid in by_a if cid in by_b]  # in a's input order
    if not shared:
        return None
    table: Counter[tuple[bool, bool]] = Counter(
        (by_a[c].succeeded, by_b[c].succeeded) for c in shared
    )
    both, only_a = table[(True, True)], table[(True, False)]
    only_b, neither = table[(False, True)], table[(False, False)]
    d = paired_difference(both, only_a, only_b, neither, CONFIDENCE)
    n = len(shared)
    return Comparison(
        a=a.label,
        b=b.label,
        paired=n,
        both=both,
        only_a=only_a,
        only_b=only_b,
        neither=neither,
        rate_a=(both + only_a) / n,
        rate_b=(both + only_b) / n,
        difference=d.estimate,
        difference_ci=(d.lo, d.hi),
        p_value=mcnemar_exact(only_a, only_b),
        solved_only_by_a=tuple(c for c in shared if by_a[c].succeeded and not by_b[c].succeeded),
        solved_only_by_b=tuple(c for c in shared if by_b[c].succeeded and not by_a[c].succeeded),
        mean_turns_a=mean([by_a[c].turns for c in shared]),
        mean_turns_b=mean([by_b[c].turns for c in shared]),
    )


def build_report(batches: Sequence[tuple[str, Iterable[Mapping[str, Any]]]]) -> Report:
    """Summaries of ``(source, lines)`` batches, and every pair of them compared.

    A batch is labelled by its action format when the batches' formats tell them apart
    (the paper's comparison), else by its source.
    """
    summaries = [summarize(source, lines) for source, lines in batches]
    formats = [s.action_format for s in summaries]
    by_format = len(set(formats)) == len(formats) and "mixed" not in formats
    labels = _unique(
        [f if by_format else s.source for f, s in zip(formats, summaries, strict=True)]
    )
    summaries = [_relabel(s, label) for s, label in zip(summaries, labels, strict=True)]
    comparisons = [
        c for a, b in itertools.combinations(summaries, 2) if (c := compare(a, b)) is not None
    ]
    return Report(tuple(summaries), tuple(comparisons))


def _relabel(s: BatchSummary, label: str) -> BatchSummary:
    return BatchSummary(**{**{f: getattr(s, f) for f in s.__dataclass_fields__}, "label": label})


def _unique(labels: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out

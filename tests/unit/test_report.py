"""Report figures, computed from results lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actfleet.report import build_report, compare, summarize
from agent.stats import wilson


def line(cid: str, status: str = "completed", correct: bool | None = True, **kw: Any) -> dict:
    return {
        "custom_id": cid,
        "status": status,
        "correct": correct,
        "failure_class": kw.pop("failure_class", None),
        "turns": kw.pop("turns", 2),
        "usage": {"total_tokens": kw.pop("tokens", 100)},
        "timings": {"total_s": kw.pop("total_s", 1.0)},
        "answer": kw.pop("answer", "x"),
        "action_format": kw.pop("fmt", "code"),
        **kw,
    }


def test_a_batch_summary_counts_what_finished() -> None:
    lines = [
        line("a", turns=1, tokens=10, total_s=1.0),
        line("b", correct=None, turns=3, tokens=30, total_s=3.0),  # ungraded: a success
        line("c", correct=False, failure_class="wrong_answer", turns=2, tokens=20, total_s=2.0),
        line("d", "failed", None, failure_class="max_turns", turns=5, tokens=50, total_s=10.0),
        line("e", "running", None),  # not finished: left out
    ]
    s = summarize("batch_1", lines)
    assert (s.finished, s.unfinished, s.succeeded) == (4, 1, 2)
    assert s.success_rate == 0.5 and s.success_ci == wilson(2, 4)
    assert (s.graded, s.correct) == (2, 1)
    assert s.mean_turns == pytest.approx(11 / 4)
    assert s.turns == {1: 1, 2: 1, 3: 1, 5: 1}
    assert s.tokens == {"total": 110, "mean": 27.5}
    assert s.wall_s["mean"] == 4.0 and s.wall_s["max"] == 10.0
    assert s.failure_classes == {"max_turns": 1, "wrong_answer": 1}
    assert s.statuses == {"completed": 3, "failed": 1}


def test_an_empty_batch_has_no_rates() -> None:
    s = summarize("empty", [])
    assert s.success_rate is None and s.mean_turns is None and s.success_ci == (0.0, 1.0)


def test_a_paired_comparison_uses_only_the_shared_tasks() -> None:
    a = summarize("a", [line("t1"), line("t2"), line("t3", "failed", None), line("only-a")])
    b = summarize("b", [line("t1"), line("t2", "failed", None), line("t3"), line("t4", "failed")])
    c = compare(a, b)
    assert c is not None
    assert c.paired == 3 and (c.both, c.only_a, c.only_b, c.neither) == (1, 1, 1, 0)
    assert c.solved_only_by_a == ("t2",) and c.solved_only_by_b == ("t3",)
    assert c.difference == 0 and c.p_value == 1.0
    assert compare(a, summarize("other", [line("zzz")])) is None


def test_batches_are_labelled_by_format_when_formats_tell_them_apart() -> None:
    by_format = build_report([("b1", [line("t", fmt="code")]), ("b2", [line("t", fmt="json")])])
    assert [b.label for b in by_format.batches] == ["code", "json"]
    assert [(c.a, c.b) for c in by_format.comparisons] == [("code", "json")]
    same = build_report([("b1", [line("t")]), ("b2", [line("t")]), ("b3", [line("t")])])
    assert [b.label for b in same.batches] == ["b1", "b2", "b3"]
    assert len(same.comparisons) == 3  # every pair
    json.dumps(same.to_dict())  # one JSON document

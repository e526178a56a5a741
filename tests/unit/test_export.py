"""Export transforms: results lines to fine-tuning conversations and result rows."""

from __future__ import annotations

from collections import Counter

import pytest

from agent.export import Filter, conversation, export_line
from tests.finetune_checks import format_errors

SYSTEM = {"role": "system", "content": "sys"}
USER = {"role": "user", "content": "task"}
ANSWER = {"role": "assistant", "content": "<solution>1</solution>"}


def line(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "custom_id": "a",
        "status": "completed",
        "correct": True,
        "turns": 1,
        "messages": [SYSTEM, USER, ANSWER],
    }
    return {**base, **kw}


def test_openai_lines_hold_only_messages_and_sharegpt_renames_the_roles() -> None:
    assert export_line(line(), "openai") == {"messages": [SYSTEM, USER, ANSWER]}
    assert export_line(line(), "sharegpt") == {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "task"},
            {"from": "gpt", "value": "<solution>1</solution>"},
        ]
    }


def test_a_task_that_did_not_answer_has_no_conversation_to_train_on() -> None:
    assert export_line(line(status="failed", correct=None), "openai") is None
    assert export_line(line(messages=[SYSTEM, USER, ANSWER, USER]), "openai") is None
    assert export_line(line(messages=[]), "sharegpt") is None
    # ... but it is a result row
    assert export_line(line(status="failed"), "results") is not None


def test_messages_a_trainer_cannot_read_leave_the_task_out() -> None:
    assert conversation([USER, {"role": "tool", "content": "x"}, ANSWER]) is None
    assert conversation([USER, {"role": "assistant", "content": None}, ANSWER]) is None


def test_an_empty_reply_and_its_nudge_are_left_out() -> None:
    empty = {"role": "assistant", "content": ""}
    nudge = {"role": "user", "content": "say something"}
    assert conversation([SYSTEM, USER, empty, nudge, ANSWER]) == [SYSTEM, USER, ANSWER]
    assert conversation([{"role": "system", "content": ""}, USER, ANSWER]) == [USER, ANSWER]


@pytest.mark.parametrize(
    ("keep", "kept"),
    [
        (Filter(), ["right", "wrong", "ungraded", "failed", "long"]),
        (Filter(only_correct=True), ["right", "long"]),
        (Filter(only_completed=True), ["right", "wrong", "ungraded", "long"]),
        (Filter(max_turns=2), ["right", "wrong", "ungraded", "failed"]),
        (Filter(only_correct=True, max_turns=2), ["right"]),
    ],
)
def test_filters(keep: Filter, kept: list[str]) -> None:
    lines = [
        line(custom_id="right"),
        line(custom_id="wrong", correct=False),
        line(custom_id="ungraded", correct=None),
        line(custom_id="failed", status="failed", correct=None),
        line(custom_id="long", turns=3),
    ]
    rows = [export_line(x, "results", keep) for x in lines]
    assert [r["custom_id"] for r in rows if r is not None] == kept


def test_results_rows_keep_messages_only_when_asked() -> None:
    row = export_line(line(), "results")
    assert row is not None and "messages" not in row and row["custom_id"] == "a"
    full = export_line(line(), "results", trajectory=True)
    assert full is not None and full["messages"] == [SYSTEM, USER, ANSWER]


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="openai, sharegpt, results"):
        export_line(line(), "csv")


def test_the_cookbook_checks_catch_what_they_should() -> None:
    # The oracle the API tests use finds each error it is meant to find.
    bad = [
        "not a dict",
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "robot", "content": "x", "extra": 1}]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    assert format_errors(bad) == Counter(
        data_type=1,
        missing_messages_list=1,
        message_missing_key=1,
        missing_content=1,
        message_unrecognized_key=1,
        unrecognized_role=1,
        example_missing_assistant_message=3,
    )

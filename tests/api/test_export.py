"""``GET /v1/batches/{id}/export``: fine-tuning conversations and result rows, filtered,
streamed a page of tasks at a time."""

from __future__ import annotations

import json
from typing import Any

import httpx

from agent.models import FailureClass, Status, Usage
from api.routes_batches import EXPORT_CHUNK
from tests.api.conftest import Fleet, spec
from tests.finetune_checks import read_openai_export, read_sharegpt_export


def jsonl(*specs: object) -> bytes:
    return b"".join(json.dumps(s).encode() + b"\n" for s in specs)


SYSTEM = {"role": "system", "content": "You solve tasks with code."}
PROMPT = {"role": "user", "content": "What is 6*7?"}
CODE = {"role": "assistant", "content": "<execute>\nprint(6*7)\n</execute>"}
OBS = {"role": "user", "content": "Observation:\n42"}


def answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": f"<solution>{text}</solution>"}


def make_batch(fleet: Fleet, c: httpx.Client) -> tuple[str, list[str]]:
    """Five tasks: right in 2 turns, wrong in 2, out of turns, answered ungraded after an
    empty reply and its nudge (3 turns), still queued."""
    batch_id = c.post(
        "/v1/batches", content=jsonl(*[spec(custom_id=f"c{i}") for i in range(5)])
    ).json()["id"]
    ids = [json.loads(x)["task_id"] for x in c.get(f"/v1/batches/{batch_id}/results").iter_lines()]
    for task_id in ids[:4]:
        fleet.start_task(task_id)
    fleet.finish(ids[0], correct=True, turns=2, messages=(SYSTEM, PROMPT, CODE, OBS, answer("42")))
    fleet.finish(
        ids[1],
        answer="41",
        correct=False,
        turns=2,
        failure_class=FailureClass.WRONG_ANSWER,
        messages=(SYSTEM, PROMPT, CODE, OBS, answer("41")),
    )
    fleet.finish(
        ids[2],
        Status.FAILED,
        answer=None,
        turns=1,
        failure_class=FailureClass.MAX_TURNS,
        messages=(SYSTEM, PROMPT, CODE, OBS),
    )
    nudge = {"role": "user", "content": "Your reply contained neither code nor an answer."}
    empty = {"role": "assistant", "content": "  "}
    fleet.finish(
        ids[3],
        turns=3,
        usage=Usage(5, 5, 3),
        messages=(SYSTEM, PROMPT, empty, nudge, CODE, OBS, answer("42")),
    )
    return batch_id, ids


def export(c: httpx.Client, batch_id: str, **params: Any) -> httpx.Response:
    return c.get(f"/v1/batches/{batch_id}/export", params=params)


def test_openai_export_passes_the_fine_tuning_format_checks(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id, _ = make_batch(fleet, c)
        r = export(c, batch_id, format="openai")
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert f"{batch_id}.openai.jsonl" in r.headers["content-disposition"]
    dataset = read_openai_export(r.text)
    # the tasks that answered, in input order, each ending with its answer
    assert [ex["messages"][-1]["content"] for ex in dataset] == [
        "<solution>42</solution>",
        "<solution>41</solution>",
        "<solution>42</solution>",
    ]
    # the empty reply and the nudge it got are left out; the rest is the trajectory
    assert [m["role"] for m in dataset[2]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert dataset[0]["messages"] == [SYSTEM, PROMPT, CODE, OBS, answer("42")]


def test_only_correct_keeps_exactly_the_correct_ones(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id, _ = make_batch(fleet, c)
        openai = read_openai_export(export(c, batch_id, format="openai", only_correct=True).text)
        rows = [
            json.loads(x)
            for x in export(c, batch_id, format="results", only_correct="true").iter_lines()
        ]
        results = [json.loads(x) for x in c.get(f"/v1/batches/{batch_id}/results").iter_lines()]
    correct = [r["custom_id"] for r in results if r["correct"] is True]
    assert correct == ["c0"]
    assert [r["custom_id"] for r in rows] == correct
    assert len(openai) == 1 and openai[0]["messages"][-1]["content"] == "<solution>42</solution>"


def test_sharegpt_export_parses_as_sharegpt(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id, _ = make_batch(fleet, c)
        dataset = read_sharegpt_export(export(c, batch_id, format="sharegpt").text)
    assert len(dataset) == 3
    assert [t["from"] for t in dataset[0]["conversations"]] == [
        "system",
        "human",
        "gpt",
        "human",
        "gpt",
    ]
    assert dataset[0]["conversations"][3]["value"] == "Observation:\n42"


def test_results_rows_carry_what_a_report_needs_and_filters_combine(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id, _ = make_batch(fleet, c)
        rows = [json.loads(x) for x in export(c, batch_id, format="results").iter_lines()]
        completed = [
            json.loads(x)["custom_id"]
            for x in export(c, batch_id, format="results", only_completed=True).iter_lines()
        ]
        short = [
            json.loads(x)["custom_id"]
            for x in export(
                c, batch_id, format="results", only_completed=True, max_turns=2
            ).iter_lines()
        ]
        with_messages = json.loads(
            export(c, batch_id, format="results", include="trajectory").text.splitlines()[0]
        )
    assert [r["custom_id"] for r in rows] == ["c0", "c1", "c2", "c3", "c4"]
    for key in ("custom_id", "status", "answer", "correct", "turns", "usage", "timings"):
        assert all(key in r for r in rows), key
    assert rows[1]["failure_class"] == "wrong_answer" and rows[2]["status"] == "failed"
    assert rows[0]["action_format"] == "code"
    assert "messages" not in rows[0] and with_messages["messages"][-1] == answer("42")
    assert completed == ["c0", "c1", "c3"]
    assert short == ["c0", "c1"]


def test_bad_export_parameters_say_what_to_fix_and_other_tenants_get_404(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id, _ = make_batch(fleet, c)
        bad_format = export(c, batch_id, format="csv")
        bad_turns = export(c, batch_id, max_turns=-1)
    assert bad_format.status_code == 422 and "format" in bad_format.text
    assert bad_turns.status_code == 422
    with fleet.client("someone-else") as other:
        assert export(other, batch_id, format="openai").status_code == 404


def test_an_export_larger_than_a_page_keeps_every_task_in_input_order(fleet: Fleet) -> None:
    # Given a batch spanning several pages of the export's reads, every task answered
    n = 2 * EXPORT_CHUNK + 37
    with fleet.client() as c:
        batch_id = c.post(
            "/v1/batches", content=jsonl(*[spec(custom_id=f"c{i}") for i in range(n)])
        ).json()["id"]
        ids = [
            json.loads(x)["task_id"] for x in c.get(f"/v1/batches/{batch_id}/results").iter_lines()
        ]
        for i, task_id in enumerate(ids):
            fleet.start_task(task_id)
            fleet.finish(task_id, answer=str(i), messages=(SYSTEM, PROMPT, answer(str(i))))
        # When it is exported
        dataset = read_openai_export(export(c, batch_id, format="openai").text)
    # Then no task is lost or repeated at a page boundary
    assert [ex["messages"][-1]["content"] for ex in dataset] == [
        f"<solution>{i}</solution>" for i in range(n)
    ]

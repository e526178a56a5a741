"""``actfleet export``, ``actfleet report`` and ``actfleet batch --formats`` as a user runs
them: real processes against the real API (the tests play the worker)."""

from __future__ import annotations

import json
from pathlib import Path

from agent.stats import mcnemar_exact
from tests.api.conftest import Fleet
from tests.api.test_cli import run
from tests.api.test_export import make_batch
from tests.finetune_checks import read_openai_export, read_sharegpt_export


def test_export_writes_fine_tuning_files_and_a_results_file_exports_the_same(
    fleet: Fleet, tmp_path: Path
) -> None:
    with fleet.client() as c:
        batch_id, _ = make_batch(fleet, c)
    key = fleet.key_for("acme")
    # Given the API's openai export, and the batch's results with trajectories on disk
    openai = tmp_path / "train.jsonl"
    code, _, err = run(
        fleet, "export", batch_id, "--format", "openai", "--out", str(openai), key=key
    )
    assert code == 0, err
    assert "3 openai lines written" in err
    read_openai_export(openai.read_text())
    saved = tmp_path / "results.jsonl"
    code, _, err = run(fleet, "export", batch_id, "--trajectory", "--out", str(saved), key=key)
    assert code == 0, err
    # When the file is exported locally (no API key needed)
    local = tmp_path / "local.jsonl"
    code, _, err = run(fleet, "export", str(saved), "--format", "openai", "--out", str(local))
    # Then it is the same transform, byte for byte
    assert code == 0, err
    assert local.read_text() == openai.read_text()
    # and the filters apply there too
    code, out, err = run(
        fleet, "export", str(saved), "--format", "sharegpt", "--only-correct", "--out", "-"
    )
    assert code == 0, err
    assert len(read_sharegpt_export(out)) == 1


def test_export_says_what_to_fix(fleet: Fleet, tmp_path: Path) -> None:
    key = fleet.key_for("acme")
    code, _, err = run(
        fleet, "export", "batch_x", "--format", "openai", "--trajectory", "--out", "-", key=key
    )
    assert code == 2 and "--trajectory applies to --format results" in err
    code, _, err = run(fleet, "export", "batch_nope", "--out", "-", key=key)
    assert code == 2 and "404" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"status": "completed"}\nnot json\n')
    code, _, err = run(fleet, "export", str(bad), "--out", "-")
    assert code == 2 and "line 2: not JSON" in err
    # a results file without trajectories has nothing to train on, and says why
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"status": "completed", "custom_id": "a"}) + "\n")
    code, out, err = run(fleet, "export", str(plain), "--format", "openai", "--out", "-")
    assert code == 0 and out == "" and "--trajectory" in err


def test_report_compares_two_batches_from_the_api(fleet: Fleet) -> None:
    # Given two runs of the same five tasks
    with fleet.client() as c:
        first, _ = make_batch(fleet, c)
        second, _ = make_batch(fleet, c)
    key = fleet.key_for("acme")
    # When they are reported
    code, out, err = run(fleet, "report", first, second, "--json", key=key)
    assert code == 0, err
    report = json.loads(out)
    # Then each batch's figures are its results' figures
    for batch in report["batches"]:
        assert batch["finished"] == 4 and batch["unfinished"] == 1
        assert batch["succeeded"] == 2  # right, and answered ungraded
        assert batch["failure_classes"] == {"max_turns": 1, "wrong_answer": 1}
        assert batch["mean_turns"] == (2 + 2 + 1 + 3) / 4
    [comparison] = report["comparisons"]
    assert comparison["paired"] == 4 and comparison["difference"] == 0
    assert comparison["p_value"] == mcnemar_exact(0, 0)
    # and a missing batch is a message, not a traceback
    code, _, err = run(fleet, "report", first, "batch_missing", key=key)
    assert code == 2 and "batch_missing" in err and "Traceback" not in err


def test_batch_formats_submits_the_same_tasks_once_per_format(fleet: Fleet, tmp_path: Path) -> None:
    key = fleet.key_for("paper")
    src = tmp_path / "tasks.jsonl"
    tools = [{"name": "fib", "signature": "fib(n: int) -> int"}]
    src.write_text(
        "".join(
            json.dumps({"prompt": f"t{i}", "custom_id": f"c{i}", "tools": tools}) + "\n"
            for i in range(3)
        )
    )
    code, out, err = run(fleet, "batch", str(src), "--formats", "code,json,text", "--json", key=key)
    assert code == 0, err
    batches = json.loads(out)["batches"]
    assert [b["format"] for b in batches] == ["code", "json", "text"]
    assert len({b["id"] for b in batches}) == 3
    with fleet.client("paper") as c:
        for b in batches:
            rows = [json.loads(x) for x in c.get(f"/v1/batches/{b['id']}/results").iter_lines()]
            assert [r["custom_id"] for r in rows] == ["c0", "c1", "c2"]
            assert {r["action_format"] for r in rows} == {b["format"]}
            task = c.get(f"/v1/tasks/{rows[0]['task_id']}").json()
            assert task["status"] == "queued"
            spec = json.loads(fleet.redis.hget(fleet.keys.task(rows[0]["task_id"]), "spec"))
            # (a record leaves out what is at its default: action_format "code")
            assert spec.get("action_format", "code") == b["format"]
            assert spec["tools"][0]["name"] == "fib"

    code, _, err = run(fleet, "batch", str(src), "--formats", "code,xml", key=key)
    assert code == 2 and "not 'xml'" in err
    code, _, err = run(fleet, "batch", str(src), "--formats", "code,code", key=key)
    assert code == 2 and "twice" in err

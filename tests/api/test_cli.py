"""The client CLI as a user runs it: real processes against the real API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from agent.events import EventType
from tests.api.conftest import Fleet


def actfleet(fleet: Fleet, *args: str, key: str | None = None) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "ACTFLEET_REDIS_URL": fleet.api.settings.redis_url or "",
        "ACTFLEET_KEY_PREFIX": fleet.keys.prefix,
        "ACTFLEET_API_URL": fleet.url,
    }
    if key:
        env["ACTFLEET_API_KEY"] = key
    return subprocess.Popen(
        [sys.executable, "-m", "actfleet", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(fleet: Fleet, *args: str, key: str | None = None) -> tuple[int, str, str]:
    p = actfleet(fleet, *args, key=key)
    out, err = p.communicate(timeout=60)
    return p.returncode, out, err


def tenant_task_ids(fleet: Fleet, tenant: str, n: int, timeout_s: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = [i.decode() for i in fleet.redis.zrange(fleet.keys.tenant_tasks(tenant), 0, -1)]
        if len(ids) >= n:
            return ids
        time.sleep(0.05)
    raise AssertionError(f"{tenant} has no {n} tasks")


def test_keys_create_list_revoke(fleet: Fleet) -> None:
    code, out, _ = run(fleet, "keys", "create", "--tenant", "cli-co", "--name", "ci", "--json")
    assert code == 0
    made = json.loads(out)
    assert made["key"].startswith("af_") and made["tenant"] == "cli-co"
    code, out, _ = run(fleet, "keys", "list", "--json")
    assert [k["tenant"] for k in json.loads(out)["keys"]] == ["cli-co"]
    assert made["key"] not in out  # only hashes are stored
    code, out, _ = run(fleet, "keys", "revoke", made["key_hash"][:12])
    assert code == 0
    with fleet.client(None) as c:
        r = c.get("/v1/tasks", headers={"Authorization": f"Bearer {made['key']}"})
    assert r.status_code == 401
    code, _, err = run(fleet, "keys", "create", "--tenant", "no spaces")
    assert code == 2 and "tenant:" in err


def test_submit_follow_prints_events_live_then_the_result(fleet: Fleet) -> None:
    key = fleet.key_for("follower")
    p = actfleet(fleet, "submit", "--prompt", "What is 6*7?", "--follow", key=key)
    [task_id] = tenant_task_ids(fleet, "follower", 1)
    fleet.start_task(task_id)
    fleet.append(
        task_id, EventType.LLM_REPLY, turn=1, content="<solution>42</solution>", answer="42"
    )
    fleet.finish(task_id)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert f"queued {task_id}" in out
    assert "answer: 42" in out and "finished: completed" in out


def test_submit_reports_what_to_fix(fleet: Fleet) -> None:
    key = fleet.key_for("acme")
    code, _, err = run(fleet, "submit", "--prompt", "x", "--max-turns", "0", key=key)
    assert code == 2
    assert "limits.max_turns: must be between 1 and 200, got 0" in err
    code, _, err = run(fleet, "submit", "--prompt", "x")
    assert code == 2 and "ACTFLEET_API_KEY" in err


def test_batch_wait_shows_progress_a_summary_and_writes_results(
    fleet: Fleet, tmp_path: Path
) -> None:
    key = fleet.key_for("batcher")
    src = tmp_path / "tasks.jsonl"
    src.write_text(
        "".join(json.dumps({"prompt": f"t{i}", "custom_id": f"c{i}"}) + "\n" for i in range(3))
    )
    out_file = tmp_path / "results.jsonl"
    p = actfleet(
        fleet,
        "batch",
        str(src),
        "--wait",
        "--poll-s",
        "0.2",
        "--out",
        str(out_file),
        "--json",
        key=key,
    )
    for task_id in tenant_task_ids(fleet, "batcher", 3):
        fleet.start_task(task_id)
        fleet.finish(task_id, correct=True, turns=2)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    summary = json.loads(out)
    assert summary["counts"]["completed"] == 3 and summary["success_rate"] == 1.0
    lines = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["c0", "c1", "c2"]
    # and export writes the same results again, with trajectories on request
    exported = tmp_path / "again.jsonl"
    code, _, err = run(
        fleet, "export", summary["id"], "--out", str(exported), "--trajectory", key=key
    )
    assert code == 0, err
    assert all("messages" in json.loads(x) for x in exported.read_text().splitlines())

"""The scripted fake model server, spoken to over real HTTP."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from actfleet.cli import main as cli_main
from actfleet.fakellm import (
    NO_MATCH_REPLY,
    FakeLLMServer,
    ScriptError,
    count_tokens,
    load_script,
    parse_script,
)

ROOT = Path(__file__).resolve().parents[2]


def chat(server: FakeLLMServer, messages: list[dict[str, str]], **extra: Any) -> httpx.Response:
    body = {"model": "m", "messages": messages, **extra}
    return httpx.post(f"{server.url}/chat/completions", json=body, timeout=10)


def reply_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture
def default_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


# -- the built-in script ----------------------------------------------------------------


def test_default_script_writes_code_then_answers_from_the_observation(
    default_server: FakeLLMServer,
) -> None:
    # turn 1: the prompt says "Compute: EXPR", so the fake writes code printing EXPR
    first = reply_of(chat(default_server, [user("Please help.\nCompute: 6 * 7.")]))
    assert "<execute>\nresult = 6 * 7\nprint(result)\n</execute>" in first

    # turn 2: the observation's last printed line becomes the solution
    second = reply_of(
        chat(
            default_server,
            [user("Compute: 6 * 7"), assistant(first), user("Observation:\n42")],
        )
    )
    assert second.endswith("<solution>42</solution>")


def test_default_script_without_a_matching_prompt(default_server: FakeLLMServer) -> None:
    assert reply_of(chat(default_server, [user("write a poem")])) == NO_MATCH_REPLY


# -- matching -----------------------------------------------------------------------------


def test_rules_match_on_prompt_last_message_turn_and_system() -> None:
    script = [
        {"when": {"system_regex": "pirate"}, "reply": "arr"},
        {"when": {"prompt_regex": "sales", "turn": 1}, "reply": "load"},
        {"when": {"prompt_regex": "sales", "last_regex": "Error"}, "reply": "fix"},
        {"when": {"prompt_regex": "sales", "turn": 2}, "reply": "sum"},
    ]
    with FakeLLMServer(script) as server:
        assert (
            reply_of(chat(server, [{"role": "system", "content": "a pirate"}, user("x")])) == "arr"
        )
        assert reply_of(chat(server, [user("sales report")])) == "load"
        turn2 = [user("sales report"), assistant("load"), user("Observation:\n3")]
        assert reply_of(chat(server, turn2)) == "sum"
        failed = [user("sales report"), assistant("load"), user("Observation:\nKeyError")]
        assert reply_of(chat(server, failed)) == "fix"  # first match wins
        assert reply_of(chat(server, [user("other")])) == NO_MATCH_REPLY


def test_named_groups_are_substituted_and_other_braces_kept() -> None:
    script = [
        {
            "when": {"prompt_regex": r"name is (?P<name>\w+)", "last_regex": r"(?P<n>\d+)$"},
            "reply": 'd = {"k": 1}  # {name} has {n}, {unknown} stays',
        }
    ]
    with FakeLLMServer(script) as server:
        text = reply_of(chat(server, [user("my name is Ada"), assistant("?"), user("it is 7")]))
    assert text == 'd = {"k": 1}  # Ada has 7, {unknown} stays'


def test_times_limits_how_often_a_rule_fires() -> None:
    script: list[dict[str, Any]] = [
        {"status": 500, "error": "boom", "times": 2},
        {"reply": "ok"},
    ]
    with FakeLLMServer(script) as server:
        codes = [chat(server, [user("hi")]).status_code for _ in range(3)]
        last = chat(server, [user("hi")])
    assert codes == [500, 500, 200]
    assert reply_of(last) == "ok"


def test_error_rules_answer_like_an_openai_server() -> None:
    script = [{"status": 429, "error": "slow down", "headers": {"Retry-After": "2"}}]
    with FakeLLMServer(script) as server:
        response = chat(server, [user("hi")])
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["message"] == "slow down"


# -- what a real server does with the reply ----------------------------------------------


def test_stop_sequence_cuts_the_reply_and_is_dropped() -> None:
    script = [{"reply": "plan\n<execute>\nprint(1)\n</execute>\nand more"}]
    with FakeLLMServer(script) as server:
        body = chat(server, [user("hi")], stop=["</execute>"]).json()
        single = reply_of(chat(server, [user("hi")], stop="</execute>"))
    assert body["choices"][0]["message"]["content"] == "plan\n<execute>\nprint(1)\n"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert single == "plan\n<execute>\nprint(1)\n"


def test_a_rule_may_ignore_stop_sequences_as_some_servers_do() -> None:
    reply = '{"tool": "f", "arguments": {}}\nObservation: 1\n{"answer": 1}'
    with FakeLLMServer([{"reply": reply, "ignore_stop": True}]) as server:
        body = chat(server, [user("hi")], stop=["Observation:"]).json()
    assert body["choices"][0]["message"]["content"] == reply


def test_usage_counts_tokens_roughly() -> None:
    with FakeLLMServer([{"reply": "twelve chars"}]) as server:
        body = chat(server, [{"role": "system", "content": "s" * 40}, user("u" * 8)]).json()
    assert body["usage"] == {
        "prompt_tokens": 11 + 3,
        "completion_tokens": count_tokens("twelve chars"),
        "total_tokens": 14 + 4,
    }


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    with FakeLLMServer([{"reply": "x" * 400}]) as server:
        body = chat(server, [user("hi")], max_tokens=10).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] <= 10


# -- the HTTP surface ----------------------------------------------------------------------


def test_models_health_and_bad_requests(default_server: FakeLLMServer) -> None:
    root = default_server.url.removesuffix("/v1")
    assert httpx.get(f"{root}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{default_server.url}/models").json()["data"][0]["id"] == "actfleet-fake"
    assert httpx.get(f"{root}/nope").status_code == 404
    streaming = chat(default_server, [user("hi")], stream=True)
    assert streaming.status_code == 400
    assert "streaming" in streaming.json()["error"]["message"]
    garbage = httpx.post(f"{default_server.url}/chat/completions", content=b"{not json")
    assert garbage.status_code == 400
    assert httpx.post(f"{default_server.url}/chat/completions", json={}).status_code == 400


def test_concurrent_requests_are_not_serialized() -> None:
    # given 50 clients and a server that takes 0.5 s per reply
    with FakeLLMServer(latency_s=0.5) as server, httpx.Client(timeout=10) as client:
        body = {"model": "m", "messages": [user("Compute: 1")]}

        def one(_: int) -> int:
            return client.post(f"{server.url}/chat/completions", json=body).status_code

        with ThreadPoolExecutor(50) as pool:
            started = time.monotonic()
            codes = list(pool.map(one, range(50)))
            elapsed = time.monotonic() - started
    # then they all finish in about one latency, not fifty
    assert codes == [200] * 50
    assert elapsed < 1.5
    # and the server logged how late past its latency each reply went out
    assert len(server.late_s) == 50
    assert all(-0.001 < late < 0.5 for late in server.late_s)


def test_beyond_its_capacity_the_server_answers_429_at_once_and_spends_no_rule() -> None:
    # given a server that serves 2 requests at once, 0.5 s each, and a rule that fires once
    script: list[dict[str, Any]] = [{"reply": "first", "times": 1}, {"reply": "later"}]
    with FakeLLMServer(script, latency_s=0.5, capacity=2, retry_after_s=3) as server:
        with httpx.Client(timeout=10) as client, ThreadPoolExecutor(5) as pool:
            body = {"model": "m", "messages": [user("hi")]}
            started = time.monotonic()
            answers = list(
                pool.map(
                    lambda _: client.post(f"{server.url}/chat/completions", json=body), range(5)
                )
            )
            elapsed = time.monotonic() - started
            # when the two in service are done, there is room again
            after = client.post(f"{server.url}/chat/completions", json=body)
        # then 2 were served and 3 refused with 429 and the Retry-After, without waiting
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 429, 429, 429]
        refused = [a for a in answers if a.status_code == 429]
        assert all(a.headers["retry-after"] == "3" for a in refused)
        assert all(a.json()["error"]["type"] == "rate_limit_exceeded" for a in refused)
        assert elapsed < 2.0
        replies = sorted(reply_of(a) for a in answers if a.status_code == 200)
        assert replies == ["first", "later"]  # a refusal used up no rule
        assert after.status_code == 200
        assert (server.served, server.rejected, server.peak_in_service) == (3, 3, 2)
        assert server.in_service == 0
        assert 1.4 < server.busy_s < 3.0  # three replies of 0.5 s in service


def test_cli_checks_the_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["fake-llm", "--capacity", "0", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--capacity must be at least 1" in err and "Traceback" not in err


def test_per_rule_latency_overrides_the_servers() -> None:
    with FakeLLMServer([{"reply": "quick", "latency_s": 0}], latency_s=5) as server:
        started = time.monotonic()
        assert reply_of(chat(server, [user("hi")])) == "quick"
    assert time.monotonic() - started < 2


def test_stopped_server_refuses_connections() -> None:
    server = FakeLLMServer()
    url = server.start()
    with httpx.Client() as client:  # keeps its connection alive across the stop
        assert client.get(url.removesuffix("/v1") + "/healthz").status_code == 200
        server.stop()
        with pytest.raises(httpx.TransportError):
            client.get(url.removesuffix("/v1") + "/healthz")


# -- scripts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ({"reply": "x"}, "a JSON list of rules"),
        (["x"], "rule 0: expected an object"),
        ([{"reply": "x", "wen": {}}], "rule 0: unknown field"),
        ([{"reply": "x", "when": {"turns": 1}}], "rule 0: unknown condition"),
        ([{"reply": "x", "when": {"prompt_regex": "("}}], "rule 0: when.prompt_regex is not"),
        ([{"reply": "x"}, {"reply": "y", "when": {"turn": "2"}}], "rule 1: turn must be"),
        ([{"when": {}}], "rule 0: needs a 'reply'"),
        ([{"reply": "x", "times": 0}], "times must be a positive"),
        ([{"reply": "x", "status": 200}], "status must be an error status"),
        ([{"reply": "x", "latency_s": -1}], "latency_s must not be negative"),
        ([{"reply": "x", "ignore_stop": "yes"}], "ignore_stop must be true or false"),
    ],
)
def test_invalid_scripts_say_what_to_fix(script: object, problem: str) -> None:
    with pytest.raises(ScriptError, match=problem.replace("(", r"\(")):
        parse_script(script)


def test_load_script_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ScriptError, match="cannot read"):
        load_script(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ScriptError, match="not valid JSON"):
        load_script(bad)


EXAMPLE_TASKS = [
    json.loads(line)
    for line in (ROOT / "examples" / "batch.jsonl").read_text().splitlines()
    if line.strip()
]


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
@pytest.mark.parametrize("task", EXAMPLE_TASKS, ids=[t["custom_id"] for t in EXAMPLE_TASKS])
def test_the_example_script_answers_its_example_task_correctly(
    task: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an example task (examples/batch.jsonl) and the example script, which the
    # README's demo pairs with it
    spec = tmp_path / "task.json"
    spec.write_text(json.dumps(task))
    script = ROOT / "examples" / "fake_llm_script.json"
    # When `actfleet run` runs it in-process against the scripted model, in a real sandbox
    status = cli_main(["run", str(spec), "--fake-llm", str(script), "--sandbox", "bwrap", "--json"])
    result = json.loads(capsys.readouterr().out)
    # Then the agent finished with the expected answer, graded correct
    assert (result["status"], result["correct"]) == ("completed", True), result["answer"]
    assert status == 0


# -- the command ------------------------------------------------------------------------------


def test_cli_rejects_a_bad_script_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "script.json"
    bad.write_text(json.dumps([{"reply": "x", "when": {"turn": "one"}}]))

    code = cli_main(["fake-llm", "--script", str(bad), "--port", "0"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "rule 0: turn must be an integer" in err
    assert "Traceback" not in err


def test_cli_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "actfleet", "fake-llm", "--port", "0", "--latency", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert httpx.get(url.removesuffix("/v1") + "/healthz", timeout=5).status_code == 200
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

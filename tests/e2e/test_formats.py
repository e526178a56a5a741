"""The paper's comparison through the whole service: the same tasks in the ``code``,
``json`` and ``text`` action formats (``actfleet batch --formats``), real API, real worker,
bwrap sandboxes, and a fake model scripted the way real models answer: tool calls in the
forms function-calling and ReAct models write, a reply that ignores the format, a call of
a tool that does not exist, a call followed by an observation it made up (from a server
that ignores stop sequences), an answer in markdown fences, a model that re-runs the same
cell, one that only answers when told its turn is the last. ``actfleet report`` on the
three batches gives each format's figures side by side.

Each loop help changes an outcome here: without the repeat note the code ``count`` task
runs out of turns, without the last-turn note the text ``count`` task does, and without
reading fenced answers the code ``date`` task is graded wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from actfleet.fakellm import FakeLLMServer
from actfleet.stack import LocalStack
from store.apikeys import create_key
from store.keys import Keys
from tests.finetune_checks import read_openai_export

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]

REVIEW = "Fast shipping, fast support, and a fast app. Breakfast was not included."
SETUP = (
    "import datetime, re\n"
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "def c_to_f(celsius):\n    return celsius * 9 / 5 + 32\n"
    "def add_days(date_iso, days):\n"
    "    d = datetime.date.fromisoformat(date_iso) + datetime.timedelta(days=days)\n"
    "    return d.isoformat()\n"
    "def count_word(text, word):\n"
    "    return len(re.findall(rf'\\b{re.escape(word)}\\b', text, flags=re.IGNORECASE))\n"
    f"REVIEW = {REVIEW!r}\n"
)
TOOLS = [
    {"name": "fib", "signature": "fib(n: int) -> int", "description": "the n-th Fibonacci number"},
    {"name": "c_to_f", "signature": "c_to_f(celsius: float) -> float", "description": "C to F"},
    {
        "name": "add_days",
        "signature": "add_days(date_iso: str, days: int) -> str",
        "description": "the ISO date `days` days after `date_iso`",
    },
    {
        "name": "count_word",
        "signature": "count_word(text: str, word: str) -> int",
        "description": "how often `word` appears in `text`, ignoring case",
    },
]


def task(tag: str, prompt: str, expected: dict[str, Any], max_turns: int = 5) -> dict[str, Any]:
    return {
        "custom_id": tag,
        "prompt": f"[{tag}] {prompt}",
        "setup_code": SETUP,
        "tools": TOOLS,
        "limits": {"max_turns": max_turns, "exec_timeout_s": 30},
        "expected": expected,
    }


TASKS = [
    task(
        "fib", "Use fib to find the 20th Fibonacci number.", {"answer": 6765, "grader": "numeric"}
    ),
    task(
        "temp",
        "What is 37.5 degrees Celsius in Fahrenheit?",
        {"answer": 99.5, "grader": "numeric", "tolerance": 0.01},
    ),
    task(
        "date",
        "What date is 45 days after 2024-01-16? Answer in ISO format.",
        {"answer": "^2024-03-01$", "grader": "regex"},
    ),
    task(
        "count",
        f"How many times does the word 'fast' appear in the review REVIEW = {REVIEW!r}?",
        {"answer": 3, "grader": "numeric"},
        max_turns=4,
    ),
]

CODE = {"system_regex": "writing and running Python code"}
JSON = {"system_regex": "exactly one JSON object"}
TEXT = {"system_regex": "End Action"}
OBS_VALUE = r"^Observation:\nOut: '?(?P<out>[^'\n]+)'?"


def rule(fmt: dict[str, str], reply: str, **when: Any) -> dict[str, Any]:
    extra = {k: when.pop(k) for k in ("ignore_stop",) if k in when}
    return {"when": {**fmt, **when}, "reply": reply, **extra}


def call(tool: str, **arguments: Any) -> str:
    return json.dumps({"tool": tool, "arguments": arguments})


SCRIPT = [
    # -- code ---------------------------------------------------------------------------
    # a cell, then an observation the model made up and an answer, sent past the stop
    rule(
        CODE,
        "I will use the fib tool.\n<execute>\nprint(fib(20))\n</execute>\n"
        "Observation:\n6764\n<solution>6764</solution>",
        prompt_regex=r"\[fib\]",
        turn=1,
        ignore_stop=True,
    ),
    rule(CODE, "<execute>\nprint(c_to_f(37.5))\n</execute>", prompt_regex=r"\[temp\]", turn=1),
    rule(
        CODE,
        "<execute>\nprint(add_days('2024-01-16', 45))\n</execute>",
        prompt_regex=r"\[date\]",
        turn=1,
    ),
    # the answer in a fenced block inside the solution tags
    rule(
        CODE,
        "The date is:\n<solution>\n```\n{out}\n```\n</solution>",
        prompt_regex=r"\[date\]",
        last_regex=r"^Observation:\n(?P<out>\S+)",
    ),
    # re-runs its cell until told that it learnt nothing new
    rule(
        CODE,
        "Right, the count is {out}.\n<solution>{out}</solution>",
        prompt_regex=r"\[count\]",
        last_regex=r"^Observation:\n(?P<out>\d+)\n\[You already ran this exact code",
    ),
    rule(
        CODE,
        "Let me count.\n<execute>\nprint(count_word(REVIEW, 'fast'))\n</execute>",
        prompt_regex=r"\[count\]",
    ),
    rule(CODE, "<solution>{out}</solution>", last_regex=r"^Observation:\n(?P<out>[^\n\[]+)"),
    # -- json ---------------------------------------------------------------------------
    rule(
        JSON,
        f'I\'ll call the fib tool.\n{call("fib", n=20)}\nObservation: 6764\n{{"answer": 6764}}',
        prompt_regex=r"\[fib\]",
        turn=1,
        ignore_stop=True,
    ),
    # ignores the format, then follows it once told
    rule(
        JSON,
        "To convert Celsius to Fahrenheit, multiply by 9/5 and add 32; "
        "the c_to_f tool does that for 37.5.",
        prompt_regex=r"\[temp\]",
        turn=1,
    ),
    rule(JSON, call("c_to_f", celsius=37.5), prompt_regex=r"\[temp\]", last_regex="neither"),
    # a function-calling model's own form
    rule(
        JSON,
        '<tool_call>\n{"name": "add_days", "arguments": {"date_iso": "2024-01-16", "days": 45}}'
        "\n</tool_call>",
        prompt_regex=r"\[date\]",
        turn=1,
    ),
    # repeats its call whatever it is told, and runs out of turns
    rule(JSON, call("count_word", text=REVIEW, word="fast"), prompt_regex=r"\[count\]"),
    rule(JSON, '{"answer": "{out}"}', last_regex=OBS_VALUE),
    # -- text ---------------------------------------------------------------------------
    # answers only when told its turn is the last
    rule(
        TEXT,
        "Answer: {out}",
        prompt_regex=r"\[count\]",
        last_regex=r"^Observation:\nOut: (?P<out>\d+)\n\[This is your last turn",
    ),
    rule(
        TEXT,
        "Thought: I should use a Fibonacci tool.\nAction: fibonacci, 20 End Action",
        prompt_regex=r"\[fib\]",
        turn=1,
    ),
    rule(
        TEXT,
        "Thought: The tool is called fib.\nAction: fib, 20 End Action\nObservation: 6764\n"
        "Answer: 6764",
        prompt_regex=r"\[fib\]",
        last_regex="unknown tool",
        ignore_stop=True,
    ),
    rule(
        TEXT,
        "Thought: I need to convert the temperature.\nAction: c_to_f\nAction Input: 37.5",
        prompt_regex=r"\[temp\]",
        turn=1,
    ),
    rule(TEXT, 'Action: add_days, "2024-01-16", 45 End Action', prompt_regex=r"\[date\]", turn=1),
    rule(TEXT, "Answer: March 1, 2024", prompt_regex=r"\[date\]", last_regex="^Observation:"),
    *(
        rule(TEXT, f'Action: count_word, "{REVIEW}", "{word}"', prompt_regex=r"\[count\]", turn=t)
        for t, word in ((1, "fast"), (2, "Fast"), (3, "FAST"))
    ),
    rule(TEXT, f'Action: count_word, "{REVIEW}", "fast"', prompt_regex=r"\[count\]"),
    rule(TEXT, "Answer: {out}", last_regex=OBS_VALUE),
]

# What the script makes of each task: (succeeded, turns, failure class)
EXPECTED = {
    "code": {
        "fib": (True, 2, None),
        "temp": (True, 2, None),
        "date": (True, 2, None),
        "count": (True, 3, None),
    },
    "json": {
        "fib": (True, 2, None),
        "temp": (True, 3, None),
        "date": (True, 2, None),
        "count": (False, 4, "max_turns"),
    },
    "text": {
        "fib": (True, 3, None),
        "temp": (True, 2, None),
        "date": (False, 2, "wrong_answer"),
        "count": (True, 4, None),
    },
}


class Service:
    def __init__(self, stack: LocalStack, llm: FakeLLMServer) -> None:
        self.stack = stack
        self.llm = llm
        assert stack.redis_url is not None
        self.redis = redis.Redis.from_url(stack.redis_url)
        key, _ = create_key(self.redis, Keys("af"), "paper")
        self.env = {
            **os.environ,
            "ACTFLEET_API_URL": stack.api_url,
            "ACTFLEET_API_KEY": key,
        }

    def cli(self, *args: str, cwd: Path) -> tuple[int, str, str]:
        done = subprocess.run(
            [sys.executable, "-m", "actfleet", *args],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=240,
        )
        return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with FakeLLMServer(script=SCRIPT, latency_s=0.02) as llm:
        env = {
            "OPENAI_BASE_URL": llm.url,
            "OPENAI_API_KEY": "test",
            "ACTFLEET_SANDBOX": "bwrap",
            "ACTFLEET_MODEL": "fake",
        }
        local = LocalStack(concurrency=6, env=env, state_dir=tmp_path_factory.mktemp("stack"))
        with local:
            yield Service(local, llm)


@pytest.fixture(scope="module")
def run(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``actfleet batch tasks.jsonl --formats code,json,text --wait --json``, once."""
    work = tmp_path_factory.mktemp("paper")
    (work / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    code, out, err = service.cli(
        "batch",
        "tasks.jsonl",
        "--formats",
        "code,json,text",
        "--wait",
        "--poll-s",
        "0.3",
        "--out",
        "results.jsonl",
        "--json",
        cwd=work,
    )
    assert code == 0, err
    return {"work": work, **json.loads(out)}


def test_each_format_reports_its_figures(run: dict[str, Any]) -> None:
    batches = run["batches"]
    assert [b["format"] for b in batches] == ["code", "json", "text"]
    figures = {b["label"]: b for b in run["report"]["batches"]}
    assert list(figures) == ["code", "json", "text"]
    for fmt, tasks in EXPECTED.items():
        f = figures[fmt]
        assert f["action_format"] == fmt and f["finished"] == 4
        assert f["succeeded"] == sum(ok for ok, _, _ in tasks.values())
        assert f["success_rate"] == pytest.approx(f["succeeded"] / 4)
        assert f["mean_turns"] == pytest.approx(sum(t for _, t, _ in tasks.values()) / 4)
        want = {}
        for _, _, failure in tasks.values():
            if failure:
                want[failure] = want.get(failure, 0) + 1
        assert f["failure_classes"] == want
    # each task's outcome, from the results files the command wrote
    for b in batches:
        rows = [
            json.loads(x) for x in Path(run["work"], b["results_file"]).read_text().splitlines()
        ]
        got = {
            r["custom_id"]: (
                r["status"] == "completed" and r["correct"] is True,
                r["turns"],
                r["failure_class"],
            )
            for r in rows
        }
        assert got == EXPECTED[b["format"]], b["format"]
    # code against json: count is the only task one solved and the other did not
    pairs = {(c["a"], c["b"]): c for c in run["report"]["comparisons"]}
    assert pairs["code", "json"]["solved_only_by_a"] == ["count"]
    assert pairs["code", "text"]["solved_only_by_a"] == ["date"]
    assert pairs["json", "text"]["solved_only_by_a"] == ["date"]
    assert pairs["json", "text"]["solved_only_by_b"] == ["count"]


def test_report_on_the_three_batches_gives_the_same_figures_and_an_html_file(
    service: Service, run: dict[str, Any]
) -> None:
    ids = [b["id"] for b in run["batches"]]
    code, out, err = service.cli("report", *ids, "--json", "--html", "r.html", cwd=run["work"])
    assert code == 0, err
    report = json.loads(out)
    keys = ("label", "succeeded", "success_rate", "success_ci", "mean_turns", "failure_classes")
    assert [{k: b[k] for k in keys} for b in report["batches"]] == [
        {k: b[k] for k in keys} for b in run["report"]["batches"]
    ]
    html = Path(run["work"], "r.html").read_text()
    assert html.count('<rect class="bar"') >= 3 and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    code, out, err = service.cli("report", *ids, cwd=run["work"])
    assert code == 0, err
    assert "code" in out and "json" in out and "text" in out and "McNemar" in out


def trajectory(service: Service, run: dict[str, Any], fmt: str, cid: str) -> dict[str, Any]:
    batch_id = next(b["id"] for b in run["batches"] if b["format"] == fmt)
    code, out, err = service.cli("export", batch_id, "--trajectory", "--out", "-", cwd=run["work"])
    assert code == 0, err
    rows = {r["custom_id"]: r for r in map(json.loads, out.splitlines())}
    return rows[cid]


def test_every_format_asked_to_stop_before_an_observation(service: Service) -> None:
    stops = {}
    for body in service.llm.requests:
        system = body["messages"][0]["content"]
        fmt = next(
            f
            for f, w in (("code", CODE), ("json", JSON), ("text", TEXT))
            if w["system_regex"] in system
        )
        stops.setdefault(fmt, set()).add(tuple(body.get("stop") or ()))
    assert set(stops) == {"code", "json", "text"}
    for fmt, seen in stops.items():
        assert all(any("Observation:" in s for s in stop) for stop in seen), fmt


@pytest.mark.parametrize("fmt", ["code", "json", "text"])
def test_an_invented_observation_never_reaches_the_transcript(
    service: Service, run: dict[str, Any], fmt: str
) -> None:
    row = trajectory(service, run, fmt, "fib")
    assert row["correct"] is True and row["answer"] != "6764"
    for m in row["messages"]:
        if m["role"] == "assistant":
            assert "Observation" not in m["content"] and "6764" not in m["content"]
    assert any(
        m["content"].startswith("Observation:") and "6765" in m["content"]
        for m in row["messages"]
        if m["role"] == "user"
    )


def test_the_loop_helps_change_the_outcomes(service: Service, run: dict[str, Any]) -> None:
    # the code model re-ran its cell, was told so, and answered
    count = trajectory(service, run, "code", "count")
    notes = [m["content"] for m in count["messages"] if "You already ran" in m["content"]]
    assert len(notes) == 1 and count["status"] == "completed" and count["correct"] is True
    # the text model was told its turn was the last, and answered in it
    last = trajectory(service, run, "text", "count")
    assert "This is your last turn" in last["messages"][-2]["content"]
    assert last["turns"] == 4 and last["correct"] is True
    # the fenced answer was read as the answer
    date = trajectory(service, run, "code", "date")
    assert "```" in date["messages"][-1]["content"]
    assert date["answer"] == "2024-03-01" and date["correct"] is True
    # the json model that ignored the format was told how to call, and did
    temp = trajectory(service, run, "json", "temp")
    assert '{"tool":' in temp["messages"][3]["content"] and temp["correct"] is True


def test_the_correct_trajectories_export_for_fine_tuning(
    service: Service, run: dict[str, Any]
) -> None:
    batch_id = next(b["id"] for b in run["batches"] if b["format"] == "json")
    code, out, err = service.cli(
        "export", batch_id, "--format", "openai", "--only-correct", "--out", "-", cwd=run["work"]
    )
    assert code == 0, err
    dataset = read_openai_export(out)
    assert len(dataset) == 3  # json solved three of the four
    assert all(ex["messages"][-1]["content"].startswith('{"answer"') for ex in dataset)

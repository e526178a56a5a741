"""The CodeAct loop, driven by a scripted model and a fake sandbox."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from agent.errors import LLMError, LLMRejected, SetupError
from agent.events import EventType
from agent.loop import Checkpoint, Step, run_codeact
from agent.models import FailureClass, Result, Status, TaskSpec
from agent.observation import cap, format_observation
from agent.sandbox import ExecResult
from tests.fakes import FakeClock, FakeSandbox, ScriptedLLM


def spec(**overrides: object) -> TaskSpec:
    return TaskSpec.from_dict({"prompt": "What is 6*7?", **overrides})


def drain(gen: Generator[Step, None, Result]) -> tuple[list[Step], Result]:
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        return steps, stop.value


def test_code_then_answer_completes_and_grades() -> None:
    llm = ScriptedLLM(["<execute>print(6*7)</execute>", "<solution>42</solution>"])
    box = FakeSandbox({"print(6*7)": ExecResult(stdout="42\n", duration_s=0.1)})
    steps, result = drain(
        run_codeact(spec(expected={"answer": 42, "grader": "numeric"}), llm, box, model="m")
    )
    assert [s.event.type for s in steps] == [
        EventType.LLM_REPLY,
        EventType.EXEC_RESULT,
        EventType.LLM_REPLY,
    ]
    assert [s.event.turn for s in steps] == [1, 1, 2]
    # only the answering reply is final: nothing but grading runs after it
    assert [s.final for s in steps] == [False, False, True]
    assert result.status is Status.COMPLETED
    assert result.answer == "42" and result.correct is True and result.failure_class is None
    assert result.turns == 2
    assert result.usage.llm_calls == 2 and result.usage.total_tokens == 30
    assert result.timings.llm_s == pytest.approx(1.0)
    assert result.timings.exec_s == pytest.approx(0.1)
    # The model saw the observation of its code on turn 2.
    assert llm.requests[1].messages[-1]["content"] == "Observation:\n42"
    assert llm.requests[0].stop == ("</execute>", "\nObservation:")


def test_a_wrong_answer_is_completed_but_incorrect() -> None:
    llm = ScriptedLLM(["<solution>41</solution>"])
    _, result = drain(run_codeact(spec(expected={"answer": "42"}), llm, FakeSandbox(), model="m"))
    assert result.status is Status.COMPLETED
    assert result.correct is False and result.failure_class is FailureClass.WRONG_ANSWER


def test_the_system_prompt_documents_the_tools() -> None:
    llm = ScriptedLLM(["<solution>x</solution>"])
    tools = [{"name": "fib", "signature": "fib(n: int) -> int", "description": "Fibonacci"}]
    drain(run_codeact(spec(tools=tools), llm, FakeSandbox(), model="m"))
    system = llm.requests[0].messages[0]["content"]
    assert "- fib(n: int) -> int: Fibonacci" in system
    assert "<execute>" in system and "<solution>" in system


def test_a_reply_without_action_gets_a_nudge_and_three_in_a_row_fail() -> None:
    llm = ScriptedLLM(["hmm", "let me think", "still thinking"])
    steps, result = drain(run_codeact(spec(), llm, FakeSandbox(), model="m"))
    assert "neither code" in llm.requests[1].messages[-1]["content"]
    assert result.status is Status.FAILED and result.failure_class is FailureClass.NO_ACTION
    assert len(steps) == 3


def test_repeating_the_same_failing_code_is_stuck() -> None:
    boom = ExecResult(error="Traceback ...\nZeroDivisionError: division by zero")
    llm = ScriptedLLM(["<execute>1/0</execute>"] * 5)
    _, result = drain(run_codeact(spec(), llm, FakeSandbox({"1/0": boom}), model="m"))
    assert result.status is Status.FAILED and result.failure_class is FailureClass.STUCK
    assert result.turns == 3


def test_recovering_from_a_traceback_is_not_stuck() -> None:
    boom = ExecResult(error="NameError: name 'y' is not defined")
    llm = ScriptedLLM(
        [
            "<execute>print(y)</execute>",
            "<execute>y = 2\nprint(y)</execute>",
            "<solution>2</solution>",
        ]
    )
    _, result = drain(run_codeact(spec(), llm, FakeSandbox({"print(y)": boom}), model="m"))
    assert result.status is Status.COMPLETED and result.answer == "2"
    assert "NameError" in llm.requests[1].messages[-1]["content"]


def test_out_of_turns_fails() -> None:
    llm = ScriptedLLM([f"<execute>print({i})</execute>" for i in range(5)])
    _, result = drain(run_codeact(spec(limits={"max_turns": 2}), llm, FakeSandbox(), model="m"))
    assert result.status is Status.FAILED and result.failure_class is FailureClass.MAX_TURNS
    assert result.turns == 2


def test_the_token_budget_ends_the_task() -> None:
    llm = ScriptedLLM([f"<execute>print({i})</execute>" for i in range(5)])
    _, result = drain(run_codeact(spec(limits={"max_tokens": 20}), llm, FakeSandbox(), model="m"))
    assert result.failure_class is FailureClass.TOKEN_BUDGET
    assert result.usage.total_tokens == 30  # two calls of 15 tokens: the second crossed it
    assert llm.requests[1].max_tokens == 5  # the last call may only spend what is left


def test_the_wall_clock_limit_times_out() -> None:
    clock = FakeClock(step=4.0)  # every look at the clock costs 4 s
    llm = ScriptedLLM([f"<execute>print({i})</execute>" for i in range(10)])
    _, result = drain(
        run_codeact(spec(limits={"timeout_s": 10}), llm, FakeSandbox(), model="m", clock=clock)
    )
    assert result.status is Status.TIMED_OUT and result.failure_class is FailureClass.TIMEOUT


def test_cancellation_is_seen_before_the_next_step() -> None:
    flag = {"cancelled": False}
    llm = ScriptedLLM(["<execute>x = 1</execute>", "<execute>x = 2</execute>"])
    gen = run_codeact(spec(), llm, FakeSandbox(), model="m", cancelled=lambda: flag["cancelled"])
    next(gen)  # llm.reply of turn 1
    flag["cancelled"] = True
    steps, result = drain(gen)
    assert result.status is Status.CANCELLED
    assert steps == []  # the code of turn 1 never ran


def test_a_failing_setup_code_fails_the_task() -> None:
    box = FakeSandbox(raises=SetupError("setup_code raised NameError"))
    llm = ScriptedLLM(["<execute>print(1)</execute>"])
    _, result = drain(run_codeact(spec(), llm, box, model="m"))
    assert result.status is Status.FAILED and result.failure_class is FailureClass.SETUP_ERROR


def test_a_rejected_request_is_an_error_result_but_a_server_fault_propagates() -> None:
    _, result = drain(
        run_codeact(spec(), ScriptedLLM([LLMRejected("bad model")]), FakeSandbox(), model="m")
    )
    assert result.status is Status.ERROR and result.failure_class is FailureClass.LLM_REJECTED
    with pytest.raises(LLMError):
        drain(run_codeact(spec(), ScriptedLLM([LLMError("down")]), FakeSandbox(), model="m"))


def test_resuming_from_a_checkpoint_replays_cells_and_repeats_no_step() -> None:
    # Given a first attempt that stopped right after turn 2's reply was stored
    replies = ["<execute>a = 1</execute>", "<execute>b = a + 1</execute>", "<solution>2</solution>"]
    first = run_codeact(spec(), ScriptedLLM(replies), FakeSandbox(), model="m")
    stored: Checkpoint | None = None
    published = []
    for _ in range(3):
        step = next(first)
        published.append((step.event.turn, step.event.type))
        stored = step.checkpoint
    assert stored is not None and stored.pending_code == "b = a + 1"
    # When a second attempt resumes from it in a fresh sandbox
    box = FakeSandbox()
    steps, result = drain(
        run_codeact(
            spec(),
            ScriptedLLM(replies[2:]),
            box,
            model="m",
            attempt=2,
            resume=Checkpoint.from_dict(stored.to_dict()),
        )
    )
    published += [(s.event.turn, s.event.type) for s in steps]
    # Then earlier cells are replayed, the pending code runs, and no step repeats
    assert box.executed == ["a = 1", "b = a + 1"]
    assert len(published) == len(set(published)) == 5
    assert result.status is Status.COMPLETED and result.attempt == 2 and result.turns == 3


def test_observations_are_capped_keeping_head_and_tail() -> None:
    text = "".join(f"line {i}\n" for i in range(10_000))
    out = cap(text, 500)
    assert len(out) <= 500
    assert out.startswith("line 0\n") and out.rstrip().endswith("line 9999")
    assert "characters cut" in out


def test_observation_says_what_happened_to_the_session() -> None:
    timed = format_observation(
        ExecResult(timed_out=True, duration_s=30, error="KeyboardInterrupt"), 2000
    )
    assert "interrupted after 30s" in timed and "still there" in timed
    lost = format_observation(ExecResult(state_lost=True, note="Out of memory (512 MB)."), 2000)
    assert "Out of memory" in lost
    assert format_observation(ExecResult(value="42"), 2000) == "Observation:\nOut: 42"
    assert "printed nothing" in format_observation(ExecResult(), 2000)


# -- helping a model finish -----------------------------------------------------------


def answers_when(marker: str, answer: str, otherwise: str) -> object:
    """A model that answers once the last message says ``marker``, else repeats itself."""

    def reply(request: object) -> str:
        last = request.messages[-1]["content"]  # type: ignore[attr-defined]
        return answer if marker in last else otherwise

    return reply


def test_repeating_code_whose_output_was_seen_is_pointed_out_and_the_model_answers() -> None:
    # Given a model that re-runs a successful cell until it is told it learnt nothing new
    cell = "<execute>print(6*7)</execute>"
    model = answers_when("You already ran this exact code", "<solution>42</solution>", cell)
    llm = ScriptedLLM([cell, model, model, model])
    box = FakeSandbox({"print(6*7)": ExecResult(stdout="42\n")})
    # When it runs
    _, result = drain(
        run_codeact(spec(limits={"max_turns": 5}, expected={"answer": 42}), llm, box, model="m")
    )
    # Then the second run's observation says so and the model answers on the next turn
    assert result.status is Status.COMPLETED and result.correct is True
    assert result.turns == 3
    first, second = (m["content"] for m in result.messages if m["content"].startswith("Obs"))
    assert "already ran" not in first
    assert second.startswith("Observation:\n42\n") and "<solution>" in second


def test_the_same_code_with_new_output_is_not_a_repeat() -> None:
    outputs = iter(["1\n", "2\n"])

    class Counter(FakeSandbox):
        def execute(self, code: str, timeout_s: float, max_output_chars: int) -> ExecResult:
            return ExecResult(stdout=next(outputs))

    llm = ScriptedLLM(["<execute>n += 1; print(n)</execute>"] * 2 + ["<solution>2</solution>"])
    _, result = drain(run_codeact(spec(), llm, Counter(), model="m"))
    assert not any("already ran" in m["content"] for m in result.messages)


def test_the_model_is_told_when_its_turn_is_the_last() -> None:
    # Given a model that only answers when told it has no turns left
    model = answers_when(
        "This is your last turn", "<solution>42</solution>", "<execute>x</execute>"
    )
    llm = ScriptedLLM([f"<execute>print({i})</execute>" for i in range(2)] + [model])
    # When it has three turns
    _, result = drain(run_codeact(spec(limits={"max_turns": 3}), llm, FakeSandbox(), model="m"))
    # Then only the message opening turn 3 says so, and the model answers in it
    notes = ["last turn" in r.messages[-1]["content"] for r in llm.requests]
    assert notes == [False, False, True]
    assert result.status is Status.COMPLETED and result.answer == "42"


def test_the_last_turn_note_follows_a_nudge_too() -> None:
    llm = ScriptedLLM(["hmm", "hmm again"])
    drain(run_codeact(spec(limits={"max_turns": 2}), llm, FakeSandbox(), model="m"))
    assert "neither" in llm.requests[1].messages[-1]["content"]
    assert "last turn" in llm.requests[1].messages[-1]["content"]


def test_an_answer_fenced_inside_the_solution_is_graded_as_the_answer() -> None:
    llm = ScriptedLLM(["<solution>\n```\n42\n```\n</solution>"])
    _, result = drain(
        run_codeact(
            spec(expected={"answer": "42", "grader": "exact"}), llm, FakeSandbox(), model="m"
        )
    )
    assert result.answer == "42" and result.correct is True


def test_the_repeat_memory_survives_a_checkpoint() -> None:
    ck = Checkpoint(seen=("abc",), turn=2)
    assert Checkpoint.from_dict(ck.to_dict()) == ck
    old = {k: v for k, v in ck.to_dict().items() if k != "seen"}  # written before the field
    assert Checkpoint.from_dict(old).seen == ()


# -- action formats -------------------------------------------------------------------


FIB_TOOL = [{"name": "fib", "signature": "fib(n: int) -> int", "description": "Fibonacci"}]


@pytest.mark.parametrize(
    ("fmt", "call", "answer"),
    [
        ("json", '{"tool": "fib", "arguments": {"n": 20}}', '{"answer": 6765}'),
        ("text", "Thought: use fib.\nAction: fib, 20", "Answer: 6765"),
        ("code", "<execute>\nfib(n=20)\n", "<solution>6765</solution>"),
    ],
)
def test_each_format_calls_the_same_python_tool(fmt: str, call: str, answer: str) -> None:
    llm = ScriptedLLM([call, answer])
    box = FakeSandbox({"fib(n=20)": ExecResult(value="6765"), "fib(20)": ExecResult(value="6765")})
    _, result = drain(
        run_codeact(
            spec(action_format=fmt, tools=FIB_TOOL, expected={"answer": 6765, "grader": "numeric"}),
            llm,
            box,
            model="m",
        )
    )
    assert result.status is Status.COMPLETED and result.correct is True
    assert box.executed in (["fib(n=20)"], ["fib(20)"])
    # every format asks the server to stop before the model writes an observation
    assert any("Observation:" in s for s in llm.requests[0].stop)


@pytest.mark.parametrize(
    ("fmt", "reply"),
    [
        ("json", '{"tool": "fib", "arguments": {"n": 20}}\nObservation: 6765\n{"answer": 6765}'),
        ("text", "Action: fib, 20 End Action\nObservation: 6765\nAnswer: 6765"),
        (
            "code",
            "<execute>\nprint(fib(20))\n</execute>\nObservation:\n6765\n<solution>6765</solution>",
        ),
    ],
)
def test_an_invented_observation_from_a_server_ignoring_stops_is_dropped(
    fmt: str, reply: str
) -> None:
    # Given a server that sent past the stop sequence: a call, a made-up result, an answer
    llm = ScriptedLLM([reply, "I am done."])
    box = FakeSandbox()
    steps, _ = drain(
        run_codeact(
            spec(action_format=fmt, tools=FIB_TOOL, limits={"max_turns": 2}), llm, box, model="m"
        )
    )
    # Then the call ran, the made-up part is neither answered nor in the transcript
    assert len(box.executed) == 1
    first = steps[0].event.data
    assert first["action"] == "code" and "answer" not in first
    assert "6765" in first["dropped"] and "6765" not in first["content"]
    assistant = llm.requests[1].messages[2]
    assert assistant["role"] == "assistant" and "6765" not in assistant["content"]


def test_a_reply_ignoring_the_json_format_gets_a_nudge_in_that_format() -> None:
    llm = ScriptedLLM(["The 20th Fibonacci number is well known.", '{"answer": 6765}'])
    _, result = drain(
        run_codeact(spec(action_format="json", tools=FIB_TOOL), llm, FakeSandbox(), model="m")
    )
    nudge = llm.requests[1].messages[-1]["content"]
    assert '{"tool":' in nudge and '{"answer":' in nudge and "<execute>" not in nudge
    assert result.answer == "6765"


def test_a_call_of_an_unknown_tool_is_explained_with_the_right_form() -> None:
    llm = ScriptedLLM(["Action: fibonacci, 20", "Answer: 1"])
    drain(run_codeact(spec(action_format="text", tools=FIB_TOOL), llm, FakeSandbox(), model="m"))
    note = llm.requests[1].messages[-1]["content"]
    assert "unknown tool 'fibonacci'" in note and "Action: tool_name" in note


def test_an_answer_that_cannot_be_graded_is_a_clear_grading_failure() -> None:
    # Given a regex grader but no regex engine to run it
    llm = ScriptedLLM(["<solution>aaa</solution>"])
    task = spec(expected={"answer": "a+", "grader": "regex"})
    # When the model answers
    _, result = drain(run_codeact(task, llm, FakeSandbox(), model="m"))
    # Then the task completed, graded not correct, and says why it was not graded
    assert result.status is Status.COMPLETED and result.answer == "aaa"
    assert result.correct is False and result.failure_class is FailureClass.GRADING_ERROR
    assert result.error is not None and "could not be graded" in result.error

"""Action parsing: what real servers send must still become the right action."""

import pytest

from agent.actions import STOPS, complete_transcript, cut_at_stop, parse, unfence


def test_a_closed_execute_block_is_code() -> None:
    action = parse("Let me compute.\n<execute>\nx = 1\nprint(x)\n</execute>")
    assert action.kind == "code"
    assert action.code == "x = 1\nprint(x)"


def test_a_reply_cut_at_the_stop_sequence_still_holds_its_code() -> None:
    # The server stopped on </execute> and stripped it.
    action = parse("Thinking...\n<execute>\nprint(2 + 2)\n")
    assert action.code == "print(2 + 2)"


def test_several_blocks_run_in_order_as_one_cell() -> None:
    action = parse("<execute>a = 1</execute> then <execute>print(a)</execute>")
    assert action.code == "a = 1\n\nprint(a)"


def test_a_markdown_fence_inside_the_tags_is_unwrapped() -> None:
    action = parse("<execute>\n```python\nprint('hi')\n```\n</execute>")
    assert action.code == "print('hi')"


def test_fenced_code_without_tags_is_taken_as_code() -> None:
    action = parse("Here:\n```python\n    print(3)\n```")
    assert action.code == "print(3)"


def test_prose_only_is_no_action() -> None:
    assert parse("I think the answer is probably 4.").kind == "none"


def test_a_solution_is_an_answer() -> None:
    action = parse("Done. <solution> 42 </solution>")
    assert action.kind == "answer"
    assert action.answer == "42"


def test_code_and_solution_together_keep_both_and_code_wins() -> None:
    action = parse("<execute>print(6*7)</execute>\n<solution>42</solution>")
    assert action.kind == "code"
    assert action.answer == "42"


def test_an_unclosed_solution_at_the_end_is_read_to_the_end() -> None:
    assert parse("<solution>yes").answer == "yes"


def test_the_transcript_gets_the_stripped_closing_tag_back() -> None:
    assert complete_transcript("<execute>\nprint(1)") == "<execute>\nprint(1)\n</execute>"
    assert complete_transcript("<execute>x</execute>") == "<execute>x</execute>"


def test_json_tool_calls_become_a_call_with_keyword_arguments() -> None:
    action = parse('{"tool": "add", "arguments": {"a": 1, "b": true}}', "json", frozenset({"add"}))
    assert action.code == "add(a=1, b=True)"


def test_json_unknown_tool_is_explained() -> None:
    action = parse('{"tool": "rm", "arguments": {}}', "json", frozenset({"add"}))
    assert action.kind == "none"
    assert action.problem is not None and "unknown tool 'rm'" in action.problem


def test_json_answer() -> None:
    assert parse('```json\n{"answer": [1, 2]}\n```', "json").answer == "[1, 2]"


def test_text_action_must_be_a_single_known_call() -> None:
    tools = frozenset({"search"})
    assert parse("Let me look.\nAction: search('cats')", "text", tools).code == "search('cats')"
    bad = parse("Action: __import__('os').system('ls')", "text", tools)
    assert bad.kind == "none" and bad.problem is not None
    assert parse("Answer: cats", "text", tools).answer == "cats"


TOOLS = frozenset({"fib", "search", "add"})


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        # the documented form, with the stop sequence honoured or not
        ("Thought: I need fib.\nAction: fib, 20 End Action", "fib(20)"),
        ("Action: fib, 20", "fib(20)"),
        ("**Action:** fib, 20", "fib(20)"),
        # what models write instead: a Python call, keywords, ReAct's Action Input
        ("Action: fib(20)", "fib(20)"),
        ("Action: add(1, 2)", "add(1, 2)"),
        ("Action: fib, n=20", "fib(n=20)"),
        ('Action: fib\nAction Input: {"n": 20}', "fib(n=20)"),
        ("Action: fib\nAction Input: 20", "fib(20)"),
        # bare words are text; quoted commas stay inside their string
        ("Action: search, New York", "search('New York')"),
        ('Action: add, [1, 2], "a,b" End Action', "add([1, 2], 'a,b')"),
    ],
)
def test_text_actions_become_a_call_with_literal_arguments(reply: str, code: str) -> None:
    assert parse(reply, "text", TOOLS).code == code


def test_text_actions_that_are_not_a_plain_call_are_explained() -> None:
    for reply in ("Action: fib(__import__('os'))", "Action: 12, fib", "Action: rm, 1"):
        action = parse(reply, "text", TOOLS)
        assert action.kind == "none" and action.problem, reply


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ('{"tool": "fib", "arguments": {"n": 20}}', "fib(n=20)"),
        ('{"tool": "fib", "args": [20]}', "fib(20)"),  # the paper's positional form
        # function-calling models: "name", arguments as a JSON string, Qwen's tags
        ('<tool_call>{"name": "fib", "arguments": "{\\"n\\": 20}"}</tool_call>', "fib(n=20)"),
        ('I will call it.\n```json\n{"tool": "fib", "arguments": {"n": 20}}\n```', "fib(n=20)"),
    ],
)
def test_json_tool_calls_in_the_forms_models_write(reply: str, code: str) -> None:
    assert parse(reply, "json", TOOLS).code == code


def test_json_and_text_answers_in_any_of_the_usual_forms() -> None:
    assert parse("Answer: 42\n\nI hope this helps.", "text", TOOLS).answer == "42"
    assert parse("Answer:\n```\n42\n```", "text", TOOLS).answer == "42"
    assert parse("Answer: 5", "json", TOOLS).answer == "5"
    assert parse("<solution>5</solution>", "json", TOOLS).answer == "5"
    assert parse("I think it is 5.", "json", TOOLS).kind == "none"


@pytest.mark.parametrize(
    "wrapped",
    [
        "<solution>\n```\n42\n```\n</solution>",
        "<solution>```python\n42\n```</solution>",
        "<solution>`42`</solution>",
        "<solution> 42 </solution>",
    ],
)
def test_an_answer_in_markdown_fences_inside_the_solution_is_the_answer(wrapped: str) -> None:
    assert parse(wrapped).answer == "42"


def test_unfence_leaves_inner_backticks_alone() -> None:
    assert unfence("`a` and `b`") == "`a` and `b`"
    assert unfence("```\n[1, 2]\n```") == "[1, 2]"


@pytest.mark.parametrize(
    ("fmt", "reply", "kept"),
    [
        (
            "code",
            "<execute>\nprint(1)\n</execute>\nObservation:\n1\n<solution>1</solution>",
            "<execute>\nprint(1)\n",
        ),
        ("code", "<execute>a = 1</execute><execute>b = 2</execute>", "<execute>a = 1"),
        (
            "json",
            '{"tool": "fib", "arguments": {"n": 20}}\nObservation: 6765\n{"answer": 6765}',
            '{"tool": "fib", "arguments": {"n": 20}}\n',
        ),
        ("text", "Action: fib, 20 End Action\nObservation: 6765\nAnswer: 6765", "Action: fib, 20 "),
        ("text", "Action: fib, 20\nObservation: 6765\nAnswer: 6765", "Action: fib, 20\n"),
    ],
)
def test_a_reply_is_cut_at_its_formats_first_stop_sequence(fmt: str, reply: str, kept: str) -> None:
    text, dropped = cut_at_stop(reply, STOPS[fmt])
    assert text == kept and text + dropped == reply
    # the invented observation and whatever followed it are gone: only the call is left
    assert parse(text, fmt, TOOLS).kind == "code"


def test_every_format_stops_before_an_observation_within_the_servers_limit() -> None:
    for stops in STOPS.values():
        assert any("Observation:" in s for s in stops) and len(stops) <= 4


def test_the_text_transcript_gets_end_action_back() -> None:
    assert complete_transcript("Action: fib, 20 ", "text") == "Action: fib, 20 End Action"
    assert complete_transcript("Answer: 3", "text") == "Answer: 3"


def test_each_format_documents_the_same_tools_its_own_way() -> None:
    from agent.models import TaskSpec
    from agent.prompts import system_prompt

    tools = [
        {"name": "add", "signature": "add(a: int, b: float = 1.0) -> float", "description": "sum"}
    ]
    prompts = {
        f: system_prompt(TaskSpec.from_dict({"prompt": "x", "tools": tools, "action_format": f}))
        for f in ("code", "json", "text")
    }
    assert "- add(a: int, b: float = 1.0) -> float: sum" in prompts["code"]
    schema = (
        '{"name": "add", "description": "sum", "parameters": {"type": "object", "properties": '
        '{"a": {"type": "integer"}, "b": {"type": "number"}}, "required": ["a"]}}'
    )
    assert schema in prompts["json"]
    assert "Action: add, <a>, <b> End Action" in prompts["text"]
    for p in prompts.values():
        assert "Never write an observation yourself" in p

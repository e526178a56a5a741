"""Action parsing: what real servers send must still become the right action."""

from agent.actions import complete_transcript, parse


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
    assert action.code == "add(**{'a': 1, 'b': True})"


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

"""The task spec's table: one set of rules for the validator and the JSON Schema."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest

from agent.errors import SpecError
from agent.models import Expected, Limits, LLMParams, SandboxSpec, TaskSpec, Tool
from agent.specschema import (
    EXPECTED,
    LIMITS,
    LLM,
    MAX_DEPTH,
    SANDBOX,
    TASK_SPEC,
    TOOL,
    Number,
    Section,
    find,
    json_schema,
    narrow,
)

B64 = base64.b64encode(b"x").decode()


def problems(raw: dict[str, Any], table: Section = TASK_SPEC) -> list[str]:
    with pytest.raises(SpecError) as info:
        TaskSpec.from_dict(raw, table)
    return info.value.problems


@pytest.mark.parametrize(
    ("section", "instance"),
    [(LIMITS, Limits()), (SANDBOX, SandboxSpec()), (LLM, LLMParams()), (TOOL, Tool(name="f"))],
)
def test_the_tables_defaults_are_the_models_defaults(section: Section, instance: object) -> None:
    for f in section.fields:
        if not f.required:
            assert f.default == getattr(instance, f.name), f"{section.name}.{f.name}"
    assert set(section.names) == {f.name for f in dataclasses.fields(instance)}  # type: ignore[arg-type]
    assert EXPECTED.field("grader").default == Expected(None).grader


@pytest.mark.parametrize(
    "path",
    ["a", "data/x.csv", ".hidden", "..dots", "...", "a b/c-d_e+f=g@h,i", "x" * 255],
)
def test_relative_paths_inside_the_work_dir_are_accepted(path: str) -> None:
    spec = TaskSpec.from_dict({"prompt": "p", "files": [{"path": path, "content_b64": B64}]})
    assert spec.files[0].path == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".",
        "a/.",
        "./a",
        "..",
        "a/../b",
        "/etc/passwd",
        "a//b",
        "a/",
        "a\\b",
        "a\x00b",
        "a\nb",
        "a\x7fb",
        "caf\u00e9",
        "x" * 256,
        "/".join("a" * 17),
    ],
)
def test_paths_that_are_not_plain_relative_files_are_refused(path: str) -> None:
    found = problems({"prompt": "p", "files": [{"path": path, "content_b64": B64}]})
    assert len(found) == 1 and found[0].startswith("files[0].path: ")
    assert "relative path inside the work dir" in found[0] or "limit" in found[0]


def test_a_path_cannot_be_both_a_file_and_a_directory() -> None:
    def files(*paths: str) -> dict[str, Any]:
        return {"prompt": "p", "files": [{"path": p, "content_b64": B64} for p in paths]}

    assert problems(files("a", "a/b")) == [
        "files[1].path: 'a' is a file (files[0]), not a directory"
    ]
    assert problems(files("a/b", "a")) == ["files[1].path: 'a' is a directory of files[0]'s path"]
    # the same path twice: the later file replaces the earlier one
    assert len(TaskSpec.from_dict(files("a", "a")).files) == 2


@pytest.mark.parametrize("custom_id", ["row-1\n", "row 1", "", "é", "a\r", "\n"])
def test_a_custom_id_must_be_wholly_made_of_the_allowed_characters(custom_id: str) -> None:
    [found] = problems({"prompt": "p", "custom_id": custom_id})
    assert found.startswith("custom_id: use 1-128 characters")


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"prompt": "\udfff"}, "prompt"),
        ({"prompt": "p", "metadata": {"k": "\udfff"}}, "metadata.k"),
        ({"prompt": "p", "metadata": {"\ud800": "v"}}, "metadata.\\ud800"),
        (
            {"prompt": "p", "tools": [{"name": "f", "description": "a\udc00"}]},
            "tools[0].description",
        ),
        ({"prompt": "p", "expected": {"answer": [[{"x": "\udfff"}]]}}, "expected.answer[0][0].x"),
        ({"prompt": "p", "colour\udfff": 1}, "colour\\udfff"),
    ],
)
def test_text_that_utf8_cannot_encode_is_refused_naming_the_field(
    raw: dict[str, Any], where: str
) -> None:
    found = problems(raw)
    assert any(p.startswith(f"{where}: is not valid Unicode text") for p in found), found
    for p in found:
        p.encode("utf-8")  # every message can be sent


def test_nesting_deeper_than_the_limit_is_refused_with_its_path() -> None:
    # The spec and its expected section are two of the levels; the answer has the rest.
    answer: Any = 1
    for _ in range(MAX_DEPTH - 2):
        answer = [answer]
    TaskSpec.from_dict({"prompt": "p", "expected": {"answer": answer}})
    [found] = problems({"prompt": "p", "expected": {"answer": [answer]}})
    assert found.startswith("expected.answer[0]")
    assert f"deeper than {MAX_DEPTH} levels" in found


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1.5, "3", True])
def test_integers_are_finite_whole_numbers(value: object) -> None:
    [found] = problems({"prompt": "p", "limits": {"max_turns": value}})
    assert found.startswith("limits.max_turns: expected an integer")


def test_a_whole_float_counts_as_an_integer_as_in_json_schema() -> None:
    assert TaskSpec.from_dict({"prompt": "p", "limits": {"max_turns": 3.0}}).limits.max_turns == 3


def test_bounds_of_the_fields_that_had_none() -> None:
    found = problems(
        {
            "prompt": "p",
            "llm": {"max_tokens_per_turn": 0, "seed": 2**63},
            "limits": {"max_tokens": 0},
        }
    )
    assert "llm.max_tokens_per_turn: must be between 1 and 1000000, got 0" in found
    assert "llm.seed: must be between 0 and 9223372036854775807, got 9223372036854775808" in found
    assert "limits.max_tokens: must be between 1 and 1000000000, got 0" in found


def test_blank_prompts_and_nameless_tools_are_refused() -> None:
    found = problems({"prompt": " \t\n", "tools": [{}]})
    assert found == ["prompt: must not be blank", "tools[0].name: is required"]


def test_a_regex_grader_needs_a_string_pattern() -> None:
    [found] = problems({"prompt": "p", "expected": {"answer": 5, "grader": "regex"}})
    assert found.startswith("expected.answer: must be a string")


def test_null_means_the_default() -> None:
    spec = TaskSpec.from_dict(
        {"prompt": "p", "custom_id": None, "limits": {"max_turns": None}, "sandbox": None}
    )
    assert spec.limits.max_turns == 10 and spec.sandbox == SandboxSpec()


def test_a_narrowed_table_names_the_cap_it_enforces() -> None:
    memory = find(TASK_SPEC, "sandbox.memory_mb").kind
    assert isinstance(memory, Number)
    table = narrow(
        TASK_SPEC, {"sandbox.memory_mb": dataclasses.replace(memory, hi=1024, cap="the cap, X")}
    )
    [found] = problems({"prompt": "p", "sandbox": {"memory_mb": 2048}}, table)
    assert found == "sandbox.memory_mb: must be at most 1024 (the cap, X), got 2048"
    assert TASK_SPEC.field("sandbox").kind is SANDBOX  # the table itself is unchanged


def test_the_json_schema_covers_every_field_and_its_refs_resolve() -> None:
    schemas = json_schema(TASK_SPEC, lambda name: f"#/{name}")
    assert set(schemas) == {
        "TaskSpec",
        "Tool",
        "File",
        "Limits",
        "SandboxSpec",
        "LLMParams",
        "Expected",
        "Webhook",
    }
    assert set(schemas["TaskSpec"]["properties"]) == set(TASK_SPEC.names)
    assert schemas["TaskSpec"]["required"] == ["prompt"]
    refs = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(schemas)
    assert refs and all(r.removeprefix("#/") in schemas for r in refs)
    llm = schemas["LLMParams"]["properties"]
    assert llm["max_tokens_per_turn"]["anyOf"][0] == {
        "type": "integer",
        "minimum": 1,
        "maximum": 1_000_000,
    }
    assert schemas["TaskSpec"]["properties"]["custom_id"]["anyOf"][0]["pattern"] == (
        "^(?:[A-Za-z0-9._:/@+=-]{1,128})$"
    )


def test_a_stored_spec_from_older_rules_still_decodes() -> None:
    stored = {
        "prompt": "p\udfff",
        "custom_id": "row\n",
        "files": [{"path": "a/.", "content_b64": B64}, {"path": "ok", "content_b64": B64}],
        "metadata": {"k": "\udfff"},
    }
    spec = TaskSpec.from_stored(stored)
    assert spec.prompt == "p\ufffd" and spec.metadata == {"k": "\ufffd"}
    assert spec.custom_id is None and [f.path for f in spec.files] == ["ok"]

"""Every numeric bound of the task spec has one home (``agent.specschema``): the API refuses
with 422 exactly what the model reader (``TaskSpec.from_dict``) refuses, with the same
words, accepts what it accepts, and its OpenAPI document states the same bounds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.errors import SpecError
from agent.models import TaskSpec
from agent.specschema import TASK_SPEC, Number, Section
from api.bodies import spec_rules
from tests.api.conftest import Fleet, spec


def numbers(section: Section, prefix: str = "") -> Iterator[tuple[str, Number]]:
    for f in section.fields:
        if isinstance(f.kind, Number):
            yield prefix + f.name, f.kind
        elif isinstance(f.kind, Section):
            yield from numbers(f.kind, prefix + f.name + ".")


BOUNDS = list(numbers(TASK_SPEC))


def test_the_table_bounds_the_fields_once_reported_unbounded_in_one_place() -> None:
    assert {"limits.max_tokens", "llm.max_tokens_per_turn", "llm.seed"} <= {p for p, _ in BOUNDS}


def raw_with(path: str, value: int | float) -> dict[str, Any]:
    section, name = path.split(".")
    extra: dict[str, Any] = {section: {name: value}}
    if section == "expected":  # a tolerance needs an answer to be graded against
        extra[section] |= {"answer": 1, "grader": "numeric"}
    return spec(**extra)


def around(kind: Number) -> list[tuple[int | float, bool]]:
    """Values at and just past each end, and whether they are inside."""
    if kind.integer:
        lo, hi = int(kind.lo), int(kind.hi)
        return [(lo, True), (hi, True), (lo - 1, False), (hi + 1, False)]
    step_lo, step_hi = max(abs(kind.lo), 1.0) * 1e-6, max(abs(kind.hi), 1.0) * 1e-6
    return [
        (kind.lo, True),
        (kind.hi, True),
        (kind.lo - step_lo, False),
        (kind.hi + step_hi, False),
    ]


def reader_problems(raw: dict[str, Any], table: Section) -> list[str]:
    try:
        TaskSpec.from_dict(raw, table)
    except SpecError as e:
        return e.problems
    return []


@pytest.mark.parametrize(("path", "base"), BOUNDS, ids=[p for p, _ in BOUNDS])
def test_every_numeric_bound_is_enforced_alike_by_the_api_and_the_reader(
    fleet: Fleet, path: str, base: Number
) -> None:
    # given the table this server reads specs with (the shared one, narrowed to its caps)
    table = spec_rules(fleet.api.settings).table
    section, name = path.split(".")
    kind = table.field(section).kind
    assert isinstance(kind, Section)
    bound = kind.field(name).kind
    assert isinstance(bound, Number) and bound.integer == base.integer
    with fleet.client() as c:
        schema = c.get("/openapi.json").json()["components"]["schemas"]
        for value, inside in around(bound):
            raw = raw_with(path, value)
            # when the API and the reader get the same spec
            r = c.post("/v1/tasks", json=raw)
            expected = reader_problems(raw, table)
            # then both accept it, or both refuse it for the same reason
            if inside:
                assert expected == [] and r.status_code == 202, (value, r.text)
            else:
                assert any(p.startswith(f"{path}: ") for p in expected), (value, expected)
                assert r.status_code == 422, (value, r.text)
                assert r.json()["detail"]["problems"] == expected
    # and the published schema says the same bounds
    documented = schema[kind.name]["properties"][name]["anyOf"][0]
    assert (documented["minimum"], documented["maximum"]) == (bound.lo, bound.hi)
    assert documented["type"] == ("integer" if bound.integer else "number")

"""The staged form of a new task: the hand-built ``task.queued`` event is the one
``agent.events.Event`` would make (it is built as a dict only for speed)."""

from __future__ import annotations

import pytest

from agent.events import Event, EventType
from agent.models import TaskSpec
from store.staging import queued_event
from tests.records import new_record


@pytest.mark.parametrize(
    ("custom_id", "batch_id"), [(None, None), ("c-1", None), (None, "b1"), ("c-2", "b2")]
)
def test_the_queued_event_is_events_own(custom_id: str | None, batch_id: str | None) -> None:
    rec = new_record(TaskSpec(prompt="x", custom_id=custom_id), batch_id=batch_id)
    data = {"task_id": rec.id}
    if custom_id:
        data["custom_id"] = custom_id
    if batch_id:
        data["batch_id"] = batch_id
    expected = Event(EventType.QUEUED, turn=0, attempt=0, ts=rec.created_at, data=data)
    assert queued_event(rec) == expected.to_dict()

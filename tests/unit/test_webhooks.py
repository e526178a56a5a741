"""The webhook contract as pure functions: signatures (checked against the spec's test vector
and verified by the independent ``standardwebhooks`` implementation), payloads, outcomes,
and the retry schedule."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from agent.models import FailureClass, Result, Status, TaskSpec
from store.records import TaskRecord
from store.webhook_secrets import new_secret
from workers.webhooks import (
    Outcome,
    batch_payload,
    body_of,
    headers,
    outcome_of,
    retry_at,
    sign,
    task_payload,
)

# The example of the Standard Webhooks specification and its reference libraries.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = '{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_spec_test_vector() -> None:
    assert sign(SECRET, MSG_ID, TIMESTAMP, BODY) == EXPECTED


def test_the_independent_implementation_accepts_what_we_sign() -> None:
    # Given a fresh tenant secret and a body signed now
    secret = new_secret()
    now = int(time.time())
    signed = headers([secret], "msg_task_1", now, BODY)
    # Then standardwebhooks verifies it, and rejects a tampered body or another secret
    assert Webhook(secret).verify(BODY, signed) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY.replace("2", "3"), signed)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, signed)


def test_during_a_rotation_both_secrets_sign_and_either_verifies() -> None:
    new, old = new_secret(), new_secret()
    signed = headers([new, old], "msg_task_1", int(time.time()), BODY)
    assert len(signed["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        Webhook(secret).verify(BODY, signed)


def test_there_is_no_unsigned_mode() -> None:
    with pytest.raises(ValueError, match="always signed"):
        headers([], MSG_ID, TIMESTAMP, BODY)


def test_a_task_payload_is_thin_ids_status_correct_and_links() -> None:
    spec = TaskSpec.from_dict({"prompt": "secret plan", "custom_id": "c1"})
    result = Result(
        Status.COMPLETED, FailureClass.WRONG_ANSWER, answer="41", correct=False, turns=3
    )
    rec = TaskRecord(
        id="task_1", tenant="t", spec=spec, status=Status.COMPLETED, attempt=1, result=result
    )
    payload = task_payload(rec, now=1_700_000_000.25)
    assert payload["type"] == "task.finished"
    assert payload["timestamp"] == "2023-11-14T22:13:20.250Z"
    data = payload["data"]
    assert (data["task_id"], data["custom_id"], data["status"], data["correct"]) == (
        "task_1",
        "c1",
        "completed",
        False,
    )
    assert data["failure_class"] == "wrong_answer" and data["turns"] == 3
    assert data["links"]["task"] == "/v1/tasks/task_1"
    body = body_of(payload)
    assert "41" not in body and "secret plan" not in body  # no answer, no prompt


def test_a_batch_payload_carries_counts_and_the_correct_count() -> None:
    batch = {"id": "batch_1", "total": "3", "correct": "1", "cancel_requested": "1"}
    data = batch_payload(batch, {"completed": 2, "cancelled": 1}, now=0.0)["data"]
    assert data["status"] == "cancelled" and data["total"] == 3 and data["correct"] == 1
    assert data["counts"] == {"completed": 2, "cancelled": 1}
    assert data["links"]["results"] == "/v1/batches/batch_1/results"


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (410, Outcome.DISABLED),
        (301, Outcome.FAILED),  # redirects are not followed
        (400, Outcome.FAILED),
        (404, Outcome.FAILED),
    ],
)
def test_outcome_of_each_answer(code: int, outcome: Outcome) -> None:
    assert outcome_of(code) is outcome


def test_retries_back_off_exponentially_with_jitter_up_to_a_cap() -> None:
    def at(attempt: int, r: float) -> float | None:
        return retry_at(attempt, 0.0, 1e9, base_s=5, max_s=3600, rand=lambda: r)

    assert [at(n, 0.999999) for n in (1, 2, 3, 4)] == pytest.approx([5, 10, 20, 40], rel=1e-5)
    assert [at(n, 0.0) for n in (1, 2, 3, 4)] == [2.5, 5, 10, 20]  # jitter: half to full
    assert at(30, 0.999999) == pytest.approx(3600, rel=1e-5)


def test_retries_stop_at_the_end_of_the_window() -> None:
    assert retry_at(3, now=100.0, deadline=109.0, base_s=5, max_s=60, rand=lambda: 0.0) is None
    assert retry_at(1, now=100.0, deadline=109.0, base_s=5, max_s=60, rand=lambda: 0.0) == 102.5


def test_a_receivers_retry_after_delays_the_next_attempt_within_the_cap_and_window() -> None:
    def at(retry_after_s: float, deadline: float = 1e9) -> float | None:
        return retry_at(
            1, 100.0, deadline, base_s=5, max_s=60, rand=lambda: 0.0, retry_after_s=retry_after_s
        )

    assert at(30) == 130.0  # later than the backoff's 102.5
    assert at(0) == 102.5  # never sooner than the backoff: no tight loop on "0"
    assert at(86_400) == 160.0  # a day is capped at max_s
    assert at(30, deadline=120.0) is None  # past the window: give up

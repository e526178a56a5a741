"""Webhook signing follows the Standard Webhooks spec (checked against its test vector)."""

from __future__ import annotations

from workers.webhooks import backoff_s, delivery_for, headers, sign

# The example in the Standard Webhooks specification / reference libraries.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = '{"test": 2432232314}'
EXPECTED = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_spec_test_vector() -> None:
    assert sign(SECRET, MSG_ID, TIMESTAMP, BODY) == EXPECTED


def test_headers_carry_id_timestamp_and_signature_only_with_a_secret() -> None:
    signed = headers(SECRET, MSG_ID, TIMESTAMP, BODY)
    assert signed["webhook-id"] == MSG_ID and signed["webhook-timestamp"] == str(TIMESTAMP)
    assert signed["webhook-signature"].startswith("v1,")
    assert "webhook-signature" not in headers(None, MSG_ID, TIMESTAMP, BODY)


def test_a_delivery_has_a_stable_id_so_receivers_can_deduplicate_retries() -> None:
    a = delivery_for({"id": "task_1", "status": "completed"}, "http://h/hook")
    b = delivery_for({"id": "task_1", "status": "completed"}, "http://h/hook")
    assert a == b and a.msg_id == "msg_task_1_finished"


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in range(4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff_s(30) == 3600.0

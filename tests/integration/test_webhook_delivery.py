"""The delivery machinery on real parts: a real redis-server holding the outbox, the
deliverer each worker runs, and real HTTP(S) receivers on loopback (allowlisted).

Every request a receiver gets is verified with the independent ``standardwebhooks``
implementation. Names are resolved only through ``workers.webhook_http.resolve``, which
these tests replace: no external name is ever looked up.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from structlog.testing import LogCapture

from agent.destinations import Allowlist
from agent.events import Event, EventType
from agent.models import Result, Status, TaskSpec, Webhook
from store.apikeys import issue_key
from store.batches import BatchRecord
from store.keys import Keys
from store.records import new_batch_id
from store.webhook_secrets import rotate, signing_secrets
from store.webhooks import WebhookOutbox
from store.worker_store import Claim, WorkerStore
from tests.conftest import free_port
from tests.receivers import Listener, Receiver
from tests.records import create, new_record
from workers import webhook_delivery, webhook_http
from workers.webhook_delivery import DeliveryPolicy, WebhookDeliverer
from workers.webhooks import Outcome

LOOPBACK = Allowlist.parse("127.0.0.1/32")
TENANT = "acme"


class Env:
    def __init__(self, redis_url: str) -> None:
        self.r = redis.Redis.from_url(redis_url)
        self.keys = Keys("t")
        self.store = WorkerStore(self.r, self.keys)
        self.outbox = WebhookOutbox(self.r, self.keys)
        issued = issue_key(self.r, self.keys, TENANT)
        assert issued.webhook_secret is not None
        self.secret = issued.webhook_secret
        self.deliverers: list[WebhookDeliverer] = []

    def finished_task(
        self, url: str | None, status: Status = Status.COMPLETED, batch_id: str | None = None
    ) -> str:
        """A task (with a webhook to ``url``) that a worker finished (FINISH made it due)."""
        spec = TaskSpec(prompt="p", webhook=Webhook(url) if url else None)
        rec = new_record(spec, tenant=TENANT, batch_id=batch_id)
        create(self.store, rec)
        if batch_id and self.r.hexists(self.keys.batch(batch_id), "webhook_url"):
            # as the intake flags the counts of a batch with a webhook
            self.r.hset(self.keys.batch_counts(batch_id, self.keys.shard(rec.id)), "webhook", "1")
        claim = self.store.claim(rec.id, "w0")
        assert isinstance(claim, Claim)
        result = Result(status, answer="4", correct=True, turns=1, attempt=1)
        event = Event(EventType.FINISHED, 1, 1, time.time(), {"status": status.value})
        assert self.store.finish(claim.record, claim.owner, result, event)
        return rec.id

    def finished_batch(self, url: str, n: int = 2) -> str:
        """A batch with a webhook to ``url`` whose ``n`` tasks finished."""
        batch = BatchRecord(new_batch_id(), TENANT, n, time.time(), webhook_url=url)
        self.r.hset(self.keys.batch(batch.id), mapping=batch.to_hash())  # type: ignore[arg-type]
        for _ in range(n):
            self.finished_task(None, batch_id=batch.id)
        self.outbox.schedule_batches()  # what every worker's delivery loop does first
        return batch.id

    def deliverer(self, worker: str = "w1", **policy: Any) -> WebhookDeliverer:
        ssl_context = policy.pop("ssl_context", None)
        settings: dict[str, Any] = {"allowlist": LOOPBACK, "backoff_base_s": 0.05, "poll_s": 0.05}
        d = WebhookDeliverer(
            self.outbox,
            self.store.get,
            DeliveryPolicy(**{**settings, **policy}),
            worker,
            ssl_context=ssl_context,
        )
        self.deliverers.append(d)
        return d

    def deliver_now(self, subject_id: str, d: WebhookDeliverer | None = None) -> Outcome:
        lease = self.outbox.claim(subject_id, "w1", 86_400)
        assert lease is not None, "not due"
        return (d or self.deliverer()).deliver(lease)

    def attempts(self, subject_id: str) -> list[dict[str, Any]]:
        import json

        return [json.loads(a) for a in self.r.lrange(self.keys.webhook_attempts(subject_id), 0, -1)]

    def state(self, subject_id: str) -> str:
        return self.r.hget(self.keys.webhook(subject_id), "state").decode()  # type: ignore[union-attr]

    def due(self) -> list[str]:
        k = self.keys
        return [i.decode() for s in k.shard_ids for i in self.r.zrange(k.webhook_outbox(s), 0, -1)]


@pytest.fixture
def env(redis_url: str) -> Iterator[Env]:
    e = Env(redis_url)
    yield e
    for d in e.deliverers:
        d.close(wait_s=2)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_finished_task_is_delivered_once_signed_and_recorded(
    env: Env, receiver: Receiver
) -> None:
    # Given a finished task whose webhook points at an allowlisted loopback receiver
    task_id = env.finished_task(receiver.url())
    # When a worker's deliverer runs
    d = env.deliverer()
    d.start()
    receiver.wait_for(1, timeout_s=10)
    time.sleep(0.3)  # nothing more comes
    # Then the receiver got one POST that the independent implementation verifies
    [got] = receiver.received
    payload = got.verify(env.secret)
    assert payload["type"] == "task.finished"
    assert payload["data"]["task_id"] == task_id and payload["data"]["status"] == "completed"
    assert payload["data"]["correct"] is True
    assert got.headers["webhook-id"] == f"msg_{task_id}"
    assert got.headers["host"] == f"127.0.0.1:{receiver.port}"
    # and the attempt is recorded, the outbox empty
    [attempt] = env.attempts(task_id)
    assert attempt["outcome"] == "delivered" and attempt["status_code"] == 204
    assert attempt["address"] == "127.0.0.1" and attempt["latency_ms"] >= 0
    assert env.state(task_id) == "delivered" and env.due() == []


def test_retries_follow_500s_with_the_same_id_until_delivered(env: Env) -> None:
    receiver = Receiver(answers=[500, 503, 429])
    try:
        task_id = env.finished_task(receiver.url())
        env.deliverer().start()
        receiver.wait_for(4, timeout_s=20)
    finally:
        receiver.close()
    ids = {r.headers["webhook-id"] for r in receiver.received}
    assert ids == {f"msg_{task_id}"}
    for r in receiver.received:  # each attempt re-signed, each verifies
        r.verify(env.secret)
    outcomes = [(a["attempt"], a["outcome"], a.get("status_code")) for a in env.attempts(task_id)]
    assert outcomes == [
        (1, "retrying", 500),
        (2, "retrying", 503),
        (3, "retrying", 429),
        (4, "delivered", 204),
    ]
    gaps = [b.at - a.at for a, b in zip(receiver.received, receiver.received[1:], strict=False)]
    assert all(g >= 0.025 for g in gaps)  # backoff: at least half the base delay between tries


def test_a_receiver_that_says_when_to_come_back_is_retried_then(env: Env) -> None:
    # Given a receiver that is busy and says so: 503 with Retry-After: 2
    receiver = Receiver(answers=[lambda: (503, {"Retry-After": "2"})])
    try:
        task_id = env.finished_task(receiver.url())
        env.deliverer().start()  # whose own backoff would come back after 25-50 ms
        receiver.wait_for(2, timeout_s=20)
    finally:
        receiver.close()
    # Then the second attempt came when the receiver asked, not at the backoff's pace
    first, second = receiver.received[:2]
    assert second.at - first.at >= 2.0
    attempts = env.attempts(task_id)
    assert attempts[0]["retry_after_s"] == 2.0
    assert [a["outcome"] for a in attempts[:2]] == ["retrying", "delivered"]


def test_a_delivery_is_given_up_when_its_window_ends(env: Env) -> None:
    receiver = Receiver(default=500)
    try:
        task_id = env.finished_task(receiver.url())
        env.deliverer(retry_window_s=2.0).start()
        deadline = time.monotonic() + 15
        while env.due() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        receiver.close()
    assert env.due() == [] and env.state(task_id) == "given_up"
    attempts = env.attempts(task_id)
    assert attempts[-1]["outcome"] == "given_up" and len(attempts) == len(receiver.received) >= 2


def test_network_errors_and_timeouts_are_retried(env: Env) -> None:
    hanging = Listener()  # accepts, never answers
    closed_port = free_port()  # nothing listens there
    try:
        slow = env.finished_task(f"http://127.0.0.1:{hanging.port}/hook")
        refused = env.finished_task(f"http://127.0.0.1:{closed_port}/hook")
        d = env.deliverer(timeouts=webhook_http.Timeouts(connect_s=1.0, read_s=0.3))
        assert env.deliver_now(slow, d) is Outcome.RETRY
        assert env.deliver_now(refused, d) is Outcome.RETRY
    finally:
        hanging.close()
    [timed_out] = env.attempts(slow)
    assert "ReadTimeout" in timed_out["error"] and timed_out.get("status_code") is None
    [no_conn] = env.attempts(refused)
    assert "ConnectError" in no_conn["error"]
    assert env.state(slow) == env.state(refused) == "pending"


def test_redirects_are_not_followed(env: Env) -> None:
    target = Receiver()
    redirecting = Receiver(answers=[lambda: (302, {"Location": target.url("/elsewhere")})])
    try:
        task_id = env.finished_task(redirecting.url())
        assert env.deliver_now(task_id) is Outcome.FAILED
    finally:
        redirecting.close()
        target.close()
    assert target.connections == 0
    [attempt] = env.attempts(task_id)
    assert attempt["status_code"] == 302 and "redirects are not followed" in attempt["error"]


def test_410_disables_the_endpoint_for_the_tenant(env: Env) -> None:
    receiver = Receiver(answers=[410])
    try:
        first = env.finished_task(receiver.url())
        second = env.finished_task(receiver.url())
        assert env.deliver_now(first) is Outcome.DISABLED
        assert env.deliver_now(second) is Outcome.DISABLED
    finally:
        receiver.close()
    assert len(receiver.received) == 1  # the second was never sent
    assert env.state(first) == env.state(second) == "disabled" and env.due() == []
    assert env.outbox.disabled_since(TENANT, receiver.url()) is not None


def test_during_a_rotation_both_signatures_are_sent_then_only_the_new(
    env: Env, receiver: Receiver
) -> None:
    old = env.secret
    rotation = rotate(env.r, env.keys, TENANT, grace_s=3.0)
    assert rotation.previous_valid_until is not None
    during = env.finished_task(receiver.url())
    assert env.deliver_now(during) is Outcome.DELIVERED
    [got] = receiver.received
    assert len(got.signatures) == 2
    got.verify(rotation.secret)  # receivers that switched already
    got.verify(old)  # and those that have not
    time.sleep(3.2)
    after = env.finished_task(receiver.url())
    assert env.deliver_now(after) is Outcome.DELIVERED
    late = receiver.received[-1]
    assert len(late.signatures) == 1
    late.verify(rotation.secret)
    with pytest.raises(Exception, match="No matching signature"):
        late.verify(old)
    assert signing_secrets(env.r, env.keys, TENANT, time.time()) == [rotation.secret]


def test_two_workers_never_send_the_same_attempt(env: Env, receiver: Receiver) -> None:
    ids = [env.finished_task(receiver.url()) for _ in range(30)]
    for worker in ("w1", "w2", "w3"):
        env.deliverer(worker, concurrency=4).start()
    receiver.wait_for(30, timeout_s=30)
    time.sleep(0.5)
    got = [r.headers["webhook-id"] for r in receiver.received]
    assert sorted(got) == sorted(f"msg_{i}" for i in ids)  # each once
    assert env.due() == []


def test_an_attempt_whose_worker_died_is_claimed_again_after_its_lease(
    env: Env, receiver: Receiver
) -> None:
    # Given a worker that claimed an attempt and died before finishing it
    short = WebhookOutbox(env.r, env.keys, lease_s=1.0)
    task_id = env.finished_task(receiver.url())
    dead = short.claim(task_id, "dead-worker", 86_400)
    assert dead is not None and dead.attempt == 1
    assert short.claim(task_id, "w2", 86_400) is None  # leased: nobody else takes it
    # When its lease runs out, another worker claims and sends attempt 2
    time.sleep(1.2)
    again = short.claim(task_id, "w2", 86_400)
    assert again is not None and again.attempt == 2
    assert env.deliverer().deliver(again) is Outcome.DELIVERED
    # Then the lost attempt is on record, and the dead worker's late settle is fenced out
    assert [a["outcome"] for a in env.attempts(task_id)] == ["lost", "delivered"]
    assert not short.settle(dead, {"attempt": 1, "outcome": "delivered"}, "delivered")
    assert len(receiver.received) == 1


def test_a_destination_is_checked_again_at_delivery_and_never_contacted(env: Env) -> None:
    # Given tasks stored before the policy existed (bypassing the API): a loopback URL that
    # is not allowlisted, and the CRLF URL of issue 12 (it was re-sent every 600 s forever)
    listener = Listener()
    try:
        loopback = env.finished_task(f"http://127.0.0.1:{listener.port}/hook")
        crlf = env.finished_task("https://hooks.example.com/")
        env.r.hset(
            env.keys.task(crlf), "webhook_url", f"http://127.0.0.1:{listener.port}/h\r\nX-Evil: 1"
        )
        d = env.deliverer(allowlist=Allowlist())
        # When they are delivered, each is refused once, for good
        assert env.deliver_now(loopback, d) is Outcome.REFUSED
        assert env.deliver_now(crlf, d) is Outcome.REFUSED
        time.sleep(0.2)
    finally:
        listener.close()
    assert listener.connections == 0
    assert env.due() == []  # nothing left to re-send
    assert env.attempts(loopback)[0]["rule"] == "loopback"
    assert env.attempts(crlf)[0]["rule"] == "control_character"


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_dialled(
    env: Env, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    answers = {"hooks.example.com": "127.0.0.1", "rebind.example.com": "10.0.0.7"}

    def fake_resolve(host: str, port: int) -> list[Any]:
        calls.append(host)
        return [ip_address(answers[host])]

    monkeypatch.setattr(webhook_http, "resolve", fake_resolve)
    listener = Listener()
    try:
        ok = env.finished_task(receiver.url(host="hooks.example.com"))
        private = env.finished_task(f"http://rebind.example.com:{listener.port}/hook")
        assert env.deliver_now(ok) is Outcome.DELIVERED
        assert env.deliver_now(private) is Outcome.REFUSED
    finally:
        listener.close()
    assert calls == ["hooks.example.com", "rebind.example.com"]  # once per attempt
    [got] = receiver.received
    assert got.headers["host"] == f"hooks.example.com:{receiver.port}"  # the original name
    assert env.attempts(ok)[0]["address"] == "127.0.0.1"
    assert listener.connections == 0
    assert env.attempts(private)[0]["rule"] == "resolves_to_private"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test CA")
def test_https_connects_to_the_vetted_address_with_sni_and_verification_for_the_name(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = make_cert(tmp_path, "hooks.example.com")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    monkeypatch.setattr(webhook_http, "resolve", lambda host, port: [ip_address("127.0.0.1")])
    receiver = Receiver(ssl_context=server_ctx)
    try:
        good = env.finished_task(receiver.url(host="hooks.example.com"))
        wrong_name = env.finished_task(receiver.url(host="other.example.com"))
        d = env.deliverer(ssl_context=client_ctx)
        assert env.deliver_now(good, d) is Outcome.DELIVERED
        assert env.deliver_now(wrong_name, d) is Outcome.RETRY  # the cert is not for it
    finally:
        receiver.close()
    [got] = receiver.received
    assert got.sni == "hooks.example.com"
    got.verify(env.secret)
    assert "certificate" in env.attempts(wrong_name)[0]["error"].lower()


def test_log_lines_carry_the_delivery_s_own_ids_not_a_previous_task_s(
    env: Env, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a sender thread on which another task's context was bound (as a Celery thread
    # that ran an agent loop has), and a task's and a batch's delivery due
    task_id = env.finished_task(receiver.url())
    batch_id = env.finished_batch(receiver.url())
    cap = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, cap])
    # a logger built now, with this configuration (the module's may be cached already)
    monkeypatch.setattr(webhook_delivery, "log", structlog.get_logger("webhooks-test"))
    try:

        def on_a_used_thread() -> None:
            structlog.contextvars.bind_contextvars(task_id="task_other", attempt=7)
            env.deliver_now(batch_id)
            env.deliver_now(task_id)

        t = threading.Thread(target=on_a_used_thread)
        t.start()
        t.join()
    finally:
        structlog.reset_defaults()
    batch_line, task_line = [e for e in cap.entries if e["event"].startswith("webhook.")]
    assert batch_line["batch_id"] == batch_id and "task_id" not in batch_line
    assert batch_line["webhook_id"] == f"msg_{batch_id}" and batch_line["attempt"] == 1
    assert task_line["task_id"] == task_id and "batch_id" not in task_line
    assert len(receiver.received) == 2


def make_cert(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf certificate for ``name``, made with the openssl CLI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=actfleet test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        f"/CN={name}",
    )
    (tmp / "ext.cnf").write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n")
    run(
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    return tmp / "ca.pem", tmp / "leaf.pem", tmp / "leaf.key"

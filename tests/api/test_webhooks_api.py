"""Webhooks at the API over real HTTP: refusal at submission (422 naming the rule, nothing
contacted), the allowlist, the batch webhook, the delivery records, secrets in the CLI.

Names are resolved only through ``api.webhooks.resolve``, which tests replace when they
need a name: no external name is ever looked up."""

from __future__ import annotations

import json
import socket
from ipaddress import ip_address
from typing import Any

import pytest

from agent.models import Status
from api import webhooks as api_webhooks
from store.webhooks import WebhookOutbox
from tests.api.conftest import Fleet, spec
from tests.api.test_cli import run
from tests.receivers import Listener
from tests.unit.test_destinations import NON_GLOBAL

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{port}/hook",
    "http://2130706433:{port}/hook",
    "http://0x7f000001:{port}/hook",
    "http://0177.0.0.1:{port}/hook",
    "http://127.1:{port}/hook",
    "http://127.0.0.1.:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://localhost:{port}/hook",
    "http://LOCALHOST.:{port}/hook",
    "http://[::1]:{port}/hook",
]


def jsonl(*specs: object) -> bytes:
    return b"".join(json.dumps(s).encode() + b"\n" for s in specs)


def batch_ids(fleet: Fleet, batch_id: str) -> list[str]:
    return [i.decode() for i in fleet.redis.lrange(fleet.keys.batch_tasks(batch_id), 0, -1)]


def due(fleet: Fleet) -> list[str]:
    """Every entry of the shards' outboxes, once the workers' loop scheduled the batches
    that finished (``WebhookOutbox.schedule_batches``, run here in the workers' stead)."""
    WebhookOutbox(fleet.redis, fleet.keys).schedule_batches()
    k = fleet.keys
    return [i.decode() for s in k.shard_ids for i in fleet.redis.zrange(k.webhook_outbox(s), 0, -1)]


@pytest.fixture
def listener() -> Any:
    li = Listener()
    yield li
    li.close()


def test_every_loopback_spelling_is_refused_with_422_and_never_contacted(
    fleet: Fleet, listener: Listener
) -> None:
    with fleet.client() as c:
        for template in LOOPBACK_SPELLINGS:
            url = template.format(port=listener.port)
            r = c.post("/v1/tasks", json=spec(webhook={"url": url}))
            assert r.status_code == 422, url
            [problem] = r.json()["detail"]["problems"]
            assert problem.startswith("webhook.url: ") and "public addresses only" in problem
            assert any(w in problem for w in ("loopback", "local-only", "IPv4-mapped")), problem
        batch = c.post("/v1/batches", content=jsonl(spec(), spec(webhook={"url": url})))
        param = c.post(
            "/v1/batches",
            content=jsonl(spec()),
            params={"webhook_url": f"http://127.1:{listener.port}/hook"},
        )
    assert batch.status_code == 422
    assert batch.json()["detail"]["errors"][0]["line"] == 2
    assert param.status_code == 422 and "webhook_url: " in param.json()["detail"]["message"]
    assert listener.connections == 0
    assert fleet.redis.keys("t:{*}:task:*") == []  # nothing was accepted


@pytest.mark.parametrize(("url", "rule"), NON_GLOBAL)
def test_every_non_global_spelling_is_refused_at_submission(
    fleet: Fleet, url: str, rule: str
) -> None:
    with fleet.client() as c:
        r = c.post("/v1/tasks", json=spec(webhook={"url": url}))
    assert r.status_code == 422
    assert r.json()["detail"]["problems"][0].startswith("webhook.url: ")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://hooks.example.com/a\r\nX-Injected: 1", "control character (CR)"),
        ("http://user:secret@hooks.example.com/", "credentials"),
        ("ftp://hooks.example.com/", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
    ],
)
def test_urls_no_webhook_may_use_are_refused(fleet: Fleet, url: str, says: str) -> None:
    with fleet.client() as c:
        r = c.post("/v1/tasks", json=spec(webhook={"url": url}))
    assert r.status_code == 422 and says in r.json()["detail"]["message"]


def test_an_allowlisted_loopback_receiver_is_accepted(make_fleet: Any, listener: Listener) -> None:
    fleet = make_fleet(webhook_allowlist="127.0.0.1/32")
    url = f"http://127.0.0.1:{listener.port}/hook"
    with fleet.client() as c:
        ok = c.post("/v1/tasks", json=spec(webhook={"url": url}))
        other = c.post("/v1/tasks", json=spec(webhook={"url": f"http://[::1]:{listener.port}/"}))
    assert ok.status_code == 202
    assert other.status_code == 422  # only what the allowlist names
    assert listener.connections == 0  # submission never calls the receiver


def test_a_name_that_resolves_to_a_private_address_is_refused(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = {"hooks.example.com": ["93.184.216.34"], "sneaky.example.com": ["10.20.30.40"]}
    looked_up: list[str] = []

    async def fake_resolve(host: str, port: int) -> list[Any]:
        looked_up.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ip_address(a) for a in answers[host]]

    monkeypatch.setattr(api_webhooks, "resolve", fake_resolve)
    with fleet.client() as c:
        public = c.post("/v1/tasks", json=spec(webhook={"url": "https://hooks.example.com/x"}))
        sneaky = c.post("/v1/tasks", json=spec(webhook={"url": "https://sneaky.example.com/x"}))
        nowhere = c.post("/v1/tasks", json=spec(webhook={"url": "https://nowhere.example.com/"}))
        body = jsonl(*[spec(webhook={"url": "https://sneaky.example.com/x"})] * 50)
        batch = c.post("/v1/batches", content=body)
    assert public.status_code == 202
    assert sneaky.status_code == 422
    message = sneaky.json()["detail"]["message"]
    assert "resolves to 10.20.30.40" in message and "private" in message
    assert nowhere.status_code == 422 and "does not resolve" in nowhere.json()["detail"]["message"]
    assert batch.status_code == 422
    assert looked_up.count("sneaky.example.com") == 2  # once per request, not once per task


def test_a_tenant_without_a_signing_secret_cannot_ask_for_webhooks(make_fleet: Any) -> None:
    fleet = make_fleet(webhook_allowlist="127.0.0.1/32")
    with fleet.client("legacy") as c:
        fleet.redis.delete(fleet.keys.webhook_secrets("legacy"))  # a tenant from before
        r = c.post("/v1/tasks", json=spec(webhook={"url": "http://127.0.0.1:9/hook"}))
        plain = c.post("/v1/tasks", json=spec())
    assert r.status_code == 422
    assert "rotate-webhook-secret --tenant legacy" in r.json()["detail"]["message"]
    assert plain.status_code == 202


def test_a_disabled_endpoint_is_refused_until_the_operator_enables_it(make_fleet: Any) -> None:
    fleet = make_fleet(webhook_allowlist="127.0.0.1/32")
    url = "http://127.0.0.1:9/gone"
    fleet.redis.hset(fleet.keys.webhooks_disabled("acme", 3), url, "1700000000")
    with fleet.client() as c:
        r = c.post("/v1/tasks", json=spec(webhook={"url": url}))
        assert r.status_code == 422
        message = r.json()["detail"]["message"]
        assert "410 Gone" in message and "enable-webhook --tenant acme" in message
        code, out, _ = run(fleet, "keys", "enable-webhook", "--tenant", "acme", url)
        assert code == 0 and "enabled" in out
        assert c.post("/v1/tasks", json=spec(webhook={"url": url})).status_code == 202


def test_a_task_s_webhook_record_shows_its_state(make_fleet: Any) -> None:
    fleet = make_fleet(webhook_allowlist="127.0.0.1/32")
    url = "http://127.0.0.1:9/hook"
    with fleet.client() as c:
        hooked = c.post("/v1/tasks", json=spec(webhook={"url": url})).json()["id"]
        plain = c.post("/v1/tasks", json=spec()).json()["id"]
        waiting = c.get(f"/v1/tasks/{hooked}/webhook")
        fleet.start_task(hooked)
        fleet.finish(hooked)
        scheduled = c.get(f"/v1/tasks/{hooked}/webhook").json()
        none = c.get(f"/v1/tasks/{plain}/webhook")
        outbox = WebhookOutbox(fleet.redis, fleet.keys)
        lease = outbox.claim(hooked, "w1", 3600)
        assert lease is not None
        attempt = {"attempt": 1, "at": 1.0, "outcome": "retrying", "status_code": 503}
        assert outbox.settle(lease, attempt, "pending", next_at=2e9)
        pending = c.get(f"/v1/tasks/{hooked}/webhook").json()
    with fleet.client("intruder") as c:
        foreign = c.get(f"/v1/tasks/{hooked}/webhook")
    assert waiting.status_code == 200
    assert waiting.json()["attempts"] == []
    assert (waiting.json()["state"], waiting.json()["url"]) == ("waiting", url)
    assert scheduled["state"] == "scheduled" and scheduled["id"] == f"msg_{hooked}"
    assert pending["state"] == "pending" and pending["next_attempt_at"] == 2e9
    assert [{k: v for k, v in a.items() if v is not None} for a in pending["attempts"]] == [attempt]
    assert none.status_code == 404 and "has no webhook" in none.json()["detail"]["message"]
    assert foreign.status_code == 404


def test_batch_finished_is_due_once_even_when_the_batch_is_cancelled_midway(
    make_fleet: Any,
) -> None:
    fleet = make_fleet(webhook_allowlist="127.0.0.1/32")
    url = "http://127.0.0.1:9/batch"
    with fleet.client() as c:
        r = c.post("/v1/batches", content=jsonl(*[spec()] * 5), params={"webhook_url": url})
        assert r.status_code == 202
        batch_id = r.json()["id"]
        ids = batch_ids(fleet, batch_id)
        # two tasks finish (one graded correct), one is running, two are queued
        for task_id, correct in zip(ids[:2], (True, False), strict=True):
            fleet.start_task(task_id)
            fleet.finish(task_id, correct=correct)
        fleet.start_task(ids[2])
        assert c.get(f"/v1/batches/{batch_id}/webhook").json()["state"] == "waiting"
        assert batch_id not in due(fleet)
        # when the batch is cancelled: the queued ones end at once, the running one later
        c.post(f"/v1/batches/{batch_id}/cancel")
        assert batch_id not in due(fleet)
        fleet.finish(ids[2], status=Status.CANCELLED)
        fleet.finish(ids[2], status=Status.CANCELLED)  # a repeated finish changes nothing
        assert due(fleet).count(batch_id) == 1
        view = c.get(f"/v1/batches/{batch_id}/webhook").json()
    assert due(fleet).count(batch_id) == 1
    assert view["state"] == "scheduled" and view["event"] == "batch.finished"
    batch = fleet.redis.hgetall(fleet.keys.batch(batch_id))
    assert b"finished_at" in batch
    k = fleet.keys
    assert (
        sum(int(fleet.redis.hget(k.batch_counts(batch_id, s), "correct") or 0) for s in k.shard_ids)
        == 1
    )


def test_a_batch_without_a_webhook_has_no_record_and_is_never_due(fleet: Fleet) -> None:
    with fleet.client() as c:
        batch_id = c.post("/v1/batches", content=jsonl(spec())).json()["id"]
        [task_id] = batch_ids(fleet, batch_id)
        fleet.start_task(task_id)
        fleet.finish(task_id)
        r = c.get(f"/v1/batches/{batch_id}/webhook")
    assert r.status_code == 404 and due(fleet) == []


def test_the_secret_is_shown_once_with_the_first_key_and_rotation_shows_a_new_one(
    fleet: Fleet,
) -> None:
    code, out, _ = run(fleet, "keys", "create", "--tenant", "hooks-co", "--json")
    first = json.loads(out)
    assert code == 0 and first["webhook_secret"].startswith("whsec_")
    code, out, _ = run(fleet, "keys", "create", "--tenant", "hooks-co", "--json")
    assert json.loads(out)["webhook_secret"] is None  # not again
    code, out, _ = run(fleet, "keys", "create", "--tenant", "text-co")
    assert code == 0 and "whsec_" in out and "shown only now" in out
    code, out, _ = run(
        fleet, "keys", "rotate-webhook-secret", "--tenant", "hooks-co", "--grace-s", "60", "--json"
    )
    rotated = json.loads(out)
    assert code == 0 and rotated["webhook_secret"].startswith("whsec_")
    assert rotated["webhook_secret"] != first["webhook_secret"]
    assert rotated["previous_valid_until"] is not None
    code, listing, _ = run(fleet, "keys", "list", "--json")
    assert "whsec_" not in listing  # never shown again

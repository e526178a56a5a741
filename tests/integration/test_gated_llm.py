"""The model client behind the fleet's gate, against a real fake-llm with a capacity and a
real redis-server: 429s are waited out (not failures), the limit adapts, and a task
waiting for a slot ends ``timed_out`` at its deadline, never ``llm_error``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from actfleet.fakellm import FakeLLMServer
from agent.errors import LLMError
from agent.llm import LLMReply, LLMRequest
from agent.loop import run_codeact
from agent.models import FailureClass, Result, Status, TaskSpec
from store.keys import Keys
from tests.fakes import FakeSandbox
from workers.gateplan import GateConfig
from workers.gatestore import RedisGateStore, server_id, server_label
from workers.llm import OpenAILLM, Transport
from workers.modelgate import ModelGate, Outcome


def settle(gate: ModelGate, token: int, outcome: Outcome) -> None:
    """An exchange under the permit ended so, and the permit goes back."""
    gate.observe(token, outcome)
    gate.release()


PROMPT = [{"role": "user", "content": "hello"}]


@pytest.fixture(params=["wire", "sdk"])
def transport(request: pytest.FixtureRequest) -> Transport:
    param: Transport = request.param
    return param


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def make_gate(r: redis.Redis) -> Iterator[Callable[..., ModelGate]]:
    made: list[ModelGate] = []

    def make(url: str, cap: int, holder: str = "worker-1") -> ModelGate:
        store = RedisGateStore(r, Keys("t"), server_id(url))
        gate = ModelGate(
            store, holder, GateConfig(cap), server=server_label(url), tick_s=0.2, fast_tick_s=0.05
        )
        gate.start()
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.close()


def hammer(llm: OpenAILLM, n: int, timeout_s: float) -> list[LLMReply | Exception]:
    def one(_: int) -> LLMReply | Exception:
        try:
            return llm.complete(LLMRequest("m", PROMPT, timeout_s=timeout_s))
        except LLMError as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_a_gated_client_waits_out_429s_without_spending_its_retries(
    make_gate: Callable[..., ModelGate], r: redis.Redis, transport: Transport
) -> None:
    # given a server that serves 3 at once (0.3 s each) and a gate whose cap is set too high
    with FakeLLMServer(latency_s=0.3, capacity=3, retry_after_s=0.1) as server:
        url = server.url
        gate = make_gate(url, cap=10)
        # and a client allowed no retries at all
        llm = OpenAILLM(base_url=server.url, max_retries=0, transport=transport, gate=gate)

        results = hammer(llm, 12, timeout_s=60)

    # then every request got its reply: the 429s were waits, not failures
    assert all(isinstance(x, LLMReply) for x in results), results
    assert server.rejected > 0 and server.peak_in_service <= 3
    # and the fleet's limit came down from the cap towards what the server takes
    grant = gate.grant
    assert grant is not None and grant.epoch >= 1 and grant.limit < 10
    state = RedisGateStore(r, Keys("t"), server_id(url)).state(10)
    assert state.limit < 10


def test_a_request_backing_off_from_a_busy_server_keeps_its_slot(
    make_gate: Callable[..., ModelGate],
) -> None:
    # given a server that is busy once, then answers
    script = [
        {"status": 429, "error": "busy", "headers": {"Retry-After": "0.2"}, "times": 1},
        {"reply": "done"},
    ]
    with FakeLLMServer(script) as server:
        gate = make_gate(server.url, cap=4)
        in_use_while_sleeping: list[int] = []

        def sleep(seconds: float) -> None:
            in_use_while_sleeping.append(gate.permits.usage().in_use)
            time.sleep(seconds)

        llm = OpenAILLM(base_url=server.url, max_retries=0, gate=gate, sleep=sleep)
        reply = llm.complete(LLMRequest("m", PROMPT, timeout_s=30))
    # then it backed off once, holding its slot (no other request took its place meanwhile)
    assert reply.content == "done"
    assert in_use_while_sleeping == [1]
    assert gate.permits.usage().in_use == 0  # and gave it back once answered


def test_without_a_gate_the_same_load_fails_requests(transport: Transport) -> None:
    # the counterpart of the test above: what the gate saves a fleet from
    with FakeLLMServer(latency_s=0.3, capacity=3, retry_after_s=0.1) as server:
        llm = OpenAILLM(base_url=server.url, max_retries=0, transport=transport)
        results = hammer(llm, 12, timeout_s=60)
    failed = [x for x in results if isinstance(x, Exception)]
    assert failed and all("429" in str(e) for e in failed)


def test_a_cap_at_the_servers_capacity_sends_no_request_it_would_refuse(
    make_gate: Callable[..., ModelGate],
) -> None:
    with FakeLLMServer(latency_s=0.2, capacity=4) as server:
        llm = OpenAILLM(base_url=server.url, max_retries=0, gate=make_gate(server.url, cap=4))
        results = hammer(llm, 16, timeout_s=60)
    assert all(isinstance(x, LLMReply) for x in results)
    assert server.rejected == 0 and server.peak_in_service == 4


def test_a_task_waiting_for_a_slot_times_out_at_its_deadline_not_as_an_llm_error(
    make_gate: Callable[..., ModelGate],
) -> None:
    # given another worker holding the only slot of the model server
    with FakeLLMServer(latency_s=0) as server:
        other = make_gate(server.url, cap=1, holder="worker-0")
        token = other.acquire(time.monotonic() + 5)
        llm = OpenAILLM(base_url=server.url, max_retries=0, gate=make_gate(server.url, cap=1))
        spec = TaskSpec.from_dict({"prompt": "Compute: 1+1", "limits": {"timeout_s": 1.5}})
        started = time.monotonic()

        result = drive(run_codeact(spec, llm, FakeSandbox(), model="m"))

        waited = time.monotonic() - started
        settle(other, token, Outcome.OK)
    # then the task ended timed_out when its own wall clock ran out, having sent nothing
    assert result.status is Status.TIMED_OUT
    assert result.failure_class is FailureClass.TIMEOUT
    assert 1.5 <= waited < 5
    assert len(server.requests) == 0


def test_a_server_that_stays_busy_makes_the_task_time_out_not_fail(
    make_gate: Callable[..., ModelGate],
) -> None:
    # given a server that answers every request 429 (Retry-After 0.2 s)
    script = [{"status": 429, "error": "busy", "headers": {"Retry-After": "0.2"}}]
    with FakeLLMServer(script) as server:
        llm = OpenAILLM(base_url=server.url, max_retries=1, gate=make_gate(server.url, cap=4))
        spec = TaskSpec.from_dict({"prompt": "hi", "limits": {"timeout_s": 1.5}})
        started = time.monotonic()

        result = drive(run_codeact(spec, llm, FakeSandbox(), model="m"))

    # then it kept asking (more often than its one retry) until its deadline, then timed out
    assert result.status is Status.TIMED_OUT
    assert time.monotonic() - started >= 1.5
    assert len(server.requests) > 2


def drive(steps: object) -> Result:
    try:
        while True:
            next(steps)  # type: ignore[call-overload]
    except StopIteration as stop:
        result: Result = stop.value
        return result

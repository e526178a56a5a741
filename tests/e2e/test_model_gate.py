"""The model gate in the whole stack: two worker processes behind ACTFLEET_MODEL_MAX_INFLIGHT
against a fake model server that serves 2 requests at once and answers 429 beyond."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import redis

from actfleet.client import Client
from actfleet.fakellm import FakeLLMServer
from actfleet.stack import LocalStack
from store.apikeys import create_key
from store.keys import Keys
from workers.gatestore import RedisGateStore, server_id

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


def test_two_workers_share_the_cap_and_no_task_fails_on_429s(tmp_path: Path) -> None:
    # given a server of capacity 2 and a fleet capped at 4 (too high: the limit must adapt)
    with FakeLLMServer(latency_s=0.2, capacity=2, retry_after_s=0.2) as llm:
        env = {
            "OPENAI_BASE_URL": llm.url,
            "OPENAI_API_KEY": "test",
            "ACTFLEET_SANDBOX": "bwrap",
            "ACTFLEET_MODEL": "fake",
            "ACTFLEET_MODEL_MAX_INFLIGHT": "4",
            "ACTFLEET_LLM_MAX_RETRIES": "0",  # any 429 counted as a failure would show
            "ACTFLEET_POOL_MIN": "0",
        }
        with LocalStack(workers=2, concurrency=6, env=env, state_dir=tmp_path) as stack:
            assert stack.redis_url is not None
            r = redis.Redis.from_url(stack.redis_url)
            key, _ = create_key(r, Keys("af"), "acme")
            tasks = [
                {"prompt": f"Compute: {i}+1", "expected": {"answer": str(i + 1)}} for i in range(16)
            ]
            with Client(stack.api_url, key) as c:
                accepted = c.submit_batch("\n".join(json.dumps(t) for t in tasks))
                status = c.wait_batch(accepted["id"], poll_s=0.5, timeout_s=240)
            state = RedisGateStore(r, Keys("af"), server_id(llm.url)).state(4)
            metrics = httpx.get(f"{stack.api_url}/metrics", timeout=10).text
            r.close()

    # then every task completed correctly: the 429s were waits, not failures
    assert status["counts"]["completed"] == 16, status
    assert status["success_rate"] == 1.0
    # the server never had more than it serves; both workers held permits under one limit
    assert llm.peak_in_service <= 2
    assert len(state.holders) == 2
    assert state.limit <= 4
    # and the gate's figures are on the fleet's /metrics
    assert "actfleet_llm_concurrency_limit" in metrics
    assert "actfleet_llm_slot_wait_seconds_count" in metrics

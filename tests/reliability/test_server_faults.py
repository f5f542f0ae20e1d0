"""Faults at the OpenAI endpoint of a PBS server: clients that disconnect mid-prefill or
mid-decode, and hostile prompts (at or over max_model_len, unknown token ids, empty).

Disconnected requests must be aborted (never counted in `vllm:request_success_total`) and
their KV blocks freed (vLLM's own `vllm:num_requests_running` and
`vllm:kv_cache_usage_perc` on /metrics return to 0);
hostile prompts must get vLLM's clean HTTP 400 with a message; either way the server stays
healthy and later requests give the same greedy tokens as before.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from pbs_vllm.evals.soak import (
    MODEL_NAME,
    SOAK_PBS,
    VOCAB,
    Metrics,
    SoakRequest,
    completion_body,
    is_healthy,
    run_round,
)
from pbs_vllm.kernels.cpu import KERNELS_ENV

pytestmark = pytest.mark.engine

MAX_MODEL_LEN = 1024
SERVER_OPTIONS = {
    "pbs": SOAK_PBS,
    "max_num_batched_tokens": 64,
    "max_model_len": MAX_MODEL_LEN,
    # On the CPU: the Triton kernels, interpreted, instead of the PyTorch ones, so that a
    # prefill lasts long enough to disconnect in it.
    "env_overrides": {KERNELS_ENV: "triton"},
}
PREFILL_LEN = 256  # 4 chunks of 64 tokens: seconds of interpreted prefill to disconnect in
DRAIN_TIMEOUT_S = 120


def tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(*VOCAB) for _ in range(n))


def wait_for(url: str, ready, what: str, timeout_s: float = DRAIN_TIMEOUT_S) -> Metrics:
    """Poll /metrics until `ready(metrics)`; fail naming `what` and the last values."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = Metrics.scrape(url)
        if ready(m):
            return m
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out waiting for {what}: running="
                f"{m.get('vllm:num_requests_running')}, kv usage="
                f"{m.get('vllm:kv_cache_usage_perc')}"
            )
        time.sleep(0.1)


def idle(m: Metrics) -> bool:
    return m.get("vllm:num_requests_running") == 0 and m.get("vllm:kv_cache_usage_perc") == 0


def finished(m: Metrics) -> float:
    """Requests that ran to completion (aborted ones are not counted)."""
    return m.get("vllm:request_success_total")


@pytest.fixture(scope="module")
def probes(server):
    """Requests answered before any fault (alone, one at a time): later answers must match."""
    rng = random.Random(7)
    reqs = [SoakRequest(tokens(rng, n), 4) for n in (12, 40, 90)]
    res = run_round(server.url, reqs, concurrency=1)
    assert res.errors == [], res.errors
    return reqs, res.outputs


def assert_still_serving(url: str, probes) -> None:
    reqs, want = probes
    assert is_healthy(url)
    res = run_round(url, reqs, concurrency=len(reqs))
    assert res.errors == [] and res.outputs == want


async def _disconnect_during(url: str, req: SoakRequest, stream: bool, in_phase) -> Metrics:
    """Send `req`, wait until `in_phase(metrics, tokens_received)`, then drop the connection.

    Returns the metrics seen at the moment of the disconnect.
    """
    async with httpx.AsyncClient(base_url=url, timeout=DRAIN_TIMEOUT_S) as client:
        received = 0

        async def consume() -> None:
            nonlocal received
            body = completion_body(req, stream=stream)
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    received += line.startswith("data: {")

        task = asyncio.create_task(consume())
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            m = Metrics.parse((await client.get("/metrics")).text)
            if in_phase(m, received):
                break
            assert not task.done(), "the request finished before the disconnect point"
            assert time.monotonic() < deadline, "never reached the disconnect point"
            await asyncio.sleep(0.05)
        task.cancel()  # closes the connection without reading the rest
        with pytest.raises(asyncio.CancelledError):
            await task
        return m


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="needs the seconds-long prefill of the Triton interpreter"
)
def test_disconnect_mid_prefill_aborts_and_frees_kv_blocks(server, probes):
    req = SoakRequest(tokens(random.Random(1), PREFILL_LEN), max_tokens=8)
    before = wait_for(server.url, idle, "an idle server")
    generated = before.get("vllm:generation_tokens_total")

    def mid_prefill(m: Metrics, received: int) -> bool:
        return (
            m.get("vllm:num_requests_running") == 1
            and m.get("vllm:kv_cache_usage_perc") > 0
            and m.get("vllm:generation_tokens_total") == generated
            and received == 0
        )

    asyncio.run(_disconnect_during(server.url, req, stream=False, in_phase=mid_prefill))
    after = wait_for(server.url, idle, "KV blocks of the aborted prefill to be freed")
    assert finished(after) == finished(before)
    assert after.get("vllm:generation_tokens_total") == generated  # never reached decode
    assert_still_serving(server.url, probes)


def test_disconnect_mid_decode_aborts_and_frees_kv_blocks(server, probes):
    req = SoakRequest(tokens(random.Random(2), 20), max_tokens=MAX_MODEL_LEN - 20)
    before = wait_for(server.url, idle, "an idle server")

    def mid_decode(m: Metrics, received: int) -> bool:
        return received >= 3 and m.get("vllm:num_requests_running") == 1

    at_cut = asyncio.run(_disconnect_during(server.url, req, stream=True, in_phase=mid_decode))
    assert at_cut.get("vllm:kv_cache_usage_perc") > 0
    after = wait_for(server.url, idle, "KV blocks of the aborted decode to be freed")
    assert finished(after) == finished(before)
    generated = after.get("vllm:generation_tokens_total") - before.get(
        "vllm:generation_tokens_total"
    )
    assert 3 <= generated < req.max_tokens
    assert_still_serving(server.url, probes)


async def _mixed_disconnects(url: str, survivors, leavers, seed: int):
    """Run survivors to completion while each leaver disconnects after a random delay."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=DRAIN_TIMEOUT_S) as client:

        async def complete(req: SoakRequest) -> list[int]:
            r = await client.post("/v1/completions", json=completion_body(req))
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        async def leave(req: SoakRequest, delay: float, stream: bool) -> None:
            task = asyncio.create_task(
                client.post("/v1/completions", json=completion_body(req, stream=stream))
            )
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        leaving = [leave(r, rng.uniform(0.2, 3.0), rng.random() < 0.5) for r in leavers]
        results = await asyncio.gather(*(complete(r) for r in survivors), *leaving)
        return results[: len(survivors)]


def test_concurrent_disconnects_leave_other_requests_unaffected(server, probes):
    rng = random.Random(3)
    leavers = [
        SoakRequest(tokens(rng, rng.randint(60, 200)), MAX_MODEL_LEN - 200) for _ in range(8)
    ]
    reqs, want = probes
    got = asyncio.run(_mixed_disconnects(server.url, reqs, leavers, seed=4))
    assert got == want
    wait_for(server.url, idle, "every disconnected request to be freed")
    assert_still_serving(server.url, probes)


@pytest.mark.parametrize(
    "prompt,max_tokens,message",
    [
        ([5] * MAX_MODEL_LEN, 1, "max_tokens"),  # at the limit: no room for one token
        ([5] * (MAX_MODEL_LEN + 1), 1, "maximum context length"),
        ([5] * (4 * MAX_MODEL_LEN), None, "maximum context length"),
        ("pages " * (2 * MAX_MODEL_LEN), 4, "maximum context length"),
        ([5, 10**6, 7], 4, "out of vocabulary"),
        ([5, -1, 7], 4, "greater than or equal to 0"),
        ([], 4, ""),
    ],
    ids=["at_limit", "one_over", "far_over", "text_over", "id_too_large", "id_negative", "empty"],
)
def test_hostile_prompt_gets_a_clean_400(server, probes, prompt, max_tokens, message):
    body = {"model": MODEL_NAME, "prompt": prompt, "temperature": 0.0}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert error["message"] and message in error["message"], error
    assert_still_serving(server.url, probes)

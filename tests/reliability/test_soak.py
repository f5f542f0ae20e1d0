"""Soak through the real OpenAI endpoint: 2 rounds of the same 100 mixed requests with up to
32 in flight, on the PBS backend (CPU platform, Triton interpreted, embedded tiny model).

Every response completes, `/health` stays green, greedy outputs agree across rounds (new
order, prefix-cache hits) and with requests replayed one at a time, and the server tree's
RSS does not grow from round 1 to round 2.
"""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.soak import SOAK_PBS, SoakReport, Workload, pbs_log_totals, soak

pytestmark = pytest.mark.engine

REQUESTS, ROUNDS, CONCURRENCY = 100, 2, 32
SEQUENTIAL = 40  # replayed one at a time (spread over all kinds) after a prefix-cache reset
RSS_DRIFT_MIB = 32  # allowed growth of ~3 GiB RSS between the ends of round 1 and round 2
SERVER_OPTIONS = {"pbs": SOAK_PBS, "max_num_batched_tokens": 64}


@pytest.fixture(scope="module")
def workload():
    return Workload().requests(REQUESTS, seed=20260)


@pytest.fixture(scope="module")
def report(server, workload) -> SoakReport:
    # Polled often: on the CPU's PyTorch kernels a round of 100 requests takes about a second.
    rep = soak(server.url, workload, ROUNDS, CONCURRENCY, server.rss_bytes, SEQUENTIAL, 0.05)
    print(f"soak: {rep}")
    return rep


def test_workload_mixes_lengths_prefixes_and_max_tokens(workload):
    lengths = [len(r.prompt) for r in workload]
    fallback, chunk = SOAK_PBS["dense_fallback_len"], SERVER_OPTIONS["max_num_batched_tokens"]
    assert min(lengths) < fallback <= max(lengths)
    assert sum(n > chunk for n in lengths) >= 10  # several prefill chunks each
    assert max(lengths) <= 300
    prefixes = Counter(r.prompt[: Workload().prefix_len] for r in workload)
    assert sum(n for n in prefixes.values() if n > 1) >= 10  # some requests share a prefix
    assert len({r.max_tokens for r in workload}) > 1


def test_every_request_completes(report):
    assert report.errors == []
    assert report.requests_sent >= REQUESTS * ROUNDS
    assert report.requests_served == report.requests_sent


def test_up_to_32_requests_in_flight(report):
    assert report.max_in_flight == CONCURRENCY
    # The server batched several at once (its 64-token step budget caps how many run).
    assert report.max_running >= 4, report.max_running


def test_server_stays_healthy_throughout(server, report):
    assert report.health_checks >= ROUNDS
    assert report.health_failures == 0
    assert server.proc.poll() is None


def test_greedy_outputs_equal_across_rounds_and_one_at_a_time(report):
    assert report.round_mismatches == []
    assert report.sequential_replayed == min(SEQUENTIAL, REQUESTS)
    assert report.sequential_mismatches == []


def test_memory_does_not_grow_across_rounds(report):
    assert len(report.rss_mib) == ROUNDS + 1
    assert report.rss_drift_mib < RSS_DRIFT_MIB, report.rss_mib


def test_prompts_took_both_the_dense_and_the_sparse_prefill_path(server, report):
    totals = pbs_log_totals(server.log_text())
    assert totals["sparse_prefill_tokens"] > 0 and totals["dense_prefill_tokens"] > 0, totals

"""Soak through the real OpenAI endpoint: 2 rounds of the same 100 mixed requests with up to
32 in flight, on the PBS backend (CPU platform, Triton interpreted, embedded tiny model).

Every response completes, `/health` stays green, greedy outputs agree across rounds (new
order, prefix-cache hits) and with requests replayed one at a time, and the server tree's
RSS does not grow from round 1 to round 2. Then the driver's GPU-soak pieces on the same
server: streamed rounds (TTFT), the server as its own reference (first tokens and prompt
logprobs), clients that disconnect mid-prefill, and the command line end to end.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from pbs_vllm.evals.soak import (
    MODEL_NAME,
    SOAK_PBS,
    SoakReport,
    Workload,
    compare_with_reference,
    main,
    pbs_log_totals,
    round_stats,
    run_round,
    served_model,
    soak,
)

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


# ----------------------------------------------------------------------------- GPU-soak pieces


def test_served_model_gives_the_name_and_max_model_len(server):
    assert served_model(server.url) == (MODEL_NAME, 4096)


def test_streamed_round_gives_the_same_tokens_and_a_ttft_per_request(server, workload):
    reqs = workload[:30]
    plain = run_round(server.url, reqs, concurrency=8)
    streamed = run_round(server.url, reqs, concurrency=8, stream=True)
    assert plain.errors == [] and streamed.errors == []
    assert streamed.outputs == plain.outputs
    assert plain.ttft_s == [None] * len(reqs)
    assert all(0 < t <= streamed.seconds for t in streamed.ttft_s), streamed.ttft_s
    stats = round_stats(streamed, "s")
    assert stats["output_tokens"] == sum(r.max_tokens for r in reqs)
    assert stats["output_tokens_per_s"] > 0 and stats["ttft_s"]["p50"] > 0


def test_a_server_is_its_own_reference(server, workload):
    reqs = workload[:40]
    first = run_round(server.url, reqs, concurrency=8).outputs
    rep = compare_with_reference(server.url, server.url, reqs, first, 8, logprob_requests=10)
    assert rep.ok, rep
    assert rep.compared == 40 and rep.logprobs_compared == 10
    assert rep.worst_logprob_diff is not None and rep.worst_logprob_diff <= rep.atol
    # A first token that differs from the reference's is found on a live server too.
    tampered = [list(o) for o in first]
    tampered[3][0] += 1
    bad = compare_with_reference(server.url, server.url, reqs, tampered, 8)
    assert bad.first_token_mismatches == [3] and not bad.ok


def test_clients_that_disconnect_mid_prefill_are_freed_and_others_untouched(server, workload):
    reqs = workload[:40]
    want = run_round(server.url, reqs, concurrency=32).outputs
    leavers = Workload().leavers(2, 600, seed=11)  # 10 prefill chunks of 64 tokens
    got: list = []
    rep = soak(
        server.url, reqs, 1, 32, stream=True, leavers=[leavers], leave_after_s=(0.05, 0.2),
        drain_timeout_s=60, outputs=got, health_interval_s=0.05,
    )  # fmt: skip
    [cut] = rep.disconnects
    assert cut.drain.idle and cut.drain.running == 0 and cut.drain.kv_usage == 0, cut.drain
    assert [x.finished for x in cut.leavers] == [False, False], cut.leavers
    assert [x.chunks for x in cut.leavers] == [0, 0], cut.leavers  # no token yet: mid-prefill
    assert [x.prompt_tokens for x in cut.leavers] == [600, 600]
    assert rep.ok and got == want


def test_command_line_end_to_end(server, tmp_path):
    out = tmp_path / "soak.json"
    argv = [
        "--url", server.url, "--server-pid", str(server.proc.pid), "--requests", "30",
        "--rounds", "2", "--concurrency", "8", "--sequential", "5",
        "--reference-url", server.url, "--prompt-logprobs", "4",
        "--disconnects", "1", "--disconnect-len", "400", "--disconnect-after", "0.05,0.2",
        "--max-rss-drift-mib", "256", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["checks"] == {"soak": True, "reference": True, "rss_drift": True}
    assert rep["model"] == MODEL_NAME and rep["max_model_len"] == 4096
    assert rep["requests_sent"] == 2 * 30 + 5 and rep["requests_served"] == 65
    assert [r["round"] for r in rep["rounds"]] == ["1", "2", "alone"]
    assert all(r["ttft_s"]["p50"] > 0 and r["output_tokens_per_s"] > 0 for r in rep["rounds"])
    assert len(rep["rss_mib"]) == 3 and rep["rss_mib"][0] > 1000  # the server tree, > 1 GiB
    assert [d["ok"] for d in rep["disconnects"]] == [True, True]
    assert rep["reference"]["logprobs_compared"] == 4 and rep["reference"]["compared"] == 30


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="GPU memory is measurable")
def test_command_line_fails_a_gpu_memory_check_it_cannot_measure(server, tmp_path):
    out = tmp_path / "soak.json"
    argv = ["--url", server.url, "--requests", "5", "--rounds", "2",
            "--max-gpu-drift-mib", "1000000", "--json", str(out)]  # fmt: skip
    assert main(argv) == 1
    rep = json.loads(out.read_text())
    assert rep["checks"] == {"soak": True, "gpu_memory_drift": False}
    assert rep["gpu_memory_mib"] == [] and rep["gpu_memory_drift_mib"] is None

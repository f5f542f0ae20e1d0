"""The soak driver's pieces that need no server: the workload generator and its profiles,
the Prometheus parser on both KV-usage metric names, the reference comparison on synthetic
answers, the memory readings, the per-round figures and the command line's checks.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from pbs_vllm.evals.soak import (
    PROFILES,
    DisconnectRound,
    Drain,
    Leaver,
    Metrics,
    Probe,
    RoundResult,
    SoakReport,
    Workload,
    chosen_logprobs,
    kv_cache_usage,
    logprob_diff,
    parse_args,
    parse_gpu_memory,
    percentile,
    reference_report,
    round_stats,
    spread_indices,
    verdict,
    workload_from_args,
)

GPU = PROFILES["gpu"]


# ----------------------------------------------------------------------------- workload


def test_gpu_profile_lengths_log_uniform_within_bounds_and_a_fifth_shared():
    # The GPU profile's mix and length law at a tenth of its lengths (fast to draw).
    small = replace(GPU, short_len=(100, 12000), long_len=(100, 12000), prefix_len=3200,
                    tail_len=(2, 400))  # fmt: skip
    reqs = small.requests(1000, seed=1)
    lengths = [len(r.prompt) for r in reqs]
    assert min(lengths) >= 100 and max(lengths) <= 12000
    heads = Counter(r.prompt[: small.prefix_len] for r in reqs)
    shared = [p for p, n in heads.items() if n > 1]
    assert len(shared) == small.num_prefixes
    on_prefix = sum(heads[p] for p in shared)
    assert 0.15 <= on_prefix / len(reqs) <= 0.25, on_prefix
    unshared = sorted(len(r.prompt) for r in reqs if heads[r.prompt[: small.prefix_len]] == 1)
    # log-uniform over [100, 12000]: the median near sqrt(100 * 12000) = 1095, not 6000
    median = unshared[len(unshared) // 2]
    assert 700 <= median <= 1700, median
    assert sum(n < 400 for n in unshared) > 0.2 * len(unshared)


def test_gpu_profile_bounds_vocabulary_and_outputs():
    reqs = GPU.requests(40, seed=5)
    assert all(1024 <= len(r.prompt) <= 120 * 1024 for r in reqs)
    assert all(1000 <= t < 30000 for r in reqs for t in r.prompt)
    assert all(1 <= r.max_tokens <= 256 for r in reqs) and len({r.max_tokens for r in reqs}) > 20
    assert GPU.shared_fraction == 0.2 and GPU.prefix_len == 32 * 1024 and GPU.num_prefixes == 3


def test_the_same_seed_gives_the_same_requests_and_another_seed_others():
    small = Workload(short_len=(10, 400), long_len=(10, 400), log_uniform=True)
    assert small.requests(50, seed=3) == small.requests(50, seed=3)
    assert small.requests(50, seed=3) != small.requests(50, seed=4)


def test_capped_workload_fits_prompt_plus_max_tokens_in_max_model_len():
    capped = GPU.capped(40_000)
    assert capped.short_len == capped.long_len == (1024, 40_000 - 256)
    assert capped.tail_len == (16, 4096)  # 32K prefix + 4K tail fit already
    reqs = capped.requests(60, seed=2)
    assert max(len(r.prompt) + r.max_tokens for r in reqs) <= 40_000
    assert max(len(r.prompt) for r in reqs) > 20_000  # capped, not shrunk
    assert GPU.capped(36_000).tail_len == (16, 36_000 - 256 - 32 * 1024)
    assert capped.prefix_len == GPU.prefix_len and capped.mix == GPU.mix
    assert GPU.capped(10**6) == GPU


@pytest.mark.parametrize(
    "change,message",
    [
        ({"short_len": (10, 5)}, "short_len=(10, 5)"),
        ({"tail_len": (0, 5)}, "tail_len=(0, 5)"),
        ({"vocab": (600, 600)}, "vocab=(600, 600)"),
        ({"mix": (0, 0, 0)}, "mix=(0, 0, 0)"),
        ({"prefix_len": 0}, "prefix_len=0"),
    ],
)
def test_bad_workload_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Workload(**change)


def test_capping_below_the_prefix_is_an_error_naming_max_model_len():
    with pytest.raises(ValueError, match="max_model_len=30000"):
        GPU.capped(30_000)


def test_leavers_are_distinct_long_prompts_in_the_vocabulary():
    a = GPU.leavers(3, 5000, seed=1)
    assert len({r.prompt for r in a}) == 3
    assert all(len(r.prompt) == 5000 and r.max_tokens == 1024 for r in a)
    assert all(1000 <= t < 30000 for r in a for t in r.prompt)
    assert a != GPU.leavers(3, 5000, seed=2)


def test_spread_indices():
    assert spread_indices(0, 10) == []
    assert spread_indices(4, 10) == [0, 2, 5, 7]
    assert spread_indices(20, 10) == list(range(10))


# ----------------------------------------------------------------------------- metrics

PROMETHEUS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE {name} gauge
{name}{engine="0",model_name="m"} 0.25
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 7.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 7.0
"""


@pytest.mark.parametrize("name", ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"])
def test_metrics_parser_reads_either_kv_usage_name(name):
    m = Metrics.parse(PROMETHEUS.replace("{name}", name))
    assert kv_cache_usage(m) == 0.25
    assert m.value("vllm:num_requests_running") == 3.0  # summed over engines
    assert m.get("vllm:request_success_total", finished_reason="length") == 7.0
    assert m.get("vllm:e2e_request_latency_seconds_bucket", le="+Inf") == 7.0


def test_metrics_without_a_kv_gauge_give_none_not_zero():
    m = Metrics.parse('vllm:num_requests_running{engine="0"} 0.0\n')
    assert kv_cache_usage(m) is None
    assert m.value("vllm:kv_cache_usage_perc") is None
    assert m.value("vllm:num_requests_running") == 0.0


def test_gpu_memory_parser():
    assert parse_gpu_memory("1234\n5678\n") == [1234.0, 5678.0]
    with pytest.raises(ValueError, match="nvidia-smi"):
        parse_gpu_memory("N/A\n")


# ----------------------------------------------------------------------------- reference


def test_chosen_logprobs_picks_the_prompt_token_at_each_position():
    entries = [
        None,
        {"17": {"logprob": -1.5, "rank": 3, "decoded_token": "a"}},
        {"9": {"logprob": -0.25, "rank": 1, "decoded_token": "b"}},
    ]
    assert chosen_logprobs(entries, [5, 17, 9]) == (None, -1.5, -0.25)
    with pytest.raises(ValueError, match="position 2 lack the prompt token 8"):
        chosen_logprobs(entries, [5, 17, 8])
    with pytest.raises(ValueError, match="3 prompt_logprobs entries for 2 tokens"):
        chosen_logprobs(entries, [5, 17])


def test_logprob_diff():
    assert logprob_diff((None, -1.0, -2.0), (None, -1.05, -2.0)) == pytest.approx(0.05)
    assert logprob_diff((None, -1.0), (None, -1.0, -2.0)) == math.inf
    assert logprob_diff((None, -1.0), (-0.5, -1.0)) == math.inf
    assert logprob_diff((None, float("nan")), (None, -1.0)) == math.inf


def test_reference_report_finds_each_kind_of_mismatch():
    lp = (None, -1.0, -2.0, -3.0)
    main = [
        Probe(5, lp),
        Probe(6, lp),  # first token differs
        Probe(7, (None, -1.0, -2.3, -3.0)),  # one position 0.3 nats off
        Probe(8, (None, -1.0, -2.05, -3.0)),  # within 0.1
        None,  # failed on the server under test
        Probe(9),  # no logprobs asked for
    ]
    ref = [Probe(5, lp), Probe(5, lp), Probe(7, lp), Probe(8, lp), Probe(1, lp), Probe(9)]
    rep = reference_report(main, ref, atol=0.1)
    assert rep.first_token_mismatches == [1]
    assert rep.logprob_mismatches == [2]
    assert rep.missing == [4]
    assert rep.logprobs_compared == 4
    assert rep.worst_logprob_diff == pytest.approx(0.3) and rep.worst_logprob_request == 2
    assert not rep.ok
    clean = reference_report(main[:1] + main[3:4], ref[:1] + ref[3:4], atol=0.1)
    assert clean.ok and clean.worst_logprob_diff == pytest.approx(0.05)
    assert not reference_report(main[:1], ref[:1], atol=0.1, errors=["HTTP 500"]).ok


# ----------------------------------------------------------------------------- report


def _report(**kw) -> SoakReport:
    base = dict(
        requests_sent=4, requests_served=4, errors=[], max_in_flight=2, max_running=2,
        health_checks=3, health_failures=0, round_seconds=[1.0, 1.0], rss_mib=[100, 110, 111],
        round_mismatches=[], sequential_replayed=0, sequential_mismatches=[],
        gpu_memory_mib=[[500, 500], [900, 700], [901, 760]],
    )  # fmt: skip
    return SoakReport(**{**base, **kw})


def test_drifts_and_verdict():
    rep = _report()
    assert rep.rss_drift_mib == 1 and rep.gpu_memory_drift_mib == 60
    assert verdict(rep) == {"soak": True}
    assert verdict(rep, max_rss_drift_mib=1, max_gpu_drift_mib=60) == {
        "soak": True, "rss_drift": True, "gpu_memory_drift": True,
    }  # fmt: skip
    assert not verdict(rep, max_gpu_drift_mib=59)["gpu_memory_drift"]
    assert not verdict(_report(gpu_memory_mib=[]), max_gpu_drift_mib=1e9)["gpu_memory_drift"]
    bad_ref = reference_report([Probe(1)], [Probe(2)], atol=0.1)
    assert verdict(rep, bad_ref)["reference"] is False


def test_a_disconnect_round_fails_unless_drained_and_the_others_served():
    drained, stuck = Drain(True, 0.5, 0.0, 0.0), Drain(False, 120.0, 1.0, 0.4)
    cut = Leaver(300, 0.5, chunks=0)
    assert DisconnectRound(1, [cut], drained, 0).ok
    assert not DisconnectRound(1, [cut], stuck, 0).ok
    assert not DisconnectRound(1, [cut], drained, others_failed=1).ok
    assert not DisconnectRound(1, [Leaver(300, 0.5, finished=True)], drained, 0).ok
    assert not DisconnectRound(1, [Leaver(300, 0.5, True, error="HTTP 400")], drained, 0).ok
    assert not _report(disconnects=[DisconnectRound(1, [cut], stuck, 0)]).ok


def test_round_stats_ttft_and_throughput():
    res = RoundResult(
        outputs=[[1, 2, 3], [4], None, [5, 6]], ttft_s=[0.1, 0.4, None, 0.2], seconds=2.0
    )
    stats = round_stats(res, "1")
    assert stats["served"] == 3 and stats["output_tokens"] == 6
    assert stats["output_tokens_per_s"] == 3.0
    assert stats["ttft_s"] == {"mean": pytest.approx(0.233, abs=1e-3), "p50": 0.2, "p90": 0.4,
                               "max": 0.4}  # fmt: skip
    assert (
        round_stats(RoundResult(outputs=[[1]], ttft_s=[None], seconds=1.0), "x")["ttft_s"]["p50"]
        is None
    )
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([], 50) is None


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--vocab", "30000,1000"], "LOW 30000 is above HIGH 1000"),
        (["--vocab", "abc"], "expected LOW,HIGH"),
        (["--mix", "1,2"], "SHORT,LONG,SHARED"),
        (["--disconnect-after", "2,1"], "0 <= LOW <= HIGH"),
        (["--logprob-atol", "-1"], "expected a number >= 0"),
        (["--prompt-logprobs", "5"], "--prompt-logprobs needs --reference-url"),
        (["--concurrency", "0"], "--concurrency 0: must be >= 1"),
        (["--disconnects", "-1"], "--disconnects -1: must be >= 0"),
        (["--profile", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_options_are_named(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--url", "http://x", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_and_field_flags_make_the_workload():
    args = parse_args(["--url", "http://x", "--profile", "gpu", "--vocab", "5,50",
                       "--max-tokens", "1,8", "--no-log-uniform"])  # fmt: skip
    w = workload_from_args(args, max_model_len=60_000)
    assert w.vocab == (5, 50) and w.max_tokens == (1, 8) and not w.log_uniform
    assert w.short_len == (1024, 60_000 - 8) and w.prefix_len == GPU.prefix_len
    with pytest.raises(SystemExit, match="max_model_len=1000"):
        workload_from_args(args, max_model_len=1000)
    prompt_all = parse_args(["--url", "u", "--reference-url", "v", "--prompt-logprobs"])
    assert prompt_all.prompt_logprobs == -1  # every request

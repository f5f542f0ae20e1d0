"""`vllm.LLM` on the tiny model: PBS against the stock CPU backend, in one process.

Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the tests can read the PBS
stats object; test_engine_spawn.py covers the multi-process start.
"""

from __future__ import annotations

import pytest
from engine_util import (
    PBS_FULL,
    PBS_SPARSE,
    env,
    greedy,
    make_llm,
    random_prompts,
    shutdown,
    tokens_and_logprobs,
)

from pbs_vllm.backend.stats import STATS

pytestmark = pytest.mark.engine

LENGTHS = [150, 90, 200]  # several 64-token chunks each, batched together with decodes
SHARED = 160  # prefix shared by the two prefix-cache prompts (5 cache blocks of 32)


def _run(backend, pbs):
    """Outputs of the mixed batch and of two prompts sharing a prefix, plus PBS stats."""
    prompts = random_prompts(1, LENGTHS)
    prefix, tail_a, tail_b = random_prompts(2, [SHARED, 20, 30])
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = make_llm(backend, pbs)
    try:
        STATS.reset()
        mixed = greedy(llm, prompts)
        stats = STATS.snapshot()
        first = greedy(llm, [prefix + tail_a])
        second = greedy(llm, [prefix + tail_b])
    finally:
        shutdown(llm)
    return {"mixed": mixed, "stats": stats, "prefix": first + second}


@pytest.fixture(scope="module")
def stock():
    return _run(None, None)


@pytest.fixture(scope="module")
def pbs():
    return _run("pbs", PBS_FULL)


def test_greedy_tokens_match_stock_backend(stock, pbs):
    s_tok, s_lp = tokens_and_logprobs(stock["mixed"])
    p_tok, p_lp = tokens_and_logprobs(pbs["mixed"])
    assert p_tok == s_tok
    assert sum(p_lp, []) == pytest.approx(sum(s_lp, []), abs=2e-3)


def test_prompts_were_prefilled_in_several_pbs_chunks(pbs):
    stats = pbs["stats"]
    assert stats["sparse_prefill_tokens"] == sum(LENGTHS)
    assert stats["dense_prefill_tokens"] == 0
    assert stats["steps"] >= sum(LENGTHS) // 64
    assert stats["decode_tokens"] > 0
    assert stats["mean_density"] == pytest.approx(1.0)  # tau=1 keeps every block


def test_prefix_cache_hits_and_tokens_match_stock(stock, pbs):
    first, second = pbs["prefix"]
    assert not first.num_cached_tokens
    assert second.num_cached_tokens >= SHARED - 32
    assert tokens_and_logprobs(pbs["prefix"])[0] == tokens_and_logprobs(stock["prefix"])[0]


def test_sparse_path_reports_density_below_one():
    prompts = random_prompts(3, [220, 120])
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = make_llm("pbs", PBS_SPARSE)
    try:
        STATS.reset()
        toks, lps = tokens_and_logprobs(greedy(llm, prompts, max_tokens=3))
    finally:
        shutdown(llm)
    stats = STATS.snapshot()
    assert stats["density_samples"] > 0
    assert stats["mean_density"] < 0.9
    assert all(len(t) == 3 for t in toks)
    assert all(lp < 0 for row in lps for lp in row)

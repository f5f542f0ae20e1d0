"""Multi-process engine with spawned workers: the backend and plugin load in every child."""

from __future__ import annotations

import pytest
from engine_util import PBS_FULL, env, greedy, make_llm, random_prompts, shutdown

pytestmark = pytest.mark.engine


def test_spawned_engine_runs_pbs_and_matches_stock(capfd):
    prompts = random_prompts(4, [140, 70])
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        stock = make_llm(None)
    try:
        expected = [list(o.outputs[0].token_ids) for o in greedy(stock, prompts)]
    finally:
        shutdown(stock)
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_WORKER_MULTIPROC_METHOD="spawn"):
        llm = make_llm("pbs", PBS_FULL)
    try:
        got = [list(o.outputs[0].token_ids) for o in greedy(llm, prompts)]
    finally:
        shutdown(llm)
    assert got == expected
    # The stats line comes from the spawned worker, so PBS really ran there.
    assert "PBS prefill:" in capfd.readouterr().out

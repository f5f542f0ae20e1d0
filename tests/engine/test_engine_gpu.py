"""GPU versions of the engine tests (vLLM 0.26 on CUDA): bf16, FLASH_ATTN as reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_util import env, greedy, make_llm, random_prompts, shutdown, tokens_and_logprobs

from pbs_vllm.backend.stats import STATS
from pbs_vllm.models import tiny_llama_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.engine,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_PBS = {
    "block_size": 64,
    "segment_size": 128,
    "tau": 1.0,
    "dense_above": None,  # full masks must run the PBS kernels, not switch to stock
    "max_kept_fraction": None,
    "dense_fallback_len": 0,
    "stats_log_interval_s": 1e-6,
}
GPU_ARGS = dict(
    dtype="bfloat16", max_model_len=8192, max_num_batched_tokens=1024, gpu_memory_utilization=0.3
)


def _llm(backend, pbs, **kwargs):
    """In-process engine (so the test reads the stats object) with GPU_ARGS + kwargs."""
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        return make_llm(backend, pbs, **{**GPU_ARGS, **kwargs})


def test_gpu_greedy_tokens_match_flash_attn_with_decode_cuda_graphs():
    """Compiled engines (piecewise + full decode CUDA graphs): PBS decodes replay the
    stock FLASH_ATTN graphs, prefills run eagerly between them."""
    prompts = random_prompts(5, [3000, 1500, 700])
    outs = {}
    for backend, pbs in (("FLASH_ATTN", None), ("pbs", GPU_PBS)):
        llm = _llm(backend, pbs, enforce_eager=False)
        try:
            STATS.reset()
            outs[backend] = tokens_and_logprobs(greedy(llm, prompts, max_tokens=4))
        finally:
            shutdown(llm)
    (f_tok, f_lp), (p_tok, p_lp) = outs["FLASH_ATTN"], outs["pbs"]
    assert [t[:2] for t in p_tok] == [t[:2] for t in f_tok]
    assert sum(p_lp, [])[:2] == pytest.approx(sum(f_lp, [])[:2], abs=0.1)
    assert STATS.snapshot()["sparse_prefill_tokens"] == 5200


def _dummy_model(tmp_path: Path) -> Path:
    """The tiny model's tokenizer with a head_dim 128, 8 q / 2 KV head config (no weights:
    load it with load_format="dummy")."""
    tiny, model = Path(tiny_llama_path()), tmp_path / "llama-dummy"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny / name, model / name)
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(
        hidden_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=2048,
        max_position_embeddings=16384,
        torch_dtype="bfloat16",
    )
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_gpu_sparse_path_on_dummy_weights_at_real_head_size(tmp_path):
    """Random (dummy) weights with head_dim 128: the sparse path runs and drops blocks."""
    model = _dummy_model(tmp_path)
    pbs = {
        "block_size": 128,
        "segment_size": 256,
        "tau": 0.9,
        "max_kept_fraction": 0.3,
        "dense_fallback_len": 0,
        "stats_log_interval_s": 1e-6,
    }
    llm = _llm(
        "pbs",
        pbs,
        model=str(model),
        load_format="dummy",
        max_model_len=16384,
        max_num_batched_tokens=4096,
    )
    try:
        STATS.reset()
        toks, lps = tokens_and_logprobs(greedy(llm, random_prompts(6, [12000]), max_tokens=2))
    finally:
        shutdown(llm)
    assert len(toks[0]) == 2 and all(lp <= 0 for lp in lps[0])
    snap = STATS.snapshot()
    assert snap["sparse_prefill_tokens"] == 12000
    assert snap["density_samples"] > 0 and snap["mean_density"] < 0.9


def test_gpu_prefill_layer_calls_never_wait_for_the_device(tmp_path, monkeypatch):
    """Every PBS layer call of a prefill step, with routing reading densities (a fixed
    dense_above, so every step could switch) and stats sampling on, runs under
    `torch.cuda.set_sync_debug_mode("error")`: no call may block the host on the GPU
    (issue 16: one `.tolist()` per layer had cost ~1 ms per layer call)."""
    from pbs_vllm.backend.impl import PBSAttentionImpl
    from pbs_vllm.backend.metadata import PBSAttentionMetadata

    forward = PBSAttentionImpl.forward
    checked = []

    def strict_forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kw):
        if not (isinstance(attn_metadata, PBSAttentionMetadata) and attn_metadata.prefill_runs):
            return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kw)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(self, layer, query, key, value, kv_cache, attn_metadata, *args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(attn_metadata.stock_all is not None)

    monkeypatch.setattr(PBSAttentionImpl, "forward", strict_forward)
    pbs = {
        "block_size": 128,
        "segment_size": 256,
        "tau": 0.9,
        "dense_fallback_len": 0,
        "dense_above": 0.95,
        "stats_log_interval_s": 1e-6,
    }
    llm = _llm(
        "pbs",
        pbs,
        model=str(_dummy_model(tmp_path)),
        load_format="dummy",
        max_model_len=16384,
        max_num_batched_tokens=4096,
        enforce_eager=True,
    )
    try:
        STATS.reset()
        # 3 and 2 chunks of 4096: later chunks fold the readings of earlier ones
        toks, _ = tokens_and_logprobs(greedy(llm, random_prompts(7, [11000, 6000]), max_tokens=2))
    finally:
        shutdown(llm)
    assert [len(t) for t in toks] == [2, 2]
    # steps without decodes could switch (routing read their densities; mixed steps cannot)
    assert sum(checked) >= 2
    assert STATS.snapshot()["density_samples"] > 0

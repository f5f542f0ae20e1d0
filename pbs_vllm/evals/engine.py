"""vLLM engine arguments shared by the benchmark runners (`benchmarks/bench_ruler.py`,
`benchmarks/bench_ttft.py`).

Nothing here imports vLLM; torch only inside `setup_environment` / `release_memory`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# A density sample at every sparse layer-call (see pbs_vllm.backend.stats: the impl
# computes a mask's density only while a stats log line is due).
EVERY_CALL_S = 1e-9


def setup_environment() -> bool:
    """Environment for an in-process engine; call before vLLM is imported. Returns
    whether CUDA is available.

    The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so the backend's
    stats object is readable here. Without CUDA: vLLM's CPU platform with PBS support
    (`PBS_VLLM_CPU_PLATFORM=1`), Triton kernels in the interpreter (`TRITON_INTERPRET=1`)
    and a 1 GiB KV cache unless `VLLM_CPU_KVCACHE_SPACE` is set. Existing values win.
    """
    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    return on_gpu


def stock_backend_name(on_gpu: bool) -> str:
    """The platform's stock attention backend, the one PBS wraps: FLASH_ATTN / CPU_ATTN."""
    return "FLASH_ATTN" if on_gpu else "CPU_ATTN"


def yarn_rope_scaling(model: str | Path, factor: float) -> dict:
    """YaRN rope scaling by `factor` over the model's native context (the Qwen2.5 way past
    32K): the dict vLLM's `hf_overrides` takes as `rope_scaling`.

    The model's rope_theta goes into the dict when its config.json has one: with
    transformers 5, `rope_scaling` replaces the whole `rope_parameters` dict, and vLLM's
    rotary embedding silently falls back to base 10000 when the dict has no rope_theta.
    """
    config = json.loads((Path(model) / "config.json").read_text())
    native = config.get("max_position_embeddings", 32768)
    out: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": native,
    }
    params = config.get("rope_parameters")
    theta = config.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is not None:
        out["rope_theta"] = theta
    return out


def yarn_hf_overrides(model: str | Path, factor: float) -> dict:
    """vLLM `hf_overrides` for YaRN by `factor`: `rope_scaling` (`yarn_rope_scaling`) and
    `max_position_embeddings` = native x factor. vLLM 0.32 takes a YaRN model's
    max_position_embeddings as already scaled (the transformers convention) and refuses a
    longer max_model_len otherwise; its YaRN rotary embedding reads only the rope dict."""
    rope = yarn_rope_scaling(model, factor)
    longest = int(rope["original_max_position_embeddings"] * factor)
    return {"rope_scaling": rope, "max_position_embeddings": longest}


def engine_kwargs(
    model: str | Path,
    backend: str,
    pbs: dict | None,
    *,
    on_gpu: bool,
    max_model_len: int,
    enforce_eager: bool = True,
    seed: int = 0,
    dtype: str | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int | None = None,
    yarn: float | None = None,
    tokenizer: str | Path | None = None,
    enable_prefix_caching: bool = False,
    max_logprobs: int | None = None,
    kv_cache_bytes: int | None = None,
) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)` for the stock backend (`backend` 'stock', `pbs` None) or PBS
    (`backend` 'pbs' with its config dict, density sampled at every layer-call).

    Prefix caching is off by default: a prompt whose start is cached would prefill only
    its suffix, which changes PBS's masks (and the timing) depending on batch order.
    `dtype` None: "auto" on CUDA, float32 on the CPU (the Triton interpreter's dtype).
    `kv_cache_bytes` (GPU): a fixed KV cache instead of one sized by vLLM's memory profile,
    which counts every process's allocations on the device as its own, so engines that
    start side by side on one GPU need it.
    """
    kwargs: dict[str, Any] = dict(
        model=str(model),
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        enable_prefix_caching=enable_prefix_caching,
        seed=seed,
        dtype=dtype or ("auto" if on_gpu else "float32"),
    )
    if tokenizer is not None:
        kwargs["tokenizer"] = str(tokenizer)
    if on_gpu and gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if on_gpu and kv_cache_bytes:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    if max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if max_logprobs is not None:
        kwargs["max_logprobs"] = max_logprobs
    if yarn:
        kwargs["hf_overrides"] = yarn_hf_overrides(model, yarn)
    if backend == "stock":
        if pbs is not None:
            raise ValueError("the stock backend takes no PBS settings")
        kwargs["attention_backend"] = stock_backend_name(on_gpu)
    elif backend == "pbs":
        pbs = {"stats_log_interval_s": EVERY_CALL_S, **(pbs or {})}
        kwargs.update(attention_backend="PBS", additional_config={"pbs": pbs})
    else:
        raise ValueError(f"backend must be 'stock' or 'pbs', not {backend!r}")
    return kwargs


def release_memory(on_gpu: bool) -> None:
    """After `del llm`: collect the engine's cycles and return cached device memory."""
    import gc

    gc.collect()
    if on_gpu:
        import torch

        torch.cuda.empty_cache()

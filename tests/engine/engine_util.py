"""Helpers shared by the engine tests: engine construction, prompts, comparisons."""

from __future__ import annotations

import contextlib
import gc
import os

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from pbs_vllm.models import tiny_llama_path

# Small blocks and segments so prompts of a few hundred tokens span several segments.
PBS_FULL = {
    "block_size": 16,
    "segment_size": 32,
    "tau": 1.0,
    "dense_above": None,  # full masks must run the PBS kernels, not switch to stock
    "max_kept_fraction": None,
    "dense_fallback_len": 0,
    "stats_log_interval_s": 1e-6,
}
PBS_SPARSE = {**PBS_FULL, "tau": 0.5, "max_kept_fraction": 0.3}
VOCAB = (3, 600)  # ids the tiny tokenizer (605 tokens) knows, specials excluded


@contextlib.contextmanager
def env(**values: str):
    """Set environment variables for the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_llm(backend: str | None, pbs: dict | None = None, **kwargs) -> LLM:
    """LLM on the tiny model; backend None = the platform's stock attention."""
    args = dict(
        model=tiny_llama_path(),
        dtype=kwargs.pop("dtype", "float32"),
        enforce_eager=True,
        max_model_len=1024,
        block_size=32,
        max_num_batched_tokens=64,
        max_num_seqs=4,
        seed=0,
    )
    if backend is not None:
        args["attention_backend"] = backend
    if pbs is not None:
        args["additional_config"] = {"pbs": pbs}
    return LLM(**{**args, **kwargs})


def shutdown(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(*VOCAB, (n,), generator=g).tolist() for n in lengths]


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 6):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, seed=0)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def tokens_and_logprobs(outputs) -> tuple[list[list[int]], list[list[float]]]:
    toks, lps = [], []
    for o in outputs:
        c = o.outputs[0]
        toks.append(list(c.token_ids))
        lps.append([step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
    return toks, lps

"""The trained retrieval model (`pbs_vllm/models/retrieval-llama`) on vLLM: an engine per
setting and greedy one-token answers (`benchmarks/bench_accuracy.py` and the CPU accuracy
test). vLLM is imported inside the functions.

Importing this module sets up the environment for an in-process engine
(`pbs_vllm.evals.engine.setup_environment`: the backend's stats must be readable here, and
without CUDA vLLM's CPU platform with PBS and the Triton interpreter); import it before
vLLM builds its platform.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pbs_vllm.models
from pbs_vllm.evals.engine import setup_environment

setup_environment()

MODEL_DIR = Path(pbs_vllm.models.__file__).resolve().parent / "retrieval-llama"


@dataclass(frozen=True)
class Setting:
    """One engine configuration: `pbs` None = the platform's stock backend."""

    name: str
    pbs: dict | None = None


def make_llm(
    setting: Setting,
    max_model_len: int,
    block: int,
    segment: int,
    on_gpu: bool,
    gpu_mem: float = 0.5,
):
    """A vLLM engine for `setting`: sparse settings use PBS with dense_fallback_len 0."""
    from vllm import LLM

    kwargs = dict(
        model=str(MODEL_DIR),
        max_model_len=max_model_len,
        enforce_eager=True,
        seed=0,
        dtype="bfloat16" if on_gpu else "float32",
    )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_mem
    if setting.pbs is None:
        kwargs["attention_backend"] = "FLASH_ATTN" if on_gpu else "CPU_ATTN"
    else:
        pbs = {
            "block_size": block,
            "segment_size": segment,
            "dense_fallback_len": 0,
            "dense_above": None,  # PBS at any density: accuracy of the masks themselves
            "stats_log_interval_s": 1e-9,  # sample density at every layer and step
            **setting.pbs,
        }
        kwargs.update(attention_backend="pbs", additional_config={"pbs": pbs})
    return LLM(**kwargs)


def run_prompts(llm, prompts: list[list[int]], answers: list[int]) -> tuple[float, float | None]:
    """(exact-match accuracy, mean PBS density or None) of greedy one-token answers."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pbs_vllm.backend.stats import STATS

    STATS.reset()
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts],
        SamplingParams(max_tokens=1, temperature=0.0),
        use_tqdm=False,
    )
    preds = [o.outputs[0].token_ids[0] for o in outs]
    accuracy = sum(p == a for p, a in zip(preds, answers)) / len(answers)
    return accuracy, STATS.snapshot()["mean_density"]

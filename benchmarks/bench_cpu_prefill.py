"""PBS prefill on the CPU against the stock CPU backend (CPU_ATTN), real model, in-process.

    python benchmarks/bench_cpu_prefill.py                      # SmolLM2-135M, 4K prompt
    python benchmarks/bench_cpu_prefill.py --lengths 2048,4096 --reps 5 --dtype float32

Fetches SmolLM2-135M-Instruct (`pbs_vllm.models.fetch`, cached), starts one `vllm.LLM`
per setting in this process (so the backend's density stats are readable) and times
greedy one-token generations of pass-key prompts, i.e. the prefill (median and best of
--reps, after one warm-up prompt of the longest length; prefix caching off, so every rep prefills the whole prompt).
PBS runs with its sparse path forced on: dense_fallback_len 0, dense_above off, so every
layer estimates and attends block-sparsely (the vectorized PyTorch kernels of
`pbs_vllm.kernels.cpu`). Prints a markdown table; with --out also writes JSON there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pbs_vllm.evals.passkey import CPU_MODEL, passkey_prompt  # noqa: E402

MODEL = CPU_MODEL
# The sparse path forced on: every prefill estimates and attends block-sparsely.
PBS_CPU = {
    "block_size": 64,
    "segment_size": 256,
    "tau": 0.9,
    "dense_fallback_len": 0,
    "dense_above": None,
    "stats_log_interval_s": 1e-9,  # a density sample at every layer and step
}


def model_path(dtype: str) -> str:
    """SmolLM2's HF folder in the model cache, fetched and converted on first use."""
    from pbs_vllm.models import fetch

    return str(fetch.fetch(MODEL, dtype=dtype))


def make_llm(path: str, backend: str, dtype: str, max_len: int, batched: int, pbs=None):
    from vllm import LLM

    kwargs = dict(
        model=path,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=max_len,
        max_num_batched_tokens=batched,
        max_num_seqs=1,
        enable_prefix_caching=False,
        seed=0,
        attention_backend=backend,
    )
    if pbs is not None:
        kwargs["additional_config"] = {"pbs": pbs}
    return LLM(**kwargs)


def time_prefills(llm, prompts: list[list[int]]) -> tuple[list[float], list[str]]:
    """Seconds of each greedy one-token generation (one prompt at a time) and the tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1)
    seconds, texts = [], []
    for p in prompts:
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        texts.append(out[0].outputs[0].text)
    return seconds, texts


def run(args) -> list[dict]:
    from transformers import AutoTokenizer

    from pbs_vllm.backend.stats import STATS

    path = model_path(args.dtype)
    tok = AutoTokenizer.from_pretrained(path)
    lengths = [int(x) for x in args.lengths.split(",")]
    max_len = max(lengths) + 256
    prompts = {
        n: [
            passkey_prompt(tok, n, 10000 + 7919 * i, (i + 0.5) / args.reps)
            for i in range(args.reps)
        ]
        for n in lengths
    }
    warm = passkey_prompt(tok, max(lengths), 4242, 0.5)  # allocations at full size
    settings = [("stock", "CPU_ATTN", None), ("pbs", "pbs", {**PBS_CPU, **json.loads(args.pbs)})]
    rows = []
    for name, backend, pbs in settings:
        llm = make_llm(path, backend, args.dtype, max_len, max(max_len, 8192), pbs)
        try:
            time_prefills(llm, [warm])
            for n in lengths:
                STATS.reset()
                seconds, _ = time_prefills(llm, prompts[n])
                snap = STATS.snapshot()
                rows.append(
                    dict(
                        setting=name,
                        length=n,
                        tokens=statistics.mean(len(p) for p in prompts[n]),
                        prefill_s=statistics.median(seconds),
                        best_s=min(seconds),
                        all_s=seconds,
                        density=snap["mean_density"] if pbs else None,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    stock = {r["length"]: r for r in rows if r["setting"] == "stock"}
    for r in rows:
        r["vs_stock"] = r["prefill_s"] / stock[r["length"]]["prefill_s"]
        r["best_vs_stock"] = r["best_s"] / stock[r["length"]]["best_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | prompt tokens | prefill s, median | vs stock | prefill s, best | vs stock "
        "| PBS density |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        lines.append(
            f"| {r['setting']} | {r['tokens']:.0f} | {r['prefill_s']:.2f} | "
            f"{r['vs_stock']:.2f}x | {r['best_s']:.2f} | {r['best_vs_stock']:.2f}x | {density} |"
        )
    return "\n".join(lines)


def setup_env() -> None:
    """In-process engine (stats readable here) on the PBS CPU platform; before vLLM loads."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB


def main() -> None:
    setup_env()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="4096", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="timed prompts per length and setting")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--pbs", default="{}", help="JSON overrides of the PBS settings")
    p.add_argument("--out", type=Path, default=None, help="write bench_cpu_prefill.json here")
    args = p.parse_args()
    rows = run(args)
    print(table(rows))
    print(f"torch threads: {torch.get_num_threads()}, PBS settings: {PBS_CPU} + {args.pbs}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_cpu_prefill.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

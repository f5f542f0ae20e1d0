"""Retrieval accuracy and achieved density of PBS vs the stock attention backend in vLLM.

    python -m benchmarks.bench_accuracy                      # GPU: 4K/8K/16K/32K, every setting
    python -m benchmarks.bench_accuracy --lengths 4096 --settings dense,pbs-0.9

Runs the shipped retrieval model (`pbs_vllm/models/retrieval-llama`, trained by
`training.train`) on held-out multi-needle key-value prompts, greedy one token, exact match
on the token id. Settings: the stock backend (FLASH_ATTN on CUDA, CPU_ATTN on the CPU),
PBS at tau 0.8 / 0.9 / 0.95, PBS with pooled scores for every block (`exact_last_block`
off, the paper's selection), the unpermuted mean-pooling ablation at the same taus, and
both at fixed kept fractions (tau 1 with a `max_kept_fraction` cap, so both keep the same
number of blocks). Density is the backend's mean computed fraction of the causally visible
key blocks (`pbs_vllm.backend.stats`), which is why the engine runs in-process. Prints a markdown
table; with $OUT set, also writes $OUT/bench_accuracy.{csv,md,json}.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The engine must run in this process so the backend's stats are readable here. Without
# CUDA: vLLM's CPU platform with PBS support, Triton kernels in the interpreter.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if not torch.cuda.is_available():
    os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pbs_vllm.evals.retrieval import MODEL_DIR, Setting, make_llm, run_prompts  # noqa: E402
from training.evaluate import BENCH_SEED, split_seed  # noqa: E402
from training.retrieval_data import eval_prompts  # noqa: E402

NUM_NEEDLES = 16


def default_settings() -> list[Setting]:
    out = [Setting("dense")]
    for tau in (0.8, 0.9, 0.95):
        out.append(Setting(f"pbs-{tau}", {"tau": tau}))
        out.append(Setting(f"pooled-{tau}", {"tau": tau, "exact_last_block": False}))
        out.append(Setting(f"meanpool-{tau}", {"tau": tau, "permute": False}))
    for cap in (0.1, 0.25):
        out.append(Setting(f"pbs-cap{cap}", {"tau": 1.0, "max_kept_fraction": cap}))
        out.append(
            Setting(f"meanpool-cap{cap}", {"tau": 1.0, "max_kept_fraction": cap, "permute": False})
        )
    return out


@dataclass
class Result:
    setting: str
    length: int
    prompts: int
    accuracy: float
    density: float | None
    seconds: float
    extra: dict = field(default_factory=dict)


def run_setting(
    setting: Setting,
    lengths: list[int],
    num_prompts: int,
    seed: int,
    block: int,
    segment: int,
    on_gpu: bool,
    gpu_mem: float = 0.5,
) -> list[Result]:
    """Accuracy and density of one setting at every length (one engine for all lengths)."""
    llm = make_llm(setting, max(lengths) + 8, block, segment, on_gpu, gpu_mem)
    results = []
    try:
        for n in lengths:
            prompts, answers = eval_prompts(num_prompts, n, NUM_NEEDLES, split_seed(seed, n))
            t0 = time.perf_counter()
            acc, density = run_prompts(llm, prompts, answers)
            results.append(
                Result(setting.name, n, num_prompts, acc, density, time.perf_counter() - t0)
            )
    finally:
        del llm
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return results


def markdown(results: list[Result], lengths: list[int]) -> str:
    """One row per setting: accuracy (density) per length."""
    head = "| setting | " + " | ".join(f"{n // 1024}K acc (density)" for n in lengths) + " |"
    lines = [head, "|---|" + "---:|" * len(lengths)]
    by = {(r.setting, r.length): r for r in results}
    for name in dict.fromkeys(r.setting for r in results):
        cells = []
        for n in lengths:
            r = by.get((name, n))
            if r is None:
                cells.append("")
                continue
            dens = "1.00" if r.density is None else f"{r.density:.2f}"
            cells.append(f"{100 * r.accuracy:.1f}% ({dens})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, results: list[Result], table: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.__dict__ for r in results]
    with open(out / "bench_accuracy.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "extra"])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k != "extra"} for r in rows)
    (out / "bench_accuracy.md").write_text(table + "\n")
    (out / "bench_accuracy.json").write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")


def main(argv: list[str] | None = None) -> list[Result]:
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384,32768" if on_gpu else "2048")
    p.add_argument("--num-prompts", type=int, default=100 if on_gpu else 8)
    p.add_argument("--settings", default=None, help="comma-separated names (default: all)")
    p.add_argument("--block", type=int, default=128 if on_gpu else 16)
    p.add_argument("--segment", type=int, default=512 if on_gpu else 64)
    p.add_argument("--seed", type=int, default=BENCH_SEED)
    p.add_argument(
        "--gpu-mem", type=float, default=0.5, help="vLLM gpu_memory_utilization (GPU only)"
    )
    args = p.parse_args(argv)
    if not (MODEL_DIR / "model.safetensors").exists():
        raise SystemExit(f"{MODEL_DIR}/model.safetensors is missing: train it with training.train")
    lengths = [int(x) for x in args.lengths.split(",")]
    settings = default_settings()
    if args.settings:
        wanted = args.settings.split(",")
        known = {s.name: s for s in settings}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"--settings: unknown {unknown}; allowed: {', '.join(known)}")
        settings = [known[w] for w in wanted]

    results: list[Result] = []
    for s in settings:
        results += run_setting(
            s, lengths, args.num_prompts, args.seed, args.block, args.segment, on_gpu, args.gpu_mem
        )
        print(markdown([r for r in results if r.setting == s.name], lengths), flush=True)
    table = markdown(results, lengths)
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    title = (
        f"Retrieval accuracy (exact match, {args.num_prompts} prompts per length, "
        f"{NUM_NEEDLES} needles), block {args.block} / segment {args.segment}, {device}"
    )
    print(f"\n{title}\n\n{table}")
    if os.environ.get("OUT"):
        meta = {"title": title, "args": vars(args), "device": device}
        write_outputs(Path(os.environ["OUT"]), results, f"{title}\n\n{table}", meta)
    return results


if __name__ == "__main__":
    main()

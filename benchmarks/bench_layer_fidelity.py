"""Per-layer, per-KV-head mask fidelity of PBS on a real model and a RULER-style prompt (CPU).

Runs the model once over one prompt from `pbs_vllm.evals.ruler` (token ids exactly as
`benchmarks/bench_ruler.py` feeds them: chat template, answer budget reserved), captures
every layer's post-RoPE q [N, Hq, D], k and v [N, Hkv, D] at the attention call, then per
layer builds the PBS mask the way `pbs-vllm fidelity` / `pbs-vllm inspect` do
(`PromptAttention.mask`: the reference estimator over the whole prompt as one chunk) with
the serving geometry (block 128, segment 512, exact_last_block; `--geometries` adds others)
at each tau, and scores it against dense causal attention in float64
(`pbs_vllm.fidelity.metrics.mask_fidelity`).

Reported per layer and tau: `PBSBlockMask.density()` (computed / causally visible key
blocks), the kept fraction of candidate blocks, recall (dense attention mass on the computed
keys; mean over query heads and queries, per KV head, minimum over KV heads and over query
heads), relative output error, each also over the last `--last` queries only (the answer
position), and optionally the same for the density-matched top-k oracle (`--oracle`).
A check per layer: the float64 reference output of the captured q, k, v against the
model's own attention output.

Dense probabilities are [Hq, N, N] float64 (N=4096, 14 heads: 1.9 GB), one layer at a time.

    python benchmarks/bench_layer_fidelity.py --model /tmp/qwen-hf --task niah_multivalue \\
        --length 4096 --taus 0.9,0.95,0.98 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch

from pbs_vllm.evals import ruler
from pbs_vllm.fidelity.capture import cached_capture, load_prompt_ids
from pbs_vllm.fidelity.metrics import kept_pairs, mask_fidelity, masked_attention
from pbs_vllm.fidelity.oracle import topk_oracle_mask
from pbs_vllm.fidelity.report import PromptAttention, candidate_fraction
from pbs_vllm.kernels.params import SparsityParams


def breakdown(token_mask, probs, v, out_dense, last: int) -> dict:
    """The quantities of `mask_fidelity`, broken down by KV head and over the last `last`
    queries (the same `masked_attention`)."""
    hq, n, _ = probs.shape
    hkv = v.shape[1]
    group = hq // hkv
    mass, out = masked_attention(kept_pairs(token_mask), probs, v)  # [Hq, N], [N, Hq, D]
    err = out - out_dense
    tail = slice(n - last, n)

    def rel(e, ref):
        return (e.norm() / ref.norm()).item()

    per_kv = []
    for h in range(hkv):
        hs = slice(h * group, (h + 1) * group)
        per_kv.append(
            {
                "recall": mass[hs].mean().item(),
                "rel_error": rel(err[:, hs], out_dense[:, hs]),
                "recall_last": mass[hs, tail].mean().item(),
                "rel_error_last": rel(err[tail, hs], out_dense[tail, hs]),
            }
        )
    per_q = mass.mean(dim=1)  # [Hq]
    return {
        "recall": mass.mean().item(),
        "rel_error": rel(err, out_dense),
        "recall_last": mass[:, tail].mean().item(),
        "rel_error_last": rel(err[tail], out_dense[tail]),
        "recall_min_kv": min(p["recall"] for p in per_kv),
        "recall_last_min_kv": min(p["recall_last"] for p in per_kv),
        "recall_min_qhead": per_q.min().item(),
        "recall_min_qhead_idx": int(per_q.argmin()),
        "recall_last_min_qhead": mass[:, tail].mean(dim=1).min().item(),
        "per_kv": per_kv,
    }


def score_mask(prompt: PromptAttention, mask, last: int, check: bool) -> dict:
    """The breakdown of a mask; with `check`, also the library metric (`mask_fidelity`),
    which it must match (a second pass over the [Hq, N, N] probabilities)."""
    token_mask = mask.to_dense(0)
    b = breakdown(token_mask, prompt.probs, prompt.v, prompt.out, last)
    if check:
        fid = mask_fidelity(token_mask, prompt.probs, prompt.v, prompt.out)
        if abs(b["recall"] - fid.recall) > 1e-9 or abs(b["rel_error"] - fid.rel_error) > 1e-9:
            raise RuntimeError(f"breakdown {b['recall']}, {b['rel_error']} != library {fid}")
        b["library_checked"] = True
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF folder (Qwen2 architecture)")
    ap.add_argument("--task", default="niah_multivalue", choices=ruler.TASKS)
    ap.add_argument("--length", default="4096", help="nominal RULER length (answer reserved)")
    ap.add_argument("--taus", default="0.9,0.95,0.98")
    ap.add_argument(
        "--geometries",
        default="128x512",
        help="comma-separated BLOCKxSEGMENT mask geometries, each scored at every tau",
    )
    ap.add_argument("--no-exact-last-block", action="store_true")
    ap.add_argument("--dense-last-tokens", type=int, default=0)
    ap.add_argument("--last", type=int, default=128, help="queries of the answer-position slice")
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default all)")
    ap.add_argument("--oracle", action="store_true", help="also score the top-k oracle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", type=int, default=0, help="prompt index (bench_ruler's order)")
    ap.add_argument("--json", default=None, help="write all results here (after every layer)")
    ap.add_argument("--cache", default=None, help="save / reuse the captured q, k, v (.pt file)")
    ap.add_argument(
        "--check-all",
        action="store_true",
        help="check the breakdown against mask_fidelity at every layer (default: first only)",
    )
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    length = ruler.parse_length(args.length)
    taus = [float(t) for t in args.taus.split(",")]
    geometries = [tuple(int(x) for x in g.split("x")) for g in args.geometries.split(",")]
    sample = load_prompt_ids(args.model, args.task, length, args.seed, args.index)
    ids = sample.prompt_token_ids
    n = len(ids)
    print(f"prompt: {args.task} @ {length}, index {args.index}, {n} tokens", flush=True)
    layers = cached_capture(args.model, ids, args.cache)
    t_fwd = time.perf_counter() - t0
    print(f"forward + capture: {t_fwd:.1f}s", flush=True)
    pick = range(len(layers)) if args.layers is None else map(int, args.layers.split(","))

    results = []
    meta = {
        "command_args": vars(args),
        "task": args.task,
        "length": length,
        "num_tokens": n,
        "answers": sample.answers,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "forward_s": t_fwd,
    }
    for i, li in enumerate(pick):
        t_layer = time.perf_counter()
        cap = layers[li]
        prompt = PromptAttention(cap["q"], cap["k"], cap["v"])
        ref = prompt.out.float()
        check = ((ref - cap["out"]).norm() / cap["out"].norm()).item()
        for (block_size, segment_size), tau in [(g, t) for g in geometries for t in taus]:
            params = SparsityParams(
                block_size=block_size,
                segment_size=segment_size,
                tau=tau,
                exact_last_block=not args.no_exact_last_block,
                dense_last_tokens=args.dense_last_tokens,
            )
            mask = prompt.mask(replace(params, permute=True))
            row = {
                "layer": li,
                "block_size": block_size,
                "segment_size": segment_size,
                "tau": tau,
                "density": mask.density(),
                "density_per_kv": mask.density_per_head_tensor().tolist(),
                "candidate_fraction": candidate_fraction(mask),
                "ref_check": check,
                "pbs": score_mask(prompt, mask, args.last, args.check_all or i == 0),
            }
            if args.oracle:
                oracle = topk_oracle_mask(prompt.probs, mask)
                row["oracle"] = score_mask(prompt, oracle, args.last, False)
            results.append(row)
            p = row["pbs"]
            print(
                f"layer {li:2d} {block_size}x{segment_size} tau {tau:.2f}: "
                f"density {row['density']:.3f} "
                f"cand {row['candidate_fraction']:.3f} recall {p['recall']:.4f} "
                f"(min kv {p['recall_min_kv']:.4f}) err {p['rel_error']:.4f} | last "
                f"recall {p['recall_last']:.4f} err {p['rel_error_last']:.4f}"
                + (f" | oracle recall {row['oracle']['recall']:.4f}" if args.oracle else ""),
                flush=True,
            )
        del prompt
        print(
            f"layer {li}: ref check {check:.2e}, {time.perf_counter() - t_layer:.1f}s", flush=True
        )
        if args.json:
            meta["total_s"] = time.perf_counter() - t0
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": results}, f, indent=1)

    print(f"total: {time.perf_counter() - t0:.1f}s")
    if args.json:
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()

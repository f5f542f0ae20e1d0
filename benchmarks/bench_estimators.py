"""Which block-mass estimate gives the least density at a given accuracy: PBS's serving
estimator against variants and the true-mass oracle, on a real model's captured attention
(CPU, no vLLM).

The model runs once over one RULER-style prompt (`pbs_vllm.fidelity.capture`:
transformers, float32, every layer's post-RoPE q, k, v); per layer, the prompt as one
chunk, the serving permutation (key importance of the last query block, segment sort)
is built once and every estimator turns pooled q.k scores into block probabilities p
[Hkv, query blocks, candidates]; `select_blocks` (the serving selection's reference:
tau prefix, sink, exact last-block row) then gives each tau's mask. Estimators:

  mean       the serving estimator: mean-pooled query block . mean-pooled key block
             (checked: its masks equal `build_block_mask_torch`'s, first layer)
  ksubK      keys pooled in sub-blocks of K tokens, a block's logit the log-sum-exp of its
             sub-blocks' (a block holding a few heavy keys is no longer averaged away)
  qsubQ      queries pooled in sub-blocks of Q tokens, a block's probability the mean of
             theirs (as the GQA group's heads already are)
  tempT      the mean estimator's logits times T (a sharper distribution)
  antidiag   PBS+ scoring (`scoring="antidiagonal"`, stride 8)
  sampleK    K real queries per query block, each with its exact softmax over the
             candidate keys, summed per key block (a sampled true mass: about K / B of
             the QK^T work of dense attention)
  NAME-nosink  estimator NAME with tau counted over the candidates besides the sink
             block (`tau_excludes_sink`: always kept, its mass no longer fills the budget)
  oracle     per sampled query block, the fewest candidate blocks of the largest *true*
             mass reaching tau of the candidates' true mass (what no estimate can beat
             under this permutation)

`--key-block-size` selects keys in smaller blocks than the query blocks (e.g. 64-key
blocks for 128-query blocks: full FA3 query tiles, finer key selection).

Accuracy is scored on `--sample-blocks` query blocks per layer, evenly spaced, always with
the last one (the answer position), against dense float32 attention
(`pbs_vllm.fidelity.blockwise`): recall (dense mass on computed keys), output error
(relative Frobenius) and density over the sampled blocks; density over every query block
too (not for the oracle, which is only defined on sampled blocks).

    python benchmarks/bench_estimators.py --model /tmp/qwen-hf --task niah_multivalue \\
        --length 16k --cache /tmp/cap.pt --taus 0.9,0.95,0.98,0.99 \\
        --estimators mean,ksub32,qsub32,antidiag,oracle --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from dataclasses import replace

import torch

from pbs_vllm.evals import ruler
from pbs_vllm.fidelity.blockwise import (
    FidelitySums,
    block_parts,
    dense_rows,
    keep_of,
    oracle_counts,
    oracle_keep,
    spaced,
)
from pbs_vllm.fidelity.capture import cached_capture, load_prompt_ids
from pbs_vllm.kernels.cpu import (
    build_block_mask_torch,
    key_importance_torch,
    pool_key_blocks_torch,
    pool_query_blocks_torch,
)
from pbs_vllm.kernels.estimate import exact_block_mass, segment_permutation
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.plan import plan_for
from pbs_vllm.kernels.selection import block_probs, select_blocks


def sub_pooled_probs(q, keys, perm, n_cand, bs, scale, q_sub, k_sub, temp):
    """Block probabilities [Hkv, Tq, C] from sub-block pooling: q [N, Hq, D] fp32 (the whole
    prompt), keys [Hkv, N, D], perm [Hkv, C * B]. Each query sub-block of q_sub tokens
    (mean of its present queries) takes a softmax over candidate blocks of the log-sum-exp
    of its k_sub-token key sub-blocks' logits (times temp); a block's probability is the
    mean over the group's heads and the query block's present sub-blocks."""
    n, hq, d = q.shape
    hkv = keys.shape[0]
    group = hq // hkv
    tq = -(-n // bs)
    nq, nk = bs // q_sub, bs // k_sub
    c = perm.shape[1] // bs
    padded = torch.zeros(tq * bs, hq, d)
    padded[:n] = q
    count = torch.zeros(tq * bs)
    count[:n] = 1
    count = count.view(tq, nq, q_sub).sum(-1)  # [Tq, nq]
    qp = padded.view(tq, nq, q_sub, hq, d).sum(2) / count.clamp(min=1)[..., None, None]
    qp = qp.permute(2, 0, 1, 3).reshape(hkv, group * tq * nq, d)  # [Hkv, G*Tq*nq, D]
    kp = keys.gather(1, perm.long()[..., None].expand(-1, -1, d))  # [Hkv, C*B, D]
    kp = kp.view(hkv, c * nk, k_sub, d).mean(2)  # [Hkv, C*nk, D]
    logits = torch.bmm(qp, kp.mT).mul_(scale * temp).view(hkv, group, tq, nq, c, nk)
    logits = logits.logsumexp(-1)  # [Hkv, G, Tq, nq, C]
    not_cand = torch.arange(c)[None, :] >= n_cand[:, None]  # [Tq, C]
    logits.masked_fill_(not_cand[None, None, :, None, :], float("-inf"))
    p = logits.softmax(-1).nan_to_num_(0.0)
    weight = (count > 0).float()  # [Tq, nq]
    p = (p * weight[None, None, :, :, None]).sum(3) / weight.sum(1)[None, None, :, None]
    return p.mean(1)  # [Hkv, Tq, C]


def key_order(how, q, keys, qb, last_scores, n_perm, ss, bs, scale) -> torch.Tensor:
    """perm [Hkv, n_perm] int32 of key order `how` (see --perms) over segments of ss."""
    hkv = keys.shape[0]
    if how == "none":
        return torch.arange(n_perm, dtype=torch.int32).expand(hkv, n_perm).contiguous()
    if how == "last":
        return segment_permutation(last_scores[:, :n_perm].contiguous(), ss)
    m = re.fullmatch(r"spread(\d+)", how)
    if m is None:
        raise ValueError(f"key order {how!r}: last, spreadK or none")
    picked = spaced(list(range(len(qb))), int(m.group(1)))
    total = torch.zeros(hkv, n_perm)
    for b in picked:
        row0, length, pos = int(qb.row[b]), int(qb.length[b]), int(qb.pos[b])
        seen = min(n_perm, pos + length)
        imp = key_importance_torch(q[row0 : row0 + length], keys, pos, seen, scale)
        total[:, :seen] += imp
    return segment_permutation(total, ss)


def sampled_probs(q, keys, perm, n_cand, bs, kb, scale, k: int, chunk: int = 16):
    """Block probabilities [Hkv, Tq, C] from k real queries per query block (rows at
    block-relative indices (i + 1) * B / k - 1, present ones only): each query's exact
    softmax over the candidate keys (permuted order, keys of blocks < n_cand), summed per
    key block of kb, averaged over the sampled queries and the group's heads."""
    n, hq, d = q.shape
    hkv = keys.shape[0]
    group = hq // hkv
    tq = -(-n // bs)
    c = perm.shape[1] // kb
    pk = keys.gather(1, perm.long()[..., None].expand(-1, -1, d))  # [Hkv, C*kb, D]
    p = torch.zeros(hkv, tq, c)
    idx = torch.arange(1, k + 1) * (bs // k) - 1  # block-relative rows
    for t0 in range(0, tq, chunk):
        ts = torch.arange(t0, min(t0 + chunk, tq))
        rows = (ts[:, None] * bs + idx[None, :]).clamp_max(n - 1)  # [t, k]
        qs = q[rows.flatten()].view(len(ts) * k, hkv, group, d).permute(1, 2, 0, 3)
        logits = torch.matmul(qs, pk[:, None].mT) * scale  # [Hkv, G, t*k, C*kb]
        logits = logits.view(hkv, group, len(ts), k, c * kb)
        cand = (torch.arange(c * kb)[None, :] // kb) < n_cand[ts][:, None]  # [t, C*kb]
        logits.masked_fill_(~cand[None, None, :, None, :], float("-inf"))
        probs = logits.softmax(-1).nan_to_num_(0.0).view(hkv, group, len(ts), k, c, kb)
        p[:, ts] = probs.sum(-1).mean(dim=(1, 3))
    return p


def estimator_probs(name, q, keys, perm, n_cand, bs, scale, kb=None):
    """p [Hkv, Tq, C] of estimator `name` (see the module docstring); kb: the key block
    size (default bs), C = candidates in key blocks."""
    kb = kb or bs
    m = re.fullmatch(r"sample(\d+)", name)
    if m:
        return sampled_probs(q, keys, perm, n_cand, bs, kb, scale, int(m.group(1)))
    if name == "mean":
        return block_probs(
            pool_query_blocks_torch(q, 0, bs, 1), pool_key_blocks_torch(keys, perm, kb, 1),
            n_cand, scale,
        )  # fmt: skip
    if name == "antidiag":
        st = 8
        return block_probs(
            pool_query_blocks_torch(q, 0, bs, st), pool_key_blocks_torch(keys, perm, kb, st),
            n_cand, scale,
        )  # fmt: skip
    if kb != bs:
        raise ValueError(f"estimator {name!r} needs --key-block-size equal to --block-size")
    m = re.fullmatch(r"(?:q(\d+))?(?:k(\d+))?(?:t([\d.]+))?", name.replace("sub", ""))
    if m is None or not any(m.groups()):
        raise ValueError(f"estimator {name!r}: mean, antidiag, oracle, qsubQ, ksubK, tempT, qQkK")
    q_sub = int(m.group(1) or bs)
    k_sub = int(m.group(2) or bs)
    temp = float(m.group(3) or 1.0)
    return sub_pooled_probs(q, keys, perm, n_cand, bs, scale, q_sub, k_sub, temp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF folder")
    ap.add_argument("--task", default="niah_multivalue", choices=ruler.TASKS)
    ap.add_argument("--length", default="16k", help="nominal RULER length (answer reserved)")
    ap.add_argument("--index", type=int, default=0, help="prompt index (bench_ruler's order)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="save / reuse the captured q, k, v (.pt)")
    ap.add_argument("--taus", default="0.9,0.95,0.98,0.99")
    ap.add_argument("--estimators", default="mean,ksub32,qsub32,antidiag,oracle")
    ap.add_argument("--block-size", type=int, default=128, help="query block size")
    ap.add_argument(
        "--key-block-size",
        type=int,
        default=None,
        help="key block size (default: the query block size; mean / antidiag / oracle only)",
    )
    ap.add_argument("--segment-sizes", default="512", help="comma-separated segment sizes")
    ap.add_argument(
        "--perms",
        default="last",
        help="key orders: last (serving: importance for the last query block), spreadK "
        "(mean importance for K query blocks spread over the prompt), none (original order)",
    )
    ap.add_argument("--sample-blocks", type=int, default=24)
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    length = ruler.parse_length(args.length)
    taus = [float(t) for t in args.taus.split(",")]
    names = args.estimators.split(",")
    bs = args.block_size
    kb = args.key_block_size or bs
    sample = load_prompt_ids(args.model, args.task, length, args.seed, args.index)
    ids = sample.prompt_token_ids
    layers = cached_capture(args.model, ids, args.cache)
    n = len(ids)
    print(
        f"{args.task} @ {length}: {n} tokens, capture {time.perf_counter() - t0:.0f}s", flush=True
    )
    pick = range(len(layers)) if args.layers is None else [int(x) for x in args.layers.split(",")]

    arms = [(pm, int(sz)) for pm in args.perms.split(",") for sz in args.segment_sizes.split(",")]
    per_layer = []
    for li in pick:
        t_layer = time.perf_counter()
        cap = layers[li]
        q, k, v = cap["q"].float(), cap["k"].float(), cap["v"].float()
        hkv, d = k.shape[1], k.shape[2]
        scale = d**-0.5
        batch = ChunkBatch([n], [0])
        kv = PagedKV.from_contiguous(k, v, [n])
        keys = k.transpose(0, 1).contiguous()  # [Hkv, N, D]
        nq = min(bs, n)
        last_scores = key_importance_torch(q[n - nq :], keys, n - nq, n, scale)  # [Hkv, N]

        # one arm = (permutation, segment size): its geometry, masks per estimator and tau
        geo, selections = {}, {}
        for pm, ss in arms:
            params = SparsityParams(block_size=bs, segment_size=ss, tau=taus[0])
            plan = plan_for(q, kv, batch, params)
            qb = plan.qblocks_host
            n_perm = (n - 1) // ss * ss
            perm = key_order(pm, q, keys, qb, last_scores, n_perm, ss, bs, scale)
            own_start = (qb.pos.long() // ss) * ss
            n_cand = own_start // kb
            last_pos = qb.pos.long() + qb.length.long() - 1
            geo[(pm, ss)] = {
                "perm": perm, "own_start": own_start, "n_cand": n_cand,
                "own": int((last_pos // kb - own_start // kb + 1).sum()),
                "visible": int((last_pos // kb + 1).sum()),
            }  # fmt: skip
            sink = (perm[:, :ss] == 0).to(torch.uint8).argmax(dim=-1) // kb
            for name in names:
                if name == "oracle":
                    for tau in taus:
                        selections[(pm, ss, name, tau)] = None
                    continue
                base_name, _, flag = name.partition("-")
                if flag not in ("", "nosink"):
                    raise ValueError(f"estimator {name!r}: the only suffix is -nosink")
                p = estimator_probs(base_name, q, keys, perm, n_cand, bs, scale, kb)
                p[:, -1] = exact_block_mass(last_scores[:, :n_perm], perm, kb)
                for tau in taus:
                    # -nosink: tau counts the mass of the blocks besides the sink, as the
                    # serving selection does with tau_excludes_sink
                    sel_params = SparsityParams(
                        block_size=bs, segment_size=ss, tau=tau, tau_excludes_sink=flag == "nosink"
                    )
                    selections[(pm, ss, name, tau)] = select_blocks(
                        p.clone(), n_cand, sink, sel_params
                    )
            if (pm, ss, "mean", kb) == ("last", 512, names[0], bs) and li == pick[0]:
                # the serving estimator, as vLLM-CPU runs it, gives the same masks
                ref = build_block_mask_torch(q, kv, batch, params, scale, plan)
                if not torch.equal(ref.kv_num_blocks, selections[(pm, ss, "mean", taus[0])][0]):
                    raise RuntimeError("mean estimator's counts differ from build_block_mask_torch")

        # the same query blocks for every arm: those with candidates under the largest segment
        widest = geo[max(geo, key=lambda a: a[1])]
        blocks = spaced(
            [b for b in range(len(widest["n_cand"])) if int(widest["n_cand"][b]) > 0],
            args.sample_blocks,
        )
        sums = {key: FidelitySums(hkv) for key in selections}
        last = {key: FidelitySums(hkv) for key in selections}
        for b in blocks:
            row0 = int(qb.row[b])
            span = (row0, row0 + int(qb.length[b]))
            dense = dense_rows(q, k, v, span, 0, bs, torch.float32)
            for (pm, ss), g in geo.items():
                own = int(g["own_start"][b])
                rows = replace(dense, own_start=own, n_cand=own // kb)
                parts = block_parts(rows, v, g["perm"], kb)
                for key, sel in selections.items():
                    if key[:2] != (pm, ss):
                        continue
                    tau = key[3]
                    if sel is None:
                        keep = oracle_keep(parts, hkv, oracle_counts(parts, hkv, tau))
                    else:
                        keep = keep_of(sel[0][:, b], sel[1][:, b], rows.n_cand)
                    sums[key].add(rows, parts, keep, kb)
                    if b == blocks[-1]:
                        last[key].add(rows, parts, keep, kb)
        layer_rows = []
        for key, sel in selections.items():
            pm, ss, name, tau = key
            g = geo[(pm, ss)]
            full = None
            if sel is not None:
                full = (float(sel[0].sum()) + hkv * g["own"]) / (hkv * g["visible"])
            s_, l_ = sums[key], last[key]
            layer_rows.append(
                {
                    "layer": li, "perm": pm, "segment_size": ss, "estimator": name, "tau": tau,
                    "density": full, "density_sampled": s_.density, "recall": s_.recall,
                    "rel_error": s_.rel_error, "recall_last": l_.recall,
                    "rel_error_last": l_.rel_error,
                }
            )  # fmt: skip
        per_layer.extend(layer_rows)
        print(
            f"layer {li:2d}: {len(blocks)} blocks, {time.perf_counter() - t_layer:.1f}s", flush=True
        )
        if args.json:
            _write(args, per_layer, sample, n, t0)

    print(summary_table(per_layer))
    print(matched_table(per_layer))
    if args.json:
        _write(args, per_layer, sample, n, t0)
        print(f"json: {args.json}")


def summary_table(rows) -> str:
    """Mean over layers per (key order, segment size, estimator, tau): density (all query
    blocks, sampled ones), recall and output error (means of the layers'), the last
    block's error."""
    out = [
        "| order | segment | estimator | tau | density | density (sampled) | recall "
        "| output error | error, last block |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r.get("perm", "last"), r.get("segment_size", 512), r["estimator"], r["tau"])
        groups.setdefault(key, []).append(r)
    for (pm, ss, name, tau), sel in groups.items():

        def mean(key, sel=sel):
            vals = [r[key] for r in sel if r[key] is not None]
            return sum(vals) / len(vals) if vals else math.nan

        dens = mean("density")
        out.append(
            f"| {pm} | {ss} | {name} | {tau} | {'-' if math.isnan(dens) else f'{dens:.3f}'} | "
            f"{mean('density_sampled'):.3f} | {mean('recall'):.4f} | "
            f"{mean('rel_error'):.4f} | {mean('rel_error_last'):.4f} |"
        )
    return "\n".join(out)


def matched_table(rows, tau: float = 0.99) -> str:
    """Per curve (key order, segment, estimator over its taus): the sampled density at
    which it reaches the output error of the serving arm (last, 512, mean) at `tau`,
    interpolated linearly in log error between its taus (None outside its range)."""
    curves: dict[tuple, dict[float, list[dict]]] = {}
    for r in rows:
        key = (r.get("perm", "last"), r.get("segment_size", 512), r["estimator"])
        curves.setdefault(key, {}).setdefault(r["tau"], []).append(r)

    def point(rs):
        n = len(rs)
        return sum(r["density_sampled"] for r in rs) / n, sum(r["rel_error"] for r in rs) / n

    base = curves.get(("last", 512, "mean"), {}).get(tau)
    if not base:
        return ""
    _, target = point(base)
    out = [
        f"Sampled density at the serving estimator's tau-{tau} output error ({target:.4f}):",
        "",
        "| order | segment | estimator | density |",
        "|---|---:|---|---:|",
    ]
    for key, by_tau in curves.items():
        pts = sorted(point(rs) for rs in by_tau.values())  # by density
        found = None
        for (d0, e0), (d1, e1) in zip(pts, pts[1:]):
            if min(e0, e1) <= target <= max(e0, e1) and e0 > 0 and e1 > 0 and e0 != e1:
                w = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
                found = d0 + w * (d1 - d0)
                break
        out.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {'-' if found is None else f'{found:.3f}'} |"
        )
    return "\n".join(out)


def _write(args, rows, sample, n, t0) -> None:
    meta = {
        "command_args": vars(args),
        "num_tokens": n,
        "answers": sample.answers,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "total_s": time.perf_counter() - t0,
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

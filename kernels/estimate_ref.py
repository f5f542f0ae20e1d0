"""Plain-PyTorch reference of the PBS mask estimation (spec sections 2 and 3).

Materialises every score matrix in float64 and loops over heads and query blocks: small
sizes only. `build_block_mask_ref` returns the same PBSBlockMask as `build_block_mask`.
"""

from __future__ import annotations

import torch

from pbs_vllm.kernels.attention_ref import gather_sequence_kv
from pbs_vllm.kernels.block_mask import PBSBlockMask
from pbs_vllm.kernels.inputs import check_prefill_inputs, permuted_region_lengths
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.plan import PrefillPlan, plan_for
from pbs_vllm.kernels.selection import kept_cap


def key_importance_ref(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    seq: int,
    n_keys: int,
    num_queries: int,
    scale: float,
) -> torch.Tensor:
    """Mean causal softmax probability of keys [0, n_keys) over the last `num_queries`
    queries of sequence `seq` and each KV head's query-head group; [Hkv, n_keys] float64."""
    q0, c, L = batch.cu_seqlens_q[seq], batch.ctx_lens[seq], batch.q_lens[seq]
    nq = min(num_queries, L)
    qs = q[q0 + L - nq : q0 + L].double()  # [nq, Hq, D]
    keys = gather_sequence_kv(kv, seq, c + L)[0].double()  # [c+L, Hkv, D]
    group = q.shape[1] // kv.num_kv_heads
    pos = torch.arange(c + L - nq, c + L, device=q.device)
    visible = torch.arange(c + L, device=q.device)[None, :] <= pos[:, None]
    out = []
    for h in range(kv.num_kv_heads):
        s = torch.einsum("igd,jd->igj", qs[:, h * group : (h + 1) * group], keys[:, h]) * scale
        s = s.masked_fill(~visible[:, None, :], float("-inf"))
        out.append(torch.softmax(s, dim=-1).mean(dim=(0, 1))[:n_keys])
    return torch.stack(out)


def segment_sort_ref(scores: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Inside each segment, positions by descending score, ties by position; [Hkv, n] int32."""
    hkv, n = scores.shape
    perm = torch.empty(hkv, n, dtype=torch.int32)
    for h in range(hkv):
        row = scores[h].tolist()
        for s0 in range(0, n, segment_size):
            seg = sorted(range(s0, s0 + segment_size), key=lambda j: -row[j])
            perm[h, s0 : s0 + segment_size] = torch.tensor(seg, dtype=torch.int32)
    return perm


def block_logit_ref(
    q_blk: torch.Tensor, first_rel: int, k_blks: torch.Tensor, stride: int
) -> torch.Tensor:
    """Pooled score of one query block against candidate key blocks, float64.

    q_blk [n, D]: the block's present queries, the first at block-relative index first_rel;
    k_blks [C, B, D]: candidate blocks of permuted keys. stride 1 is the mean of all q.k;
    otherwise the XAttention antidiagonal sample: pairs (t, u) of block-relative indices
    with t % stride + u % stride == stride - 1, averaged per query class t % stride, then
    over the classes present. Returns [C].
    """
    qk = torch.einsum("td,cud->ctu", q_blk, k_blks)
    t = torch.arange(first_rel, first_rel + q_blk.shape[0], device=qk.device) % stride
    u = torch.arange(k_blks.shape[1], device=qk.device) % stride
    per_class = [
        qk[:, t == cls][:, :, u == stride - 1 - cls].mean(dim=(1, 2)) for cls in t.unique()
    ]
    return torch.stack(per_class).mean(dim=0)


def select_ref(
    p: list[float], sink: int | None, params: SparsityParams, keep_all: bool = False
) -> list[int]:
    """Selected candidate ids (ascending) for one query block and KV head (spec step 5);
    `keep_all`: the block holds one of its chunk's last params.dense_last_tokens queries."""
    if keep_all:
        return list(range(len(p)))
    if sink is not None and params.tau_excludes_sink:
        p = [0.0 if j == sink else x for j, x in enumerate(p)]
        rest = sum(p)
        p = [x / rest for x in p] if rest > 0 else p
    order = sorted(range(len(p)), key=lambda j: -p[j])
    kept, mass = [], 0.0
    for j in order:
        if params.tau < 1.0 and mass >= params.tau:
            break
        kept.append(j)
        mass += p[j]
    cap = len(p)
    if params.max_kept_fraction is not None:
        cap = int(kept_cap(torch.tensor(len(p)), params.max_kept_fraction))
        kept = kept[:cap]
    if sink is not None and sink not in kept:
        kept = kept[: cap - 1] + [sink]
    return sorted(kept)


def build_block_mask_ref(
    q: torch.Tensor, kv: PagedKV, batch: ChunkBatch, params: SparsityParams, scale: float
) -> PBSBlockMask:
    """Reference PBS block mask for q [T, Hq, D] over the paged cache (small sizes only)."""
    group = check_prefill_inputs(q, kv, batch)
    bs, ss, hkv = params.block_size, params.segment_size, kv.num_kv_heads
    stride = params.antidiagonal_stride if params.scoring == "antidiagonal" else 1
    plan = plan_for(q, kv, batch, params)
    qb = plan.qblocks_host
    n_perm = permuted_region_lengths(batch, ss)
    perms = []
    selected = [[[] for _ in range(len(qb))] for _ in range(hkv)]
    for b, n in enumerate(n_perm):
        if n == 0:
            perms.append(torch.empty(hkv, 0, dtype=torch.int32))
            continue
        scores = None
        if params.permute:
            scores = key_importance_ref(q, kv, batch, b, n, bs, scale).cpu()
            perm = segment_sort_ref(scores, ss)
        else:
            perm = torch.arange(n, dtype=torch.int32).repeat(hkv, 1)
        perms.append(perm)
        keys = gather_sequence_kv(kv, b, n)[0].double()
        blocks = (qb.seq == b).nonzero().flatten().tolist()
        for k in blocks:
            row, length, pos = int(qb.row[k]), int(qb.length[k]), int(qb.pos[k])
            n_cand = pos // ss * ss // bs
            if n_cand == 0:
                continue
            exact = params.exact_last_block and scores is not None and k == blocks[-1]
            for h in range(hkv):
                if exact:  # the scoring queries' own attention mass per permuted block
                    mass = torch.stack(
                        [
                            scores[h, perm[h, c * bs : (c + 1) * bs].long()].sum()
                            for c in range(n_cand)
                        ]
                    ).double()
                    p = mass / max(float(mass.sum()), 1e-300)
                else:
                    k_blks = keys[perm[h, : n_cand * bs].long().to(keys.device), h]
                    k_blks = k_blks.view(n_cand, bs, -1)
                    p = torch.zeros(n_cand, dtype=torch.float64)
                    for g in range(group):
                        q_blk = q[row : row + length, h * group + g].double()
                        logits = block_logit_ref(q_blk, pos % bs, k_blks, stride) * scale
                        p += torch.softmax(logits, dim=0).cpu() / group
                sink = int((perm[h, :ss] == 0).nonzero()) // bs if params.keep_sink else None
                last_n = params.dense_last_tokens
                keep_all = last_n > 0 and pos + length > batch.seq_lens[b] - last_n
                selected[h][k] = select_ref(p.tolist(), sink, params, keep_all)
    return _to_mask(plan, perms, selected, q.device)


def _to_mask(
    plan: PrefillPlan,
    perms: list[torch.Tensor],
    selected: list[list[list[int]]],
    device: torch.device,
) -> PBSBlockMask:
    hkv, tq = len(selected), len(plan.qblocks_host)
    width = max([1] + [len(s) for per_head in selected for s in per_head])
    num = torch.zeros(hkv, tq, dtype=torch.int32)
    idx = torch.zeros(hkv, tq, width, dtype=torch.int32)
    for h in range(hkv):
        for k, sel in enumerate(selected[h]):
            num[h, k] = len(sel)
            idx[h, k, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
    offsets = [0]
    for p in perms:
        offsets.append(offsets[-1] + p.shape[1])
    qb, ss = plan.qblocks, plan.segment_size
    return PBSBlockMask(
        plan=plan,
        segment_size=ss,
        own_start=(qb.pos // ss * ss).int(),
        kv_num_blocks=num.to(device),
        kv_indices=idx.to(device),
        perm=torch.cat(perms, dim=1).to(device),
        perm_offset=torch.tensor(offsets[:-1], dtype=torch.int32, device=device),
    )

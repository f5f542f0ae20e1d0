"""Block probabilities and top-p block selection, batched over KV heads and query blocks.

`select_into` is the serving path: one Triton launch per sequence that turns its pooled
logits into the mask's kept-block counts and ids (softmax over the candidates, mean over
the GQA group, the exact last-block row, stable descending sort, tau prefix, cap on the
kept fraction (`max_kept_fraction`), sink, ascending ids). `block_probs` + `select_blocks`
are its plain PyTorch reference over padded [Hkv, Tq, C] tensors, where C is the number of
permuted key blocks of the sequence and query block k's candidates are the first n_cand[k]
of them (the blocks of the segments before its own segment).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pbs_vllm.kernels.params import SparsityParams


def kept_cap(n_cand: torch.Tensor, max_kept_fraction: float) -> torch.Tensor:
    """The most blocks a query block with n_cand candidates keeps under `max_kept_fraction`:
    ceil(max_kept_fraction * n_cand), at least 1; float64 with a rounding guard (0.3 * 10 -> 3).
    """
    return torch.ceil(n_cand.double() * max_kept_fraction - 1e-9).long().clamp_(min=1)


def block_probs(
    q_pool: torch.Tensor, k_pool: torch.Tensor, n_cand: torch.Tensor, scale: float
) -> torch.Tensor:
    """Softmax over each query block's candidates of pooled q.k * scale, mean over the group.

    q_pool [Hq, Tq, E] pooled query blocks, k_pool [Hkv, C, E] pooled permuted key blocks,
    n_cand [Tq] int. Returns p [Hkv, Tq, C] fp32, zero outside the candidates (rows with no
    candidate are all zero).
    """
    hq, tq, e = q_pool.shape
    hkv, c, _ = k_pool.shape
    group = hq // hkv
    q_rows = q_pool.reshape(hkv, group * tq, e)
    logits = torch.bmm(q_rows, k_pool.transpose(1, 2)).view(hkv, group, tq, c)
    not_cand = torch.arange(c, device=n_cand.device)[None, :] >= n_cand[:, None]
    logits.mul_(scale).masked_fill_(not_cand, float("-inf"))
    # in-place softmax: at long contexts logits is the largest tensor of the estimation
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    logits.div_(logits.sum(dim=-1, keepdim=True)).nan_to_num_(0.0)
    return logits.mean(dim=1)


def select_blocks(
    p: torch.Tensor,
    n_cand: torch.Tensor,
    sink_block: torch.Tensor,
    params: SparsityParams,
    dense_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the smallest prefix of candidates by descending p whose mass reaches tau.

    p [Hkv, Tq, C] from `block_probs`, n_cand [Tq], sink_block [Hkv] (permuted block of
    original token 0, forced when params.keep_sink and the row has candidates; with
    params.tau_excludes_sink its p is set to 0 and the row renormalised first). With
    params.max_kept_fraction at most kept_cap(n_cand) blocks are kept, the sink included.
    Rows from `dense_from` on (`SparsityParams.dense_from` of the chunk p holds) keep every
    candidate; None: no such rows. Returns kv_num_blocks [Hkv, Tq] int32 and kv_indices
    [Hkv, Tq, C] int32 (selected ids ascending, then padding C).
    """
    c = p.shape[-1]
    if params.keep_sink and params.tau_excludes_sink and c:
        # tau over the candidates besides the sink (kept anyway): its share out, rows renormalised
        p = p.scatter(-1, sink_block.long().view(-1, 1, 1).expand(-1, p.shape[1], 1), 0.0)
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    vals, order = p.sort(dim=-1, descending=True, stable=True)
    n = n_cand.long()[None, :]
    if params.tau >= 1.0:
        n_keep = n.expand(p.shape[:2])
    else:
        # keep rank i while the mass before it is < tau: 1 + #{j: cumsum[j] < tau}
        below = vals.cumsum_(dim=-1) < params.tau  # in place: vals is not needed after
        n_keep = torch.minimum(below.sum(dim=-1) + 1, n)
    del vals  # the [Hkv, Tq, C] temporaries dominate peak memory at long contexts
    cap = n
    if params.max_kept_fraction is not None:
        cap = kept_cap(n, params.max_kept_fraction)
        n_keep = torch.minimum(n_keep, cap)
    if dense_from is not None and dense_from < p.shape[1]:
        full = torch.arange(p.shape[1], device=p.device) >= dense_from
        n_keep = torch.where(full[None, :], n.expand(p.shape[:2]), n_keep)
    rank = torch.arange(c, device=p.device)
    if params.keep_sink:
        # the sink replaces the last kept block when it falls outside the prefix at the cap
        sink_rank = (order == sink_block.view(-1, 1, 1)).to(torch.uint8).argmax(dim=-1)
        n_keep = torch.where(sink_rank < n_keep, n_keep, torch.minimum(n_keep, cap - 1))
        keep_sorted = (rank < n_keep[..., None]) | (
            (rank == sink_rank[..., None]) & (n > 0)[..., None]
        )
    else:
        keep_sorted = rank < n_keep[..., None]
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    del order, keep_sorted
    ids = torch.where(keep, rank.int(), c).sort(dim=-1).values
    return keep.sum(dim=-1, dtype=torch.int32), ids


# Per-step sizes are not specialised: a new chunk shape never triggers a JIT compile
# (only a new candidate bucket BLOCK_C does). Nor is the alignment of the index pointers,
# which point into per-sequence slices of a step's tensors.
@triton.jit(
    do_not_specialize=[
        "pos_ptr",
        "perm_ptr",
        "num_ptr",
        "idx_ptr",
        "tq",
        "c",
        "width",
        "stride_perm",
        "stride_num",
        "stride_ih",
        "stride_it",
        "tau",
        "max_kept_fraction",
        "dense_from",
    ]
)
def _select_kernel(
    logits_ptr,  # [Hkv, GROUP * Tq, C] fp32: unscaled pooled q.k, rows (group head, block)
    pos_ptr,  # [Tq] int32: absolute position of each query block's first present token
    perm_ptr,  # [Hkv, >= SEG] int32: the sequence's permutation (for the sink)
    exact_ptr,  # [Hkv, C] fp32: exact block mass of the last query block (if EXACT)
    num_ptr,  # [Hkv, Tq] int32 out (rows of this sequence)
    idx_ptr,  # [Hkv, Tq, width] int32 out
    tq,
    c,
    width,
    stride_perm,
    stride_num,
    stride_ih,
    stride_it,
    scale,
    tau,
    max_kept_fraction,
    dense_from,  # query blocks t >= dense_from keep every candidate (dense_last_tokens)
    GROUP: tl.constexpr,
    SEG: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    TAU_ONE: tl.constexpr,
    CAP: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    EXCL_SINK: tl.constexpr,
    EXACT: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    n = tl.load(pos_ptr + t) // SEG * (SEG // BS)
    cand = cols < n
    # block probabilities: softmax over the candidates per group head, mean over the group
    rows = logits_ptr + h * GROUP * tq * c
    p = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in tl.static_range(GROUP):
        x = tl.load(rows + (g * tq + t) * c + cols, mask=cand, other=float("-inf")) * scale
        m = tl.max(x, 0)
        e = tl.where(cand, tl.exp(x - tl.where(m > float("-inf"), m, 0.0)), 0.0)
        s = tl.sum(e, 0)
        p += e / tl.where(s > 0, s, 1.0)
    p = p / GROUP
    if EXACT:
        # normalised here: the permutation kernel writes each block's unnormalised mass
        exact = tl.load(exact_ptr + h * c + cols, mask=cols < c, other=0.0)
        total = tl.sum(exact, 0)
        p = tl.where(t == tq - 1, exact / tl.where(total > 0, total, 1.0), p)
    if KEEP_SINK:
        seg = tl.arange(0, BLOCK_SEG)
        perm0 = tl.load(perm_ptr + h * stride_perm + seg, mask=seg < SEG, other=-1)
        sink = tl.sum(tl.where(perm0 == 0, seg, 0), 0) // BS
        if EXCL_SINK:  # tau over the candidates besides the sink (kept anyway)
            p = tl.where(cols == sink, 0.0, p)
            rest = tl.sum(p, 0)
            p = p / tl.where(rest > 0, rest, 1.0)
    # stable descending sort by p (ties: lower block first): p >= 0, so its fp32 bits order
    # like the values; the low 32 bits carry the reversed column
    key = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) + (BLOCK_C - 1 - cols)
    key = tl.where(cols < c, key, -1)
    key = tl.sort(key, descending=True)
    valid = cols < c
    order = BLOCK_C - 1 - (key & 0xFFFFFFFF).to(tl.int32)
    vals = tl.where(valid, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    if TAU_ONE:
        n_keep = n
    else:
        below = (tl.cumsum(vals, 0) < tau) & valid
        n_keep = tl.minimum(tl.sum(below.to(tl.int32), 0) + 1, n)
    cap = n
    if CAP:
        cap = tl.maximum(tl.ceil(n.to(tl.float64) * max_kept_fraction - 1e-9).to(tl.int32), 1)
        n_keep = tl.minimum(n_keep, cap)
    n_keep = tl.where(t >= dense_from, n, n_keep)
    if KEEP_SINK:
        sink_rank = tl.sum(tl.where((order == sink) & valid, cols, 0), 0)
        n_keep = tl.where(sink_rank < n_keep, n_keep, tl.minimum(n_keep, cap - 1))
        keep = (cols < n_keep) | ((cols == sink_rank) & (n > 0))
    else:
        keep = cols < n_keep
    keep = keep & valid
    tl.store(num_ptr + h * stride_num + t, tl.sum(keep.to(tl.int32), 0))
    ids = tl.sort(tl.where(keep, order, c))
    tl.store(idx_ptr + h * stride_ih + t * stride_it + cols, ids, mask=(cols < width) & valid)


def select_into(
    logits: torch.Tensor,
    pos: torch.Tensor,
    perm: torch.Tensor,
    exact: torch.Tensor | None,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    params: SparsityParams,
    scale: float,
    dense_from: int | None = None,
) -> None:
    """Fused `block_probs` + `select_blocks` of one sequence, written into the mask.

    logits [Hkv, G * Tq, C] fp32 contiguous (unscaled pooled q.k of the sequence's query
    blocks, group head major), pos [Tq] int32 (their first present positions: candidates
    n_cand = pos // S * S / B), perm [Hkv, >= S] int32 (the sink is the permuted block of
    original token 0), exact [Hkv, C] or None (the last query block's row of p, up to a
    positive factor per head: it is normalised to sum 1 here).
    kv_num_blocks [Hkv, Tq] and kv_indices [Hkv, Tq, W] (unit inner strides) receive the
    counts and the first min(W, C) ascending ids (padding C) as `select_blocks` gives them
    (query blocks from `dense_from` on keep every candidate; None: none do).
    """
    hkv, rows, c = logits.shape
    tq = pos.numel()
    if rows % max(tq, 1) or not logits.is_contiguous():
        raise ValueError(f"logits must be contiguous [Hkv, G * {tq}, C], got {tuple(logits.shape)}")
    if tq == 0:
        return
    bs, ss = params.block_size, params.segment_size
    _select_kernel[(tq, hkv)](
        logits,
        pos,
        perm,
        exact if exact is not None else logits,
        kv_num_blocks,
        kv_indices,
        tq,
        c,
        kv_indices.shape[-1],
        perm.stride(0),
        kv_num_blocks.stride(0),
        kv_indices.stride(0),
        kv_indices.stride(1),
        scale,
        params.tau,
        params.max_kept_fraction or 1.0,
        tq if dense_from is None else dense_from,
        GROUP=rows // tq,
        SEG=ss,
        BS=bs,
        BLOCK_C=max(16, triton.next_power_of_2(c)),
        BLOCK_SEG=triton.next_power_of_2(ss),
        TAU_ONE=params.tau >= 1.0,
        CAP=params.max_kept_fraction is not None,
        KEEP_SINK=params.keep_sink,
        EXCL_SINK=params.keep_sink and params.tau_excludes_sink,
        EXACT=exact is not None,
    )

"""PBS estimation and block-sparse attention as vectorized PyTorch, for CPU tensors.

`build_block_mask_torch` and `pbs_attention_torch` have the signatures and the results of
`build_block_mask` (estimate.py) and `pbs_attention` (attention.py): the same masks (perm,
kept-block counts and ids) and the same attention output within fp32 rounding. On the
CPU they replace the Triton kernels, which there run only in the Triton interpreter
(minutes per layer at a few thousand tokens); `build_block_mask` and `pbs_attention`
dispatch here by `use_torch_kernels` (tensors on the CPU, `PBS_VLLM_CPU_KERNELS` unset or
"torch"; "triton" keeps the Triton kernels, e.g. to test them in the interpreter).

No Python loop runs over blocks or heads. Per sequence of the batch:
  estimation  exact key importance of the last query block (two-pass LSE over key chunks
              when the score matrix would be large), a stable sort per segment, pooled
              query / permuted key blocks (mean or antidiagonal classes) as tensor means,
              then the PyTorch reference selection (`block_probs`, `select_blocks`) with
              the exact last row (`exact_block_mass`);
  attention   the sequence's K/V gathered once from its pages (fp32, [Hkv, N, D]); each
              query block against its own block, causally, as one flash-attention call
              over all blocks; then, in groups of query blocks, the whole key blocks
              before it (its selected permuted blocks and the earlier blocks of its own
              segment) gathered into a padded [blocks, max_blocks * B] batch with a key
              mask, one flash-attention call per group; the two parts merged by their
              log-sum-exps. Dense masks: one call over the prefix, one causal call over
              the chunk. Big temporaries live in per-thread scratch buffers.
Attention runs in fp32 (`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`,
fused and tiled, returns the log-sum-exp). This module must not import vllm.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import torch

from pbs_vllm.kernels.block_mask import PBSBlockMask
from pbs_vllm.kernels.estimate import exact_block_mass, segment_permutation
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.plan import PrefillPlan
from pbs_vllm.kernels.selection import block_probs, select_blocks

KERNELS_ENV = "PBS_VLLM_CPU_KERNELS"
CHOICES = ("torch", "triton")
# Bytes one gathered or score tensor may take before work is split into groups.
_BUDGET = 64 << 20

# Under vLLM's "vllm" logger, so its handler prints the line (no vllm import needed).
logger = logging.getLogger("vllm.pbs_vllm.kernels.cpu")
_logged: set[str] = set()


def cpu_kernels() -> str:
    """The kernels CPU tensors run on: $PBS_VLLM_CPU_KERNELS, "torch" (default) or "triton"."""
    choice = os.environ.get(KERNELS_ENV, "").strip().lower() or "torch"
    if choice not in CHOICES:
        raise ValueError(f"{KERNELS_ENV}={choice!r}: must be one of {', '.join(CHOICES)}")
    return choice


def use_torch_kernels(t: torch.Tensor) -> bool:
    """Whether PBS work on `t`'s device runs here: CPU tensors unless
    PBS_VLLM_CPU_KERNELS=triton. Logs the choice once per process and choice."""
    if t.device.type != "cpu":
        return False
    choice = cpu_kernels()
    if choice not in _logged:
        _logged.add(choice)
        how = (
            "vectorized PyTorch (pbs_vllm.kernels.cpu)"
            if choice == "torch"
            else "the Triton kernels (interpreted on the CPU)"
        )
        logger.info("PBS kernels on CPU tensors: %s; %s=%s", how, KERNELS_ENV, choice)
    return choice == "torch"


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# Per-thread scratch buffers, reused from layer to layer: fresh tensors of tens of MiB per
# layer cost more in page faults than the copies that fill them.
_scratch_local = threading.local()


def _scratch(tag: str, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """An uninitialised [shape] tensor of this thread's buffer `tag` (grown on demand).
    Valid until the next request of the same tag: never hand one out of this module."""
    pool = getattr(_scratch_local, "pool", None)
    if pool is None:
        pool = _scratch_local.pool = {}
    n = math.prod(shape)
    key = (tag, torch.is_inference_mode_enabled())  # inference tensors stay in there
    buf = pool.get(key)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
        buf = pool[key] = torch.empty(max(n, 1), dtype=dtype, device=device)
    return buf[:n].view(shape)


def _attend(q, k, v, scale, causal=False, key_mask=None):
    """Flash attention [batch, heads, rows, D] fp32 -> (out, lse [batch, heads, rows]).

    causal: row i sees keys <= i (square, top-left); key_mask: float [batch, 1, 1, keys],
    0 or -inf. Rows that see no key come out as 0 with an undefined lse: callers drop them.
    """
    out, lse = _flash(q, k, v, 0.0, causal, attn_mask=key_mask, scale=scale)
    return out, lse


def _merge_into(o1, l1, o2, l2) -> None:
    """o1, l1 <- the softmax merge of two partial attentions over disjoint key sets
    (o [..., D], lse [...] in natural log)."""
    m = torch.maximum(l1, l2)
    w1, w2 = (l1 - m).exp_(), (l2 - m).exp_()
    total = w1 + w2
    o1.mul_((w1 / total)[..., None]).add_(o2 * (w2 / total)[..., None])
    torch.add(m, total.log_(), out=l1)


def sequence_kv(
    kv: PagedKV, seq: int, n: int, scratch: bool = False, values: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys and values [0, n) of sequence `seq` as fp32 [Hkv, n, D] (rows contiguous), one
    gather of whole pages per cache; with scratch, in this module's scratch buffers;
    without values, (keys, None)."""
    ps = kv.page_size
    n_pages = -(-n // ps)
    pages = kv.block_table[seq, :n_pages].long()
    hkv, d = kv.num_kv_heads, kv.head_dim
    out = []
    for tag, cache in (("k", kv.key_cache), ("v", kv.value_cache if values else None)):
        if cache is None:
            out.append(None)
            continue
        shape = (hkv, n_pages, ps, d)
        buf = _scratch(tag, shape, device=cache.device) if scratch else None
        # Advanced indexing reads only the sequence's pages of the strided view (index_select
        # would first copy the whole cache into a contiguous tensor).
        src = cache.permute(2, 0, 1, 3)
        if buf is not None and cache.dtype == torch.float32:
            torch.ops.aten.index.Tensor_out(src, [None, pages], out=buf)
        elif buf is not None:
            buf.copy_(src[:, pages])
        else:
            buf = src[:, pages].to(torch.float32)
        out.append(buf.view(hkv, n_pages * ps, d)[:, :n])
    return out[0], out[1]


def _rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None):
    """x [H, N, D] (rows contiguous, any stride between heads) at index [H, M] along
    dim 1 -> [H, M, D] (whole rows copied; into `out` if given)."""
    h, n, d = x.shape
    flat = (index.long() + torch.arange(h, device=x.device)[:, None] * x.stride(0) // d).view(-1)
    base = x.as_strided((x.stride(0) * (h - 1) // d + n, d), (d, 1))
    if out is None:
        return base.index_select(0, flat).view(h, -1, d)
    return torch.index_select(base, 0, flat, out=out.view(-1, d)).view(h, -1, d)


# ------------------------------------------------------------------------------ estimation


def key_importance_torch(
    q_last: torch.Tensor, keys: torch.Tensor, q_pos: int, n_keys: int, scale: float
) -> torch.Tensor:
    """`importance.key_importance` on gathered keys: q_last [nq, Hq, D] at positions
    [q_pos, q_pos + nq), keys [Hkv, >= q_pos + nq, D] fp32. Returns [Hkv, n_keys] fp32,
    the mean over (query, group head) rows of the causal softmax of q.k * scale."""
    nq, hq, d = q_last.shape
    hkv = keys.shape[0]
    group = hq // hkv
    n_vis = q_pos + nq
    rows = q_last.to(torch.float32).view(nq, hkv, group, d).permute(1, 0, 2, 3)
    rows = rows.reshape(hkv, nq * group, d)
    pos = torch.arange(q_pos, n_vis, device=keys.device).repeat_interleave(group)
    step = max(256, _BUDGET // (4 * hkv * nq * group))

    def scores(k0, k1):
        s = torch.bmm(rows, keys[:, k0:k1].mT).mul_(scale)
        hidden = torch.arange(k0, k1, device=keys.device)[None, :] > pos[:, None]
        return s.masked_fill_(hidden, float("-inf"))

    if n_vis <= step:
        return torch.softmax(scores(0, n_vis), dim=-1)[..., :n_keys].mean(dim=1)
    lse = torch.stack(
        [scores(k0, min(k0 + step, n_vis)).logsumexp(-1) for k0 in range(0, n_vis, step)]
    ).logsumexp(0)
    out = torch.empty(hkv, n_keys, dtype=torch.float32, device=keys.device)
    for k0 in range(0, n_keys, step):
        k1 = min(k0 + step, n_keys)
        out[:, k0:k1] = (scores(k0, k1) - lse[..., None]).exp_().mean(dim=1)
    return out


def pool_query_blocks_torch(
    qs: torch.Tensor, ctx: int, block_size: int, stride: int
) -> torch.Tensor:
    """`block_pool.pool_query_blocks` of one sequence's chunk qs [L, Hq, D] at positions
    [ctx, ctx + L) -> [Hq, blocks, stride*D] fp32: per class t % stride of block-relative
    indices, the mean of the block's present queries, divided by the classes present."""
    n_q, hq, d = qs.shape
    bs = block_size
    lo = ctx % bs
    n_blocks = -(-(lo + n_q) // bs)
    padded = _scratch("q_pool", (n_blocks * bs, hq, d), device=qs.device)
    padded[:lo].zero_()
    padded[lo + n_q :].zero_()
    padded[lo : lo + n_q].copy_(qs)
    sums = padded.view(n_blocks, bs // stride, stride, hq, d).sum(dim=1)  # [blocks, s, Hq, D]
    t = torch.arange(n_blocks * bs, device=qs.device)
    present = ((t >= lo) & (t < lo + n_q)).view(n_blocks, bs // stride, stride)
    count = present.sum(dim=1).float()  # [blocks, stride]
    n_classes = (count > 0).sum(dim=1, keepdim=True).float()
    pooled = sums.div_((count.clamp(min=1.0) * n_classes)[..., None, None])
    return pooled.permute(2, 0, 1, 3).reshape(hq, n_blocks, stride * d)


def pool_key_blocks_torch(
    keys: torch.Tensor, perm: torch.Tensor, block_size: int, stride: int
) -> torch.Tensor:
    """`block_pool.pool_key_blocks` on gathered keys [Hkv, >= n, D] fp32 and perm [Hkv, n]:
    [Hkv, n / B, stride*D] fp32 (chunk i: the mean of the block's keys of class
    u % stride == stride - 1 - i)."""
    hkv, n = perm.shape
    d = keys.shape[-1]
    x = _rows(keys, perm)
    pooled = x.view(hkv, n // block_size, block_size // stride, stride, d).mean(dim=2)
    return pooled.flip(2).reshape(hkv, n // block_size, stride * d)


def build_block_mask_torch(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    scale: float,
    plan: PrefillPlan | None = None,
) -> PBSBlockMask:
    """`build_block_mask` in PyTorch (same arguments, same mask)."""
    from pbs_vllm.kernels.estimate import estimation_plan

    plan = estimation_plan(q, kv, batch, params, plan)
    bs, ss, hkv, dev = params.block_size, params.segment_size, kv.num_kv_heads, q.device
    stride = params.antidiagonal_stride if params.scoring == "antidiagonal" else 1
    qb, blocks = plan.qblocks, plan.blocks_per_seq
    n_perm, offsets, width = plan.estimate.n_perm, plan.estimate.offsets, plan.estimate.width

    i32 = dict(dtype=torch.int32, device=dev)
    perm = torch.empty(hkv, offsets[-1], **i32)
    kv_num_blocks = torch.zeros(hkv, len(qb), **i32)
    kv_indices = torch.zeros(hkv, len(qb), width, **i32)
    exact_last = params.exact_last_block and params.permute
    k0 = 0
    for b, n in enumerate(n_perm):
        k1 = k0 + blocks[b]
        if n:
            keys = sequence_kv(kv, b, batch.seq_lens[b], scratch=True, values=False)[0]
            scores = None
            if params.permute:
                q_end, nq = batch.cu_seqlens_q[b + 1], min(bs, batch.q_lens[b])
                q_pos = batch.seq_lens[b] - nq
                scores = key_importance_torch(q[q_end - nq : q_end], keys, q_pos, n, scale)
                perm_b = segment_permutation(scores, ss)
            else:
                perm_b = torch.arange(n, **i32).expand(hkv, n)
            perm[:, offsets[b] : offsets[b] + n] = perm_b
            k_pool = pool_key_blocks_torch(keys, perm_b, bs, stride)
            del keys
            n_cand = qb.pos[k0:k1].long() // ss * ss // bs
            rows = q[batch.cu_seqlens_q[b] : batch.cu_seqlens_q[b + 1]]
            q_pool = pool_query_blocks_torch(rows, batch.ctx_lens[b], bs, stride)
            p = block_probs(q_pool, k_pool, n_cand, scale)
            if exact_last:
                p[:, -1] = exact_block_mass(scores, perm_b, bs)
            sink = (perm_b[:, :ss] == 0).to(torch.uint8).argmax(dim=-1) // bs
            dense_from = params.dense_from(batch.ctx_lens[b], batch.seq_lens[b])
            num, ids = select_blocks(p, n_cand, sink, params, dense_from)
            kv_num_blocks[:, k0:k1] = num
            w = min(width, ids.shape[-1])
            kv_indices[:, k0:k1, :w] = ids[..., :w]
        k0 = k1
    return PBSBlockMask(
        plan=plan,
        segment_size=ss,
        own_start=plan.estimate.own_start,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        perm=perm,
        perm_offset=plan.estimate.perm_offset,
    )


# ------------------------------------------------------------------------------- attention


def _to_tokens(x: torch.Tensor, hkv: int, lead: int, out: torch.Tensor) -> torch.Tensor:
    """[hkv * lead, group, rows, ...] (rows of `lead` batches) -> out [lead * rows, Hq, ...]."""
    x = x.reshape(hkv, lead, *x.shape[1:])  # [hkv, lead, group, rows, ...]
    x = x.movedim(3, 2).movedim(0, 2)  # [lead, rows, hkv, group, ...]
    out.view(x.shape).copy_(x)
    return out


def _dense_sequence(qs, keys, values, ctx, scale, out, lse):
    """Causal attention of qs [L, Hq, D] fp32 at positions [ctx, ctx + L) over keys and
    values [Hkv, ctx + L, D], into out [L, Hq, D] fp32 and lse [L, Hq]."""
    n_q, hq, d = qs.shape
    hkv = keys.shape[0]
    g = hq // hkv
    qh = qs.view(n_q, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, L, D]

    def part(k0, k1, causal, o, lse_o):
        k = keys[:, None, k0:k1].expand(hkv, g, k1 - k0, d)
        v = values[:, None, k0:k1].expand(hkv, g, k1 - k0, d)
        o_h, lse_h = _attend(qh, k, v, scale, causal=causal)
        return _to_tokens(o_h, hkv, 1, o), _to_tokens(lse_h, hkv, 1, lse_o)

    part(ctx, ctx + n_q, True, out, lse)
    if ctx:
        _merge_into(out, lse, *part(0, ctx, False, torch.empty_like(out), torch.empty_like(lse)))


def _copy_into_blocks(dst: torch.Tensor, src: torch.Tensor, lo: int) -> None:
    """dst [blocks, B, ...] <- src [L, ...] at flat rows [lo, lo + L), zeros elsewhere
    (at most three copies: a partial first block, whole blocks, a partial last block)."""
    bs, n = dst.shape[1], src.shape[0]
    if lo:
        dst[0, :lo].zero_()
    end = (lo + n) % bs
    if end:
        dst[-1, end:].zero_()
    head = min(n, bs - lo) if lo else 0
    if head:
        dst[0, lo : lo + head].copy_(src[:head])
    first = 1 if lo else 0
    whole = (n - head) // bs
    if whole:
        dst[first : first + whole].copy_(src[head : head + whole * bs].unflatten(0, (whole, bs)))
    rest = n - head - whole * bs
    if rest:
        dst[first + whole, :rest].copy_(src[n - rest :])


def _sparse_sequence(qs, keys, values, mask, seq, k0, k1, scale, out, lse):
    """PBS attention of one sequence's queries qs [L, Hq, D] fp32 (query blocks k0..k1 of
    `mask`) over its keys and values [Hkv, N, D]. out [R, Hq, D] fp32 and lse [R, Hq]
    receive the rows of the query blocks padded to whole blocks (R = blocks * B); returns
    the row of the first query in them."""
    n_q, hq, d = qs.shape
    hkv, n_keys = keys.shape[0], keys.shape[1]
    g = hq // hkv
    bs, ss = mask.block_size, mask.segment_size
    ctx = n_keys - n_q
    blk0, n_blocks = ctx // bs, k1 - k0  # first query block (absolute), blocks
    span = n_blocks * bs  # rows [blk0 * B, blk0 * B + span) of queries and keys
    lo = ctx - blk0 * bs

    # Queries by blocks, [Hkv, blocks, G, B, D], zero outside the chunk.
    qb = _scratch("q_blk", (hkv, n_blocks, g, bs, d))
    _copy_into_blocks(qb.permute(1, 3, 0, 2, 4), qs.view(n_q, hkv, g, d), lo)

    # The diagonal: each query block against its own block, causally.
    kv_diag = []
    for tag, x in (("k_diag", keys), ("v_diag", values)):
        buf = _scratch(tag, (hkv, span, d))
        buf[:, : n_keys - blk0 * bs].copy_(x[:, blk0 * bs :])
        buf[:, n_keys - blk0 * bs :].zero_()
        kv_diag.append(buf.view(hkv * n_blocks, 1, bs, d).expand(-1, g, -1, -1))
    o_d, l_d = _attend(qb.view(hkv * n_blocks, g, bs, d), *kv_diag, scale, causal=True)
    _to_tokens(o_d, hkv, n_blocks, out)
    _to_tokens(l_d, hkv, n_blocks, lse)
    del o_d, l_d, kv_diag

    # Whole key blocks before the diagonal: the selected permuted blocks, then the query
    # block's own segment up to its block, gathered per query block from one table of
    # B * D rows: [Hkv, permuted blocks] then [Hkv, original blocks].
    first, n_slots = mask._perm_slots(seq)
    n_kb = n_slots // bs
    n_orig = max(blk0 + n_blocks - 1, 0)  # whole original blocks before the last diagonal
    table = _scratch("kv_table", (2, hkv * (n_kb + n_orig), bs * d))
    for t, x in enumerate((keys, values)):
        if n_kb:
            perm = mask.perm[:, first : first + n_slots]
            _rows(x, perm, table[t, : hkv * n_kb])
        table[t, hkv * n_kb :].view(hkv, n_orig * bs, d).copy_(x[:, : n_orig * bs])
    num = mask.kv_num_blocks[:, k0:k1].long()  # [Hkv, blocks]
    idx = mask.kv_indices[:, k0:k1].long()
    absolute = torch.arange(blk0, blk0 + n_blocks, device=keys.device)
    own0 = absolute * bs // ss * ss // bs  # first block of each query block's segment
    total = num + (absolute - own0)  # key blocks before the diagonal
    head = torch.arange(hkv, device=keys.device)[:, None, None]
    most = int(total.max()) if total.numel() else 0
    group = max(1, _BUDGET // (4 * hkv * bs * d * (2 * max(most, 1) + g)))
    for a in range(0, n_blocks if most else 0, group):
        z = min(a + group, n_blocks)
        nb, tot = num[:, a:z], total[:, a:z]
        ms = int(tot.max())
        if ms == 0:
            continue
        rows = hkv * (z - a)
        cols = torch.arange(ms, device=keys.device)
        picked = idx[:, a:z].gather(2, cols.clamp(max=idx.shape[-1] - 1).expand(hkv, z - a, ms))
        own = hkv * n_kb + head * n_orig + own0[a:z, None] + cols - nb[..., None]
        sel = torch.where(cols < nb[..., None], head * n_kb + picked, own)
        ok = cols < tot[..., None]
        sel = torch.where(ok, sel, 0).view(-1)
        kg, vg = (
            torch.index_select(table[t], 0, sel, out=_scratch(tag, (sel.numel(), bs * d)))
            for t, tag in ((0, "k_sel"), (1, "v_sel"))
        )
        key_mask = _scratch("key_mask", (rows, 1, 1, ms * bs)).zero_()
        hidden = ~ok.repeat_interleave(bs, dim=-1).view(rows, 1, 1, -1)
        key_mask.masked_fill_(hidden, float("-inf"))
        o2, l2 = _attend(
            qb[:, a:z].reshape(rows, 1, g * bs, d),
            kg.view(rows, 1, ms * bs, d),
            vg.view(rows, 1, ms * bs, d),
            scale,
            key_mask=key_mask,
        )
        # [hkv * blocks, 1, g * bs, ...] -> [blocks * bs, Hq, ...]
        o2 = o2.view(hkv, z - a, g, bs, d).permute(1, 3, 0, 2, 4).reshape(-1, hq, d)
        l2 = l2.view(hkv, z - a, g, bs).permute(1, 3, 0, 2).reshape(-1, hq)
        none = (tot == 0).T.repeat_interleave(g, dim=1).repeat_interleave(bs, dim=0)
        l2.masked_fill_(none, float("-inf"))
        _merge_into(out[a * bs : z * bs], lse[a * bs : z * bs], o2, l2)
    return lo


def pbs_attention_torch(
    q: torch.Tensor,
    kv: PagedKV,
    mask: PBSBlockMask,
    scale: float,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`pbs_attention` in PyTorch (same arguments and results)."""
    from pbs_vllm.kernels.attention import _check_inputs

    _check_inputs(q, kv, mask, out)
    t, hq, d = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse_all = torch.empty(hq, t, dtype=torch.float32, device=q.device) if return_lse else None
    batch = mask.batch
    starts = batch.cu_seqlens_q
    blocks = mask.plan.blocks_per_seq
    k0 = 0
    for b, n_keys in enumerate(batch.seq_lens):
        k1 = k0 + int(blocks[b])
        n_q, ctx, ss = batch.q_lens[b], batch.ctx_lens[b], mask.segment_size
        keys, values = sequence_kv(kv, b, n_keys, scratch=True)
        qs = q[starts[b] : starts[b + 1]].to(torch.float32)
        rows = int(blocks[b]) * mask.block_size if ss else n_q
        o = _scratch("out", (rows, hq, d), device=q.device)
        lse = _scratch("lse", (rows, hq), device=q.device)
        if ss:
            lo = _sparse_sequence(qs, keys, values, mask, b, k0, k1, scale, o, lse)
        else:
            lo = 0
            _dense_sequence(qs, keys, values, ctx, scale, o, lse)
        out[starts[b] : starts[b + 1]] = o[lo : lo + n_q]
        if lse_all is not None:
            lse_all[:, starts[b] : starts[b + 1]] = lse[lo : lo + n_q].T
        k0 = k1
    return (out, lse_all) if return_lse else out

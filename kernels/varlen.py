"""PBS attention through a paged varlen flash-attention kernel (FA3 on Hopper).

`varlen_fn` is any function with the keyword interface of FlashAttention's
`flash_attn_varlen_func` for a paged cache (`block_table`, `seqused_k`, bottom-right
causal masking; vLLM ships FA3 as `vllm.vllm_flash_attn.flash_attn_varlen_func`). It
attends any list of K/V pages per sequence, so PBS becomes one call per KV head over a
block-ordered scratch copy of that head's keys (the cache itself stays in original order):

  scratch of KV head h: K and V [n_pages, B, 1, D] each, pages of B keys
    [0, P/B)         the permuted regions: permuted block j of sequence b at page
                     perm_offset[b] / B + j (keys in perm order, from the row table)
    [P/B, n_pages)   each sequence's tail in original order, keys [tail_start_b, seq_len_b)
                     with tail_start_b the segment start of its first query (the last
                     page padded with the sequence's last key: finite, never attended)
  one varlen sequence per query block qb (L queries at positions pos0..pos0+L-1), with
    queries   q[rows of qb, h*G:(h+1)*G] (a strided view: no copy of q or out)
    pages     its selected permuted blocks, then the tail pages of its own region
    keys      seqused_k = n_sel * B + (pos0 + L - own_start)
    causal    bottom-right aligned, so query i sees every selected block and the own keys
              [own_start, pos0 + i]: exactly the mask's keys, in one call, no merge.

A mask without permuted blocks (the dense mask) needs no scratch: one call over the
paged cache itself. What the route derives from the batch alone (scratch page layout,
cu_seqlens, tail slots and their cache rows) is the mask's plan's `VarlenPlan`
(`pbs_vllm.kernels.plan`), built once per step. Per layer and KV-head group: one page-table launch, one gather
launch, then one varlen call per KV head. The scratch of a head group stays under
`SCRATCH_BUDGET_BYTES` (heads are gathered in groups when all of them would not fit).

CPU tensors take PyTorch versions of the two launches (with `varlen_attention_ref` as
`varlen_fn`, the whole path runs on the CPU for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from pbs_vllm.kernels.attention import _checked_outputs, _row_table
from pbs_vllm.kernels.block_mask import PBSBlockMask
from pbs_vllm.kernels.cpu import use_torch_kernels
from pbs_vllm.kernels.paged import PagedKV, cache_offsets, refuse_cache_offset
from pbs_vllm.kernels.plan import VarlenPlan

VarlenFn = Callable[..., object]

SCRATCH_BUDGET_BYTES = 256 << 20


def varlen_plan(mask: PBSBlockMask) -> VarlenPlan:
    """The varlen plan of `mask`'s batch and block geometry (`PrefillPlan.varlen`)."""
    plan = mask.plan.varlen
    if plan is None:
        raise ValueError(
            f"the mask's plan has no varlen plan (built with attention="
            f"{mask.plan.attention!r}, dense={mask.plan.dense}): the FA3 route needs one "
            "built with attention='fa3' or None and dense=False"
        )
    if plan.perm_pages * mask.block_size != mask.perm.shape[1]:
        raise ValueError(
            f"mask holds {mask.perm.shape[1]} permuted slots, its batch's permuted "
            f"regions {plan.perm_pages * mask.block_size}"
        )
    return plan


# --------------------------------------------------------------------------- launches


# Columns per loop step of `_page_table_kernel`: one value for every width, so a short
# prompt compiles no variant of its own while serving (a width-derived tile did: served on
# an H100, 2026-12-07, a 1497-token prefill waited for 4 variants the warm-up had not made).
_PAGE_TABLE_W = 128


# Neither sizes nor the alignment of the index pointers (rows of the step's plan and
# per-sequence slices) are specialised: no compile per new prompt length.
@triton.jit(do_not_specialize=["kv_num_ptr", "kv_idx_ptr", "perm_page_ptr", "own_page_ptr",
                               "own_len_ptr", "width", "stride_th", "stride_tq", "stride_nh",
                               "stride_ih", "stride_iq", "stride_uh"])  # fmt: skip
def _page_table_kernel(
    table_ptr, seqused_ptr, kv_num_ptr, kv_idx_ptr, perm_page_ptr, own_page_ptr, own_len_ptr,
    width, stride_th, stride_tq, stride_nh, stride_ih, stride_iq, stride_uh,
    BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Row (KV head h, query block qb) of the page table: the selected permuted blocks'
    scratch pages, then the own region's tail pages, then zeros; and its key count."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(kv_num_ptr + h * stride_nh + qb)
    own_len = tl.load(own_len_ptr + qb)
    own_pages = (own_len + BLOCK_B - 1) // BLOCK_B
    base = tl.load(perm_page_ptr + qb)
    own0 = tl.load(own_page_ptr + qb)
    idx_row = kv_idx_ptr + h * stride_ih + qb.to(tl.int64) * stride_iq
    out_row = table_ptr + h * stride_th + qb.to(tl.int64) * stride_tq
    for j0 in range(0, width, BLOCK_W):
        j = j0 + tl.arange(0, BLOCK_W)
        sel = tl.load(idx_row + j, mask=j < n, other=0) + base
        val = tl.where(j < n, sel, tl.where(j < n + own_pages, own0 + j - n, 0))
        tl.store(out_row + j, val, mask=j < width)
    tl.store(seqused_ptr + h * stride_uh + qb, n * BLOCK_B + own_len)


@triton.jit(do_not_specialize=["n_perm", "n_slots", "h0", "stride_rh", "stride_sh"])
def _gather_kernel(
    k_ptr, v_ptr, off_ptr, ks_ptr, vs_ptr, rows_ptr, tail_ptr, n_perm, n_slots, h0,
    stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
    stride_rh, stride_sh,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Scratch slots [pid * BLOCK, +BLOCK) of KV head h0 + program_id(1): permuted slots
    (< n_perm) from the row table, tail slots from the tail rows."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    h = h0 + g
    k_ptr += tl.load(off_ptr)  # PagedKV.cache_offset
    v_ptr += tl.load(off_ptr + 1)
    slots = pid * BLOCK + tl.arange(0, BLOCK)
    ok = slots < n_slots
    in_perm = slots < n_perm
    r_perm = tl.load(rows_ptr + h.to(tl.int64) * stride_rh + slots, mask=ok & in_perm, other=0)
    r_tail = tl.load(tail_ptr + (slots - n_perm), mask=ok & (slots >= n_perm), other=0)
    row = tl.where(in_perm, r_perm, r_tail).to(tl.int64)
    page, slot = row // PAGE_SIZE, row % PAGE_SIZE
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(
        k_ptr
        + (page * stride_kp + slot * stride_ks + h * stride_kh)[:, None]
        + offs_d[None, :] * stride_kd,
        mask=ok[:, None],
    )
    v = tl.load(
        v_ptr
        + (page * stride_vp + slot * stride_vs + h * stride_vh)[:, None]
        + offs_d[None, :] * stride_vd,
        mask=ok[:, None],
    )
    dst = g.to(tl.int64) * stride_sh + slots.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(ks_ptr + dst, k, mask=ok[:, None])
    tl.store(vs_ptr + dst, v, mask=ok[:, None])


def page_tables(mask: PBSBlockMask, plan: VarlenPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(table [Hkv, Tq, W] int32, seqused_k [Hkv, Tq] int32) on the mask's device, W the
    widest selection plus the most own pages (entries past a row's pages are zero)."""
    hkv, tq, max_sel = mask.kv_indices.shape
    bs, dev = mask.block_size, mask.own_start.device
    width = max_sel + plan.max_own_pages
    kv_num, kv_idx = (x.contiguous() for x in (mask.kv_num_blocks, mask.kv_indices))
    if use_torch_kernels(kv_num):
        return _page_tables_torch(kv_num, kv_idx, plan, bs, width)
    table = torch.empty(hkv, tq, width, dtype=torch.int32, device=dev)
    seqused = torch.empty(hkv, tq, dtype=torch.int32, device=dev)
    _page_table_kernel[(tq, hkv)](
        table, seqused, kv_num, kv_idx, plan.perm_page, plan.own_page, plan.own_len,
        width, table.stride(0), table.stride(1), kv_num.stride(0), kv_idx.stride(0),
        kv_idx.stride(1), seqused.stride(0),
        BLOCK_B=bs, BLOCK_W=_PAGE_TABLE_W,
    )  # fmt: skip
    return table, seqused


def _page_tables_torch(kv_num, kv_idx, plan: VarlenPlan, bs: int, width: int):
    """`page_tables` in PyTorch (CPU tensors)."""
    n = kv_num.long()[..., None]  # [Hkv, Tq, 1]
    j = torch.arange(width, device=kv_num.device)
    idx = torch.zeros(*kv_idx.shape[:2], width, dtype=torch.long, device=kv_num.device)
    idx[..., : kv_idx.shape[2]] = kv_idx.long()
    sel = torch.where(j < n, idx, 0) + plan.perm_page.long()[:, None]
    own_pages = (plan.own_len.long() + bs - 1) // bs
    own = plan.own_page.long()[:, None] + j - n
    table = torch.where(j < n, sel, torch.where(j < n + own_pages[:, None], own, 0))
    seqused = kv_num.long() * bs + plan.own_len.long()
    return table.to(torch.int32), seqused.to(torch.int32)


def gather_scratch(
    kv: PagedKV, rows: torch.Tensor, tail_rows: torch.Tensor, h0: int, h1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch K and V [h1 - h0, n_slots, D] of KV heads [h0, h1): the permuted slots of
    `rows` ([Hkv, P] cache rows) then the tail slots of `tail_rows` ([n_tail])."""
    n_perm, n_tail = rows.shape[1], tail_rows.shape[0]
    n_slots, d, kc, vc = n_perm + n_tail, kv.head_dim, kv.key_cache, kv.value_cache
    if use_torch_kernels(kc):
        refuse_cache_offset(kv, "the PyTorch gather")
        ps = kv.page_size
        src = torch.cat([rows[h0:h1].long(), tail_rows.long().expand(h1 - h0, -1)], dim=1)
        heads = torch.arange(h0, h1)[:, None]
        return kc[src // ps, src % ps, heads], vc[src // ps, src % ps, heads]
    ks = torch.empty(h1 - h0, n_slots, d, dtype=kc.dtype, device=kc.device)
    vs = torch.empty_like(ks)
    block = 64 if d <= 64 else 32
    _gather_kernel[(triton.cdiv(n_slots, block), h1 - h0)](
        kc, vc, cache_offsets(kv), ks, vs, rows, tail_rows, n_perm, n_slots, h0,
        *kc.stride(), *vc.stride(), rows.stride(0), ks.stride(0),
        PAGE_SIZE=kv.page_size, HEAD_DIM=d, BLOCK=block,
    )  # fmt: skip
    return ks, vs


# --------------------------------------------------------------------------- attention


def pbs_attention_varlen(
    q: torch.Tensor,
    kv: PagedKV,
    mask: PBSBlockMask,
    scale: float,
    varlen_fn: VarlenFn,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`pbs_attention` (same arguments, result and profiler range) computed by `varlen_fn`.

    varlen_fn(q, k, v, max_seqlen_q=, cu_seqlens_q=, max_seqlen_k=, seqused_k=,
    softmax_scale=, causal=True, block_table=, out=, return_softmax_lse=) with q
    [total_q, H, D] (any row / head strides), paged k, v [pages, page_size, H_kv, D].
    """
    with record_function("pbs_attention"):
        out, lse = _checked_outputs(q, kv, mask, out, return_lse)
        d, hkv = q.shape[2], kv.num_kv_heads
        group = q.shape[1] // hkv
        if mask.segment_size == 0 and mask.perm.shape[1] == 0:  # the dense mask
            _dense(q, kv, mask, scale, varlen_fn, out, lse)
            return (out, lse) if return_lse else out
        plan = varlen_plan(mask)
        bs = mask.block_size
        table, seqused = page_tables(mask, plan)
        rows, tail = _row_table(mask, kv), plan.tail_rows(kv)
        n_slots = plan.n_pages * bs
        per_head = 2 * n_slots * d * q.element_size()
        step = max(1, min(hkv, SCRATCH_BUDGET_BYTES // max(per_head, 1)))
        max_k = (mask.kv_indices.shape[2] + plan.max_own_pages) * bs
        for h0 in range(0, hkv, step):
            h1 = min(hkv, h0 + step)
            ks, vs = gather_scratch(kv, rows, tail, h0, h1)
            for h in range(h0, h1):
                heads = slice(h * group, (h + 1) * group)
                res = varlen_fn(
                    q[:, heads],
                    ks[h - h0].view(plan.n_pages, bs, 1, d),
                    vs[h - h0].view(plan.n_pages, bs, 1, d),
                    max_seqlen_q=plan.max_q,
                    cu_seqlens_q=plan.cu_seqlens_q,
                    max_seqlen_k=max_k,
                    seqused_k=seqused[h],
                    softmax_scale=scale,
                    causal=True,
                    block_table=table[h],
                    out=out[:, heads],
                    return_softmax_lse=return_lse,
                )
                if return_lse:
                    lse[heads] = res[1]
        return (out, lse) if return_lse else out


def _dense(q, kv: PagedKV, mask: PBSBlockMask, scale, varlen_fn, out, lse) -> None:
    """The full causal mask: one call over the paged cache itself."""
    refuse_cache_offset(kv, "the dense FA3 call")
    batch, planned = mask.batch, mask.plan.dense_varlen
    if planned is None:
        raise ValueError(
            f"the dense mask's plan has no FA3 plan (built with attention="
            f"{mask.plan.attention!r}): build it with attention='fa3' or None"
        )
    res = varlen_fn(
        q,
        kv.key_cache,
        kv.value_cache,
        max_seqlen_q=max(batch.q_lens),
        cu_seqlens_q=planned.cu_seqlens_q,
        max_seqlen_k=max(batch.seq_lens),
        seqused_k=planned.seq_lens,
        softmax_scale=scale,
        causal=True,
        block_table=kv.block_table[: len(batch)],
        out=out,
        return_softmax_lse=lse is not None,
    )
    if lse is not None:
        lse.copy_(res[1])

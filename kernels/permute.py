"""Fused Triton permutation of one sequence's permuted region (spec 2.2), plus what the
later stages read from it, in one launch instead of ~25 torch ops.

One program per (segment, KV head) loads the segment's key importance scores, sorts them
descending (ties by position: a stable sort) and writes, for every permuted slot,
  perm  the original key position (what `segment_permutation` returns),
  rows  the cache row of that key, page * page_size + slot in page (what the attention
        kernel's row table holds: perm composed with the block table),
  mass  per permuted key block, the sum of its keys' scores (the unnormalised
        `exact_block_mass`; the selection kernel normalises it over the sequence).
Without PERMUTE the permutation is the identity (the unpermuted ablation) and no scores
are read.

`segment_permutation` and `exact_block_mass` in `estimate.py` are the PyTorch references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["stride_sh", "stride_ph", "stride_rh", "stride_mh", "base"])
def _permute_kernel(
    scores_ptr,  # [Hkv, n] fp32 (if PERMUTE)
    bt_row_ptr,  # [max_pages] int32: the sequence's block-table row
    perm_ptr,  # [Hkv, P] int32 out
    rows_ptr,  # [Hkv, P] int32 out
    mass_ptr,  # [Hkv, n // BS] fp32 out (if MASS)
    stride_sh,
    stride_ph,
    stride_rh,
    stride_mh,
    base,  # first slot of this sequence in perm / rows
    PAGE: tl.constexpr,
    SEG: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    PERMUTE: tl.constexpr,
    MASS: tl.constexpr,
):
    seg = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, BLOCK_SEG)
    ok = i < SEG
    first = seg * SEG
    if PERMUTE:
        s = tl.load(scores_ptr + h * stride_sh + first + i, mask=ok, other=0.0)
        # scores are probabilities (>= 0): their fp32 bits order like the values; the low
        # 32 bits hold the reversed position, so equal scores keep ascending positions
        key = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) + (BLOCK_SEG - 1 - i)
        key = tl.sort(tl.where(ok, key, -1), descending=True)
        local = BLOCK_SEG - 1 - (key & 0xFFFFFFFF).to(tl.int32)
    else:
        local = i
    pos = first + local
    slot = base + first + i
    tl.store(perm_ptr + h * stride_ph + slot, pos, mask=ok)
    page = tl.load(bt_row_ptr + pos // PAGE, mask=ok, other=0)
    tl.store(rows_ptr + h * stride_rh + slot, page * PAGE + pos % PAGE, mask=ok)
    if MASS:
        vals = tl.where(ok, (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
        sums = tl.sum(tl.reshape(vals, [BLOCK_SEG // BS, BS]), axis=1)
        j = tl.arange(0, BLOCK_SEG // BS)
        tl.store(mass_ptr + h * stride_mh + seg * (SEG // BS) + j, sums, mask=j < SEG // BS)


def permute_region(
    scores: torch.Tensor | None,
    block_table_row: torch.Tensor,
    page_size: int,
    perm: torch.Tensor,
    rows: torch.Tensor,
    base: int,
    n: int,
    segment_size: int,
    block_size: int,
    mass: torch.Tensor | None = None,
) -> None:
    """Write slots [base, base + n) of perm and rows (both [Hkv, P] int32, unit inner
    stride) for one sequence's permuted region of n keys (a multiple of segment_size).

    scores [Hkv, n] fp32 key importance (None: identity permutation); mass [Hkv, n / B]
    fp32 receives the score sum of each permuted key block (needs scores).
    """
    hkv = perm.shape[0]
    if n % segment_size or segment_size % block_size:
        raise ValueError(
            f"n={n} must be a multiple of segment_size={segment_size}, itself a multiple of "
            f"block_size={block_size}"
        )
    if mass is not None and scores is None:
        raise ValueError("mass needs scores (the identity permutation has none)")
    if n == 0:
        return
    dummy = perm
    _permute_kernel[(n // segment_size, hkv)](
        scores if scores is not None else dummy,
        block_table_row,
        perm,
        rows,
        mass if mass is not None else dummy,
        scores.stride(0) if scores is not None else 0,
        perm.stride(0),
        rows.stride(0),
        mass.stride(0) if mass is not None else 0,
        base,
        PAGE=page_size,
        SEG=segment_size,
        BS=block_size,
        BLOCK_SEG=triton.next_power_of_2(segment_size),
        PERMUTE=scores is not None,
        MASS=mass is not None,
    )

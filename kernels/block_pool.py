"""Triton pooling of query blocks and permuted key blocks for block scoring (spec 2.3).

A pooled block is a [stride * D] fp32 vector; the pooled score of a block pair is
q_pool . k_pool, which makes one matmul serve both scoring modes:
  * stride 1 ("mean"): the block means, so q_pool . k_pool = mean of all q.k of the pair;
  * stride s ("antidiagonal", XAttention-style): chunk i of q_pool is the mean of the
    block's queries with block-relative index t % s == i, chunk i of k_pool the mean of
    its keys with index u % s == s - 1 - i, and q_pool is divided by the number of query
    classes present. q_pool . k_pool is then the mean over the antidiagonal samples
    (t % s + u % s == s - 1) of q.k, taken per query class and averaged over the classes.
Permuted keys are gathered through the permutation from the paged cache, never copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pbs_vllm.kernels.block_mask import QueryBlocks
from pbs_vllm.kernels.paged import PagedKV, cache_offsets
from pbs_vllm.kernels.paged_tiles import load_paged_keys


# Per-chunk sizes are not specialised (no JIT compile per new chunk shape), nor the
# alignment of the query-block index rows (slices of the step's plan).
@triton.jit(do_not_specialize=["row_ptr", "len_ptr", "pos_ptr", "stride_oh"])
def _pool_query_blocks_kernel(
    q_ptr,
    out_ptr,
    row_ptr,
    len_ptr,
    pos_ptr,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_oh,
    stride_ob,
    head_dim,
    BLOCK: tl.constexpr,
    STRIDE: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    blk, head = tl.program_id(0), tl.program_id(1)
    row0 = tl.load(row_ptr + blk)
    n = tl.load(len_ptr + blk)
    first = tl.load(pos_ptr + blk) % BLOCK  # block-relative index of the first query
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    acc = tl.zeros([STRIDE, BLOCK_D], tl.float32)
    count = tl.zeros([STRIDE], tl.float32)
    for t0 in range(first - first % SUB, first + n, SUB):
        t = t0 + tl.arange(0, SUB)
        ok = (t >= first) & (t < first + n)
        rows = (row0 + t - first).to(tl.int64)
        ptrs = q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd
        x = tl.load(ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tl.reshape(x, [SUB // STRIDE, STRIDE, BLOCK_D]), axis=0)
        count += tl.sum(tl.reshape(ok.to(tl.float32), [SUB // STRIDE, STRIDE]), axis=0)
    n_classes = tl.sum((count > 0).to(tl.float32), axis=0)
    pooled = acc / (tl.maximum(count, 1.0) * n_classes)[:, None]
    cls = tl.arange(0, STRIDE)
    ptrs = out_ptr + head * stride_oh + blk * stride_ob + cls[:, None] * head_dim + d[None, :]
    tl.store(ptrs, pooled, mask=d_ok[None, :])


@triton.jit(do_not_specialize=["stride_ph", "stride_oh"])
def _pool_key_blocks_kernel(
    k_ptr,
    k_off_ptr,
    bt_row_ptr,
    perm_ptr,
    out_ptr,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_ph,
    stride_oh,
    stride_ob,
    head_dim,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    STRIDE: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    blk, head = tl.program_id(0), tl.program_id(1)
    k_ptr += tl.load(k_off_ptr)  # PagedKV.cache_offset
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    acc = tl.zeros([STRIDE, BLOCK_D], tl.float32)
    for u0 in range(0, BLOCK, SUB):
        slots = blk * BLOCK + u0 + tl.arange(0, SUB)
        keys = tl.load(perm_ptr + head * stride_ph + slots)
        k = load_paged_keys(
            k_ptr,
            bt_row_ptr,
            keys,
            tl.full([SUB], 1, tl.int1),
            head,
            d,
            d_ok,
            stride_kp,
            stride_ks,
            stride_kh,
            stride_kd,
            PAGE,
        ).to(tl.float32)
        acc += tl.sum(tl.reshape(k, [SUB // STRIDE, STRIDE, BLOCK_D]), axis=0)
    pooled = acc / (BLOCK // STRIDE)
    chunk = STRIDE - 1 - tl.arange(0, STRIDE)  # key class u % s pairs with query class s-1-u
    ptrs = out_ptr + head * stride_oh + blk * stride_ob + chunk[:, None] * head_dim + d[None, :]
    tl.store(ptrs, pooled, mask=d_ok[None, :])


def _sub_tile(block_size: int, stride: int) -> int:
    return max(stride, min(block_size, 32))


def pool_query_blocks(
    q: torch.Tensor, qb: QueryBlocks, block_size: int, stride: int
) -> torch.Tensor:
    """Pool the query blocks `qb` (on q's device) of q [T, Hq, D]; returns [Hq, Tq, stride*D] fp32."""
    _, hq, d = q.shape
    out = torch.empty(hq, len(qb), stride * d, dtype=torch.float32, device=q.device)
    if len(qb):
        _pool_query_blocks_kernel[(len(qb), hq)](
            q,
            out,
            qb.row,
            qb.length,
            qb.pos,
            *q.stride(),
            out.stride(0),
            out.stride(1),
            d,
            BLOCK=block_size,
            STRIDE=stride,
            SUB=_sub_tile(block_size, stride),
            BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out


def pool_key_blocks(
    kv: PagedKV, seq: int, perm: torch.Tensor, block_size: int, stride: int
) -> torch.Tensor:
    """Pool the permuted key blocks of sequence `seq`.

    perm [Hkv, n] int32 (n a multiple of block_size): original position of each permuted
    slot. Returns [Hkv, n / block_size, stride*D] fp32.
    """
    hkv, n = perm.shape
    if n % block_size or perm.stride(1) != 1:
        raise ValueError(
            f"perm must be [Hkv, n] with unit inner stride and n a multiple of "
            f"block_size={block_size}, got shape {tuple(perm.shape)} strides {perm.stride()}"
        )
    d = kv.head_dim
    out = torch.empty(hkv, n // block_size, stride * d, dtype=torch.float32, device=perm.device)
    if n:
        kc = kv.key_cache
        _pool_key_blocks_kernel[(n // block_size, hkv)](
            kc,
            cache_offsets(kv),
            kv.block_table[seq],
            perm,
            out,
            *kc.stride(),
            perm.stride(0),
            out.stride(0),
            out.stride(1),
            d,
            PAGE=kv.page_size,
            BLOCK=block_size,
            STRIDE=stride,
            SUB=_sub_tile(block_size, stride),
            BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out

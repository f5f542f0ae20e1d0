"""Fused Triton key importance: mean causal softmax probability of each key (spec 2.1).

For one sequence, the rows are the last queries of its chunk times the G query heads of a
KV head (row r = query r // G, head r % G). Two passes over key tiles, reading K straight
from the paged cache, never materialising [rows, keys]:
  1. row log-sum-exp over each row's visible keys [0, pos], split over key ranges;
  2. one program per (key tile, KV head): each row's LSE from its partial LSEs, then
     column sums of exp(s - lse) over all rows.
Memory: O(splits * Hkv * rows) for the LSEs plus the [Hkv, n_keys] fp32 output.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pbs_vllm.kernels.paged import PagedKV, cache_offsets
from pbs_vllm.kernels.paged_tiles import load_paged_keys

_LOG2E = 1.4426950408889634


@triton.jit
def _load_query_rows(q_ptr, rows, row_ok, head0, d, d_ok, stride_qt, stride_qh, stride_qd, GROUP):
    """Rows r of the (query, group head) matrix: query r // GROUP, head head0 + r % GROUP."""
    ptrs = (
        q_ptr
        + (rows // GROUP)[:, None].to(tl.int64) * stride_qt
        + (head0 + rows % GROUP)[:, None] * stride_qh
        + d[None, :] * stride_qd
    )
    return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


# Sizes that change per chunk are not specialised (no JIT compile per new chunk shape).
@triton.jit(do_not_specialize=["stride_ls", "stride_lh", "n_rows", "q_pos"])
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    k_off_ptr,
    bt_row_ptr,
    lse_ptr,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_ls,
    stride_lh,
    n_rows,
    q_pos,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial LSE of rows [pid_m*BLOCK_M, +BLOCK_M) over keys of split `pid_s` (-inf if none)."""
    pid_m, head, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_ptr += tl.load(k_off_ptr)  # PagedKV.cache_offset (0 unless replayed over another layer)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    pos = q_pos + rows // GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM  # constant-folded: all true when BLOCK_D == HEAD_DIM
    q = _load_query_rows(
        q_ptr, rows, row_ok, head * GROUP, d, d_ok, stride_qt, stride_qh, stride_qd, GROUP
    )
    last_pos = q_pos + (tl.minimum((pid_m + 1) * BLOCK_M, n_rows) - 1) // GROUP
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, last_pos + 1)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        k = load_paged_keys(
            k_ptr,
            bt_row_ptr,
            keys,
            key_ok,
            head,
            d,
            d_ok,
            stride_kp,
            stride_ks,
            stride_kh,
            stride_kd,
            PAGE,
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where((keys[None, :] <= pos[:, None]) & key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        row_sum = row_sum * tl.math.exp2(m - m_safe) + tl.sum(
            tl.math.exp2(s - m_safe[:, None]), axis=1
        )
        m = m_new
    lse = (m + tl.math.log2(row_sum)) * 0.6931471805599453  # log2 -> natural log
    tl.store(lse_ptr + pid_s * stride_ls + head * stride_lh + rows, lse, mask=row_ok)


@triton.jit(
    do_not_specialize=[
        "stride_ls",
        "stride_lh",
        "stride_oh",
        "n_rows",
        "n_keys",
        "q_pos",
        "n_splits",
    ]
)
def _key_mass_kernel(
    q_ptr,
    k_ptr,
    k_off_ptr,
    bt_row_ptr,
    lse_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_ls,
    stride_lh,
    stride_oh,
    n_rows,
    n_keys,
    q_pos,
    n_splits,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    LOG2E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[head, key] = mean over rows of exp(s - lse) (0 where key > the row's position);
    each row's lse is the log-sum-exp of its n_splits partial LSEs (natural log units)."""
    pid_n, head = tl.program_id(0), tl.program_id(1)
    k_ptr += tl.load(k_off_ptr)  # PagedKV.cache_offset
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < n_keys
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM  # constant-folded: all true when BLOCK_D == HEAD_DIM
    k = load_paged_keys(
        k_ptr,
        bt_row_ptr,
        keys,
        key_ok,
        head,
        d,
        d_ok,
        stride_kp,
        stride_ks,
        stride_kh,
        stride_kd,
        PAGE,
    )
    acc = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, n_rows, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        pos = q_pos + rows // GROUP
        q = _load_query_rows(
            q_ptr, rows, row_ok, head * GROUP, d, d_ok, stride_qt, stride_qh, stride_qd, GROUP
        )
        lse_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        lse_s = tl.zeros([BLOCK_M], tl.float32)
        for sp in range(n_splits):
            x = tl.load(
                lse_ptr + sp * stride_ls + head * stride_lh + rows,
                mask=row_ok,
                other=float("-inf"),
            )
            m_new = tl.maximum(lse_m, x)
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            lse_s = lse_s * tl.exp(lse_m - m_safe) + tl.exp(x - m_safe)
            lse_m = m_new
        lse = tl.where(row_ok, (lse_m + tl.log(tl.where(row_ok, lse_s, 1.0))) * LOG2E, 0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        visible = row_ok[:, None] & (keys[None, :] <= pos[:, None])
        acc += tl.sum(tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0), axis=0)
    tl.store(out_ptr + head * stride_oh + keys, acc / n_rows, mask=key_ok)


_SPLITS = (4096, 2048, 1024)  # compile-time split lengths (one JIT variant each)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_len(row_programs: int, n_keys: int, device: torch.device) -> int:
    """Keys per partial-LSE program: the longest of _SPLITS that still gives the first pass
    about four programs per SM (few KV heads, e.g. Qwen2.5's 2, leave the GPU half idle at
    4096), never shorter than 1024."""
    for split in _SPLITS:
        if row_programs * triton.cdiv(n_keys, split) >= 4 * _num_sms(device):
            return split
    return _SPLITS[-1]


def key_importance(
    q_last: torch.Tensor,
    kv: PagedKV,
    seq: int,
    q_pos: int,
    n_keys: int,
    scale: float,
    *,
    block_m: int = 64,
    block_n: int = 64,
    split_len: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Importance of keys [0, n_keys) of sequence `seq` for its last queries, per KV head.

    q_last: [nq, Hq, D] (any strides), queries at absolute positions [q_pos, q_pos + nq);
    each attends causally to keys [0, its position] of block-table row `seq`.
    Returns [Hkv, n_keys] fp32: mean over (query, group head) rows of softmax(q.k * scale).
    block_m / block_n (rows / keys per tile), split_len (keys per partial-LSE program;
    default: `_split_len`), num_warps and num_stages are launch tunables (defaults: the
    H100 sweep's best).
    """
    nq, hq, d = q_last.shape
    hkv = kv.num_kv_heads
    if not 0 <= n_keys <= q_pos + nq:
        raise ValueError(f"n_keys={n_keys}: must be in [0, {q_pos + nq}] (keys the queries see)")
    group = hq // hkv
    if split_len is None:
        split_len = _split_len(triton.cdiv(nq * group, block_m) * hkv, q_pos + nq, q_last.device)
    if split_len % block_n:
        raise ValueError(f"split_len={split_len} must be a multiple of block_n={block_n}")
    n_rows = nq * group
    out = torch.empty(hkv, n_keys, dtype=torch.float32, device=q_last.device)
    if n_keys == 0:
        return out
    n_splits = triton.cdiv(q_pos + nq, split_len)
    lse_parts = torch.empty(n_splits, hkv, n_rows, dtype=torch.float32, device=q_last.device)
    kc, bt_row, off = kv.key_cache, kv.block_table[seq], cache_offsets(kv)
    common = dict(
        GROUP=group,
        PAGE=kv.page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_PRECISION="ieee" if q_last.dtype == torch.float32 else "tf32",  # tf32: fp32 only
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _row_lse_kernel[(triton.cdiv(n_rows, block_m), hkv, n_splits)](
        q_last,
        kc,
        off,
        bt_row,
        lse_parts,
        *q_last.stride(),
        *kc.stride(),
        lse_parts.stride(0),
        lse_parts.stride(1),
        n_rows,
        q_pos,
        scale * _LOG2E,
        SPLIT=split_len,
        **common,
    )
    _key_mass_kernel[(triton.cdiv(n_keys, block_n), hkv)](
        q_last,
        kc,
        off,
        bt_row,
        lse_parts,
        out,
        *q_last.stride(),
        *kc.stride(),
        lse_parts.stride(0),
        lse_parts.stride(1),
        out.stride(0),
        n_rows,
        n_keys,
        q_pos,
        n_splits,
        scale * _LOG2E,
        LOG2E=_LOG2E,
        **common,
    )
    return out

"""PBS attention forward in Triton: flash attention over a PBSBlockMask and a paged cache.

One program computes one query tile of one KV head. A tile's rows are (token, group head)
pairs of a single query block, so every K/V tile it loads serves the whole query-head group
(any group size: MHA, GQA, MQA). Per tile, one online softmax (exp2, scale folded into log2
space, fp32 accumulators) runs over
  phase 1: the selected permuted key blocks, read through the mask's row table (perm
           composed with the block table, written by the estimation's permutation kernel),
           so each key tile needs one index load (they precede the query block: no mask);
  phase 2: the dense causal region [own_start, last query position], pages looked up in the
           block table, masked only on the tiles that cross the diagonal (pos_k <= pos_q on
           original positions).
K/V are read in place with the cache's strides: no copy, no permuted copy. The launch grid
(the tile table) comes from the mask's plan (`pbs_vllm.kernels.plan.PrefillPlan.tiles`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.profiler import record_function

from pbs_vllm.kernels.block_mask import PBSBlockMask, RowTable, row_table_key
from pbs_vllm.kernels.paged import PagedKV, refuse_cache_offset, upload
from pbs_vllm.kernels.plan import tile_table

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _kv_offsets(
    page,
    slot,
    offs_d,
    stride_kp,
    stride_ks,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vd,
    SHARED_KV_STRIDES: tl.constexpr,
):
    """Element offsets [BLOCK_N, D] of K and V rows at (page, slot in page) [BLOCK_N].

    With SHARED_KV_STRIDES (K and V views of one cache, as vLLM lays them out) both loads
    use one offset tensor: half the address arithmetic and registers.
    """
    page = page.to(tl.int64)
    k_offs = (page * stride_kp + slot * stride_ks)[:, None] + offs_d[None, :] * stride_kd
    if SHARED_KV_STRIDES:
        v_offs = k_offs
    else:
        v_offs = (page * stride_vp + slot * stride_vs)[:, None] + offs_d[None, :] * stride_vd
    return k_offs, v_offs


@triton.jit
def _attend(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    qk_scale,
    pos_k,
    pos_q,
    k_ok,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the BLOCK_N keys at k_ptrs / v_ptrs [BLOCK_N, D].

    CAUSAL guards the loads with k_ok [BLOCK_N] and masks scores where pos_k > pos_q;
    without it pos_k, pos_q and k_ok are unused and the loads are unpredicated.
    """
    k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0) if CAUSAL else tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if CAUSAL:
        qk = tl.where(pos_k[None, :] <= pos_q[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0) if CAUSAL else tl.load(v_ptrs)
    # The dot accumulates into the rescaled acc in place (no second [BLOCK_M, D] buffer).
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _own_region_step(
    acc, m_i, l_i, q, pos_k, last_q, pos_q, bt_row, k_base, v_base, offs_d,
    stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
    PAGE_SIZE: tl.constexpr,
    SHARED_KV_STRIDES: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One step over the own region's keys at original positions pos_k [BLOCK_N].

    CAUSAL tiles may reach past the last query (their loads are guarded) and are masked
    with pos_k <= pos_q; the others lie wholly below the diagonal and load unpredicated.
    """
    k_ok = pos_k <= last_q
    if CAUSAL:
        page = tl.load(bt_row + pos_k // PAGE_SIZE, mask=k_ok, other=0)
    else:
        page = tl.load(bt_row + pos_k // PAGE_SIZE)
    k_offs, v_offs = _kv_offsets(
        page, pos_k % PAGE_SIZE, offs_d, stride_kp, stride_ks, stride_kd,
        stride_vp, stride_vs, stride_vd, SHARED_KV_STRIDES,
    )  # fmt: skip
    return _attend(
        acc, m_i, l_i, q, k_base + k_offs, v_base + v_offs, qk_scale, pos_k, pos_q, k_ok,
        CAUSAL, DOT_PRECISION,
    )  # fmt: skip


# Per-step sizes: not specialised, so a new chunk shape never triggers a JIT compile.
@triton.jit(
    do_not_specialize=[
        "lse_tokens",
        "stride_bt",
        "stride_kvn_h",
        "stride_kvi_h",
        "stride_kvi_q",
        "stride_rows_h",
    ]
)
def _pbs_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    block_table_ptr,
    tiles_ptr,
    qb_seq_ptr,
    qb_row_ptr,
    qb_len_ptr,
    qb_pos_ptr,
    own_start_ptr,
    kv_num_ptr,
    kv_idx_ptr,
    rows_ptr,
    perm_off_ptr,
    qk_scale,
    lse_tokens,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_kvn_h,
    stride_kvi_h,
    stride_kvi_q,
    stride_rows_h,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SHARED_KV_STRIDES: tl.constexpr,
    STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    qb = tl.load(tiles_ptr + 2 * tile)
    first = tl.load(tiles_ptr + 2 * tile + 1)  # first (token, group head) row in the block
    seq = tl.load(qb_seq_ptr + qb)
    q_row0 = tl.load(qb_row_ptr + qb)
    q_len = tl.load(qb_len_ptr + qb)
    q_pos0 = tl.load(qb_pos_ptr + qb)
    own_start = tl.load(own_start_ptr + qb)

    offs_m = first + tl.arange(0, BLOCK_M)
    tok = offs_m // GROUP
    head = h * GROUP + offs_m % GROUP
    row_ok = tok < q_len  # padding rows of the block's last tile: zero q, never stored
    pos_q = q_pos0 + tok
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr
        + (q_row0 + tok)[:, None].to(tl.int64) * stride_qt
        + head[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )

    # Finite start so that exp2(m_i - m_new) is 0, never NaN, before the first key.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + h * stride_kh
    v_base = v_ptr + h * stride_vh
    offs_n = tl.arange(0, BLOCK_N)

    # Phase 1: selected permuted blocks, each BLOCK_B slots walked in BLOCK_N steps; the
    # row table gives each slot's cache row (page * PAGE_SIZE + slot in page) directly.
    SUB: tl.constexpr = BLOCK_B // BLOCK_N
    n_sel = tl.load(kv_num_ptr + h * stride_kvn_h + qb)
    idx_row = kv_idx_ptr + h * stride_kvi_h + qb.to(tl.int64) * stride_kvi_q
    rows_row = rows_ptr + h.to(tl.int64) * stride_rows_h + tl.load(perm_off_ptr + seq)
    for it in range(0, n_sel * SUB):
        blk = tl.load(idx_row + it // SUB)
        row = tl.load(rows_row + blk * BLOCK_B + (it % SUB) * BLOCK_N + offs_n)
        k_offs, v_offs = _kv_offsets(
            row // PAGE_SIZE, row % PAGE_SIZE, offs_d, stride_kp, stride_ks, stride_kd,
            stride_vp, stride_vs, stride_vd, SHARED_KV_STRIDES,
        )  # fmt: skip
        acc, m_i, l_i = _attend(
            acc,
            m_i,
            l_i,
            q,
            k_base + k_offs,
            v_base + v_offs,
            qk_scale,
            offs_n,
            pos_q,
            row_ok,
            False,
            DOT_PRECISION,
        )

    # Phase 2: dense causal region; keys up to the tile's first query need no mask.
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    first_q = q_pos0 + first // GROUP
    last_q = q_pos0 + tl.minimum((first + BLOCK_M - 1) // GROUP, q_len - 1)
    unmasked_end = own_start + ((first_q + 1 - own_start) // BLOCK_N) * BLOCK_N
    for start in range(own_start, unmasked_end, BLOCK_N):
        acc, m_i, l_i = _own_region_step(
            acc, m_i, l_i, q, start + offs_n, last_q, pos_q, bt_row, k_base, v_base, offs_d,
            stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
            PAGE_SIZE, SHARED_KV_STRIDES, False, DOT_PRECISION,
        )  # fmt: skip
    for start in range(unmasked_end, last_q + 1, BLOCK_N):
        acc, m_i, l_i = _own_region_step(
            acc, m_i, l_i, q, start + offs_n, last_q, pos_q, bt_row, k_base, v_base, offs_d,
            stride_kp, stride_ks, stride_kd, stride_vp, stride_vs, stride_vd, qk_scale,
            PAGE_SIZE, SHARED_KV_STRIDES, True, DOT_PRECISION,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    tl.store(
        out_ptr
        + (q_row0 + tok)[:, None].to(tl.int64) * stride_ot
        + head[:, None] * stride_oh
        + offs_d[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    if STORE_LSE:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
        tl.store(lse_ptr + head.to(tl.int64) * lse_tokens + q_row0 + tok, lse, mask=row_ok)


def _prune_configs(configs, named_args, **kwargs):
    """Keep key tiles that divide the mask's block size, one warpgroup (4 warps) per 64 query
    rows (4 warps on 128 rows at head dim 128 spilled 130-176 registers on an H100; head
    dims up to 64 also try half the warps), and 64-key tiles for 256 rows above head dim 64
    (128-key tiles there spill and run 13x slower)."""
    meta = {**named_args, **kwargs}
    d, rows = meta["HEAD_DIM"], meta["BLOCK_M"]
    kept = [
        c
        for c in configs
        if meta["BLOCK_B"] % c.kwargs["BLOCK_N"] == 0
        and (c.num_warps * 16 == rows or (d <= 64 and c.num_warps * 32 == rows))
        and (rows < 256 or d <= 64 or c.kwargs["BLOCK_N"] <= 64)
    ]
    return kept or [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]


_TUNED_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
    for n in (64, 128)
    for w in (4, 8, 16)
    for s in (2, 3, 4)
]
_pbs_fwd_tuned = triton.autotune(
    configs=_TUNED_CONFIGS,
    key=[
        "HEAD_DIM",
        "GROUP",
        "BLOCK_B",
        "PAGE_SIZE",
        "SHARED_KV_STRIDES",
        "BLOCK_M",
    ],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_pbs_fwd_kernel)


def _block_m(head_dim: int, dtype: torch.dtype, block_rows: int) -> int:
    """Rows per query tile. 256 where a query block has that many (token, group head) rows
    (block_rows): every K/V tile then serves twice the rows, 437 vs 381 TFLOP/s on the H100
    sweep (docs/kernel-notes.md). Smaller under the interpreter, for fp32 and wide heads."""
    if _interpreted():
        return 32
    if dtype == torch.float32 or head_dim > 128:
        return 64
    return 256 if block_rows >= 256 else 128


def tile_shape(
    num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, block_size: int
) -> tuple[int, int]:
    """(GQA group, rows per query tile) of the kernel's launches for this layer shape: what
    a plan's tile table is built for (`plan_prefill(tiles=...)`)."""
    group = num_q_heads // num_kv_heads
    return group, _block_m(head_dim, dtype, block_size * group)


def _tile_table(mask: PBSBlockMask, group: int, block_m: int) -> torch.Tensor:
    """[num_tiles, 2] int32 on the mask's device: (query block, first row) per tile
    (`plan.tile_table`). The plan's table when it was built for this group and tile height
    (the serving path); else built and uploaded for this call."""
    planned = mask.plan.tiles
    if planned is not None and (planned.group, planned.block_m) == (group, block_m):
        return planned.table
    return upload(tile_table(mask.plan.qblocks_host, group, block_m), mask.plan.device)


def compose_row_table(mask: PBSBlockMask, kv: PagedKV) -> RowTable:
    """perm composed with kv's block table: the cache row (page * page_size + slot in page)
    of every permuted slot, [Hkv, P] int32, so phase 1 reads one index per key instead of
    perm -> block table."""
    bt, page_size = kv.block_table, kv.page_size
    perm = mask.perm.long()
    slots = torch.arange(perm.shape[1], device=perm.device)
    seq = torch.bucketize(slots, mask.perm_offset.long(), right=True) - 1  # [P]
    page = bt[seq[None, :], perm // page_size].long()  # [Hkv, P]
    rows = (page * page_size + perm % page_size).to(torch.int32)
    return RowTable(bt, row_table_key(bt, page_size), rows)


def _row_table(mask: PBSBlockMask, kv: PagedKV) -> torch.Tensor:
    """[Hkv, P] int32 cache rows of the permuted slots under kv's block table: the mask's
    own row table when it was composed with this block table (`build_block_mask`'s
    permutation kernel writes it) or holds no slots; else composed for this call
    (`compose_row_table`; keep it on the mask with `dataclasses.replace(mask,
    row_table=...)` to reuse it)."""
    table = mask.row_table
    if table is not None and (
        table.key is None or table.key == row_table_key(kv.block_table, kv.page_size)
    ):
        return table.rows
    return compose_row_table(mask, kv).rows


def _check_inputs(
    q: torch.Tensor, kv: PagedKV, mask: PBSBlockMask, out: torch.Tensor | None
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    t, hq, d = q.shape
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype}: must be one of {_DTYPES}")
    for name, cache in (("key_cache", kv.key_cache), ("value_cache", kv.value_cache)):
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} dtype {cache.dtype} differs from q dtype {q.dtype}")
        if cache.device != q.device:
            raise ValueError(f"{name} is on {cache.device}, q on {q.device}")
    if kv.head_dim != d:
        raise ValueError(f"head dim mismatch: q has {d}, the K/V cache {kv.head_dim}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim={d}: must be a power of two in [16, 256]")
    hkv = kv.num_kv_heads
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if mask.num_kv_heads != hkv:
        raise ValueError(f"mask has {mask.num_kv_heads} KV heads, the K/V cache {hkv}")
    if mask.plan.device != q.device:
        raise ValueError(f"mask's plan was built for device {mask.plan.device}, q is on {q.device}")
    if t != sum(mask.batch.q_lens):
        raise ValueError(
            f"q has {t} tokens but the mask's batch has sum(q_lens)={sum(mask.batch.q_lens)}"
        )
    if kv.block_table.shape[0] < len(mask.batch):
        raise ValueError(
            f"block_table has {kv.block_table.shape[0]} rows for {len(mask.batch)} sequences"
        )
    if kv.key_cache.shape[0] * kv.page_size >= 2**31:
        raise ValueError(
            f"cache of {kv.key_cache.shape[0]} pages x {kv.page_size} rows: the row table "
            "indexes rows in int32, so at most 2**31 - 1 rows are allowed"
        )
    bs = mask.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"mask block_size={bs}: must be a power of two >= 16")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), got "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})"
        )


def _checked_outputs(
    q: torch.Tensor, kv: PagedKV, mask: PBSBlockMask, out: torch.Tensor | None, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the inputs of a PBS attention call; return (out, allocated when None, and
    the [Hq, T] float32 LSE buffer when return_lse, else None)."""
    _check_inputs(q, kv, mask, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if not return_lse:
        return out, None
    return out, torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)


def pbs_attention(
    q: torch.Tensor,
    kv: PagedKV,
    mask: PBSBlockMask,
    scale: float,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PBS (or, with `dense_block_mask`, dense causal) attention of a chunk batch.

    q: [T, Hq, D] (any strides), queries in original token order of `mask.batch`.
    kv: paged cache holding every key [0, seq_len) of each sequence (any strides).
    mask: which keys each query block attends; its tensors on q's device.
    scale: softmax scale (usually D ** -0.5).
    out: optional [T, Hq, D] in q's dtype (any strides), written in place.
    Returns out [T, Hq, D] in q's dtype, and with return_lse=True also the natural-log
    sum-exp of the scaled scores, [Hq, T] float32. Runs under the torch.profiler range
    "pbs_attention".
    """
    from pbs_vllm.kernels.cpu import pbs_attention_torch, use_torch_kernels

    refuse_cache_offset(kv, "the Triton attention kernel")
    with record_function("pbs_attention"):
        if use_torch_kernels(q):  # CPU tensors: vectorized PyTorch (PBS_VLLM_CPU_KERNELS)
            return pbs_attention_torch(q, kv, mask, scale, out, return_lse)
        return _pbs_attention(q, kv, mask, scale, out, return_lse)


def _pbs_attention(
    q: torch.Tensor,
    kv: PagedKV,
    mask: PBSBlockMask,
    scale: float,
    out: torch.Tensor | None,
    return_lse: bool,
    block_m: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`pbs_attention` without the profiler range. block_m (rows per query tile) and an
    explicit launch config (BLOCK_N, warps, stages; skips the autotuner) are for the
    configuration sweep of benchmarks/sweep_configs.py."""
    out, lse = _checked_outputs(q, kv, mask, out, return_lse)
    t, hq, d = q.shape
    hkv = kv.num_kv_heads
    group = hq // hkv
    lse = out if lse is None else lse  # the kernel's LSE pointer must be valid when unused
    block_m = block_m or _block_m(d, q.dtype, mask.block_size * group)
    tiles = _tile_table(mask, group, block_m)
    qb = mask.qblocks
    rows = _row_table(mask, kv)
    kc, vc, bt = kv.key_cache, kv.value_cache, kv.block_table.contiguous()
    # Index tensors are small; the kernel assumes unit stride along their last dim.
    kv_num, kv_idx = (x.contiguous() for x in (mask.kv_num_blocks, mask.kv_indices))
    args = (
        q,
        kc,
        vc,
        out,
        lse,
        bt,
        tiles,
        qb.seq,
        qb.row,
        qb.length,
        qb.pos,
        mask.own_start,
        kv_num,
        kv_idx,
        rows,
        mask.perm_offset,
        scale * _LOG2E,
        t,
        *q.stride(),
        *out.stride(),
        *kc.stride(),
        *vc.stride(),
        bt.stride(0),
        kv_num.stride(0),
        kv_idx.stride(0),
        kv_idx.stride(1),
        rows.stride(0),
    )
    meta = dict(
        HEAD_DIM=d,
        GROUP=group,
        BLOCK_B=mask.block_size,
        PAGE_SIZE=kv.page_size,
        SHARED_KV_STRIDES=kc.stride() == vc.stride(),
        STORE_LSE=return_lse,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
    )
    grid = (tiles.shape[0], hkv)
    if config is not None:
        _pbs_fwd_kernel[grid](*args, **meta, **config.all_kwargs())
    elif _interpreted():
        _pbs_fwd_kernel[grid](*args, **meta, BLOCK_N=min(mask.block_size, 32))
    elif q.dtype == torch.float32:
        # Exact fp32 dots run on FMA units; small fixed tiles keep them in registers and
        # spare the autotuner minutes of slow candidates (fp32 is a checking path).
        _pbs_fwd_kernel[grid](*args, **meta, BLOCK_N=32, num_warps=4, num_stages=2)
    else:
        _pbs_fwd_tuned[grid](*args, **meta)
    return (out, lse) if return_lse else out

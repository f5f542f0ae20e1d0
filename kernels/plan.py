"""`PrefillPlan`: everything a prefill run's PBS work derives from its batch, built once.

Plan once per step, run per layer. Every attention layer of a step estimates and attends
over the same chunk batch, so what follows from the batch and the block geometry alone
(query blocks, permuted-region offsets, tile tables, the dense mask...) is built once, by
`plan_prefill`, and every layer reads it. The vLLM metadata builder
(`pbs_vllm.backend.metadata`) builds one plan per prefill run before any layer runs, so
no layer uploads, and a captured CUDA graph (`pbs_vllm.kernels.graphs`) never replays an
upload from a host buffer that has since been reused (`paged.upload` raises during a
capture). Callers outside the serving path pass no plan: the public entry points
(`prefill_mask`, `build_block_mask`, `dense_block_mask`, ...) then build one on the fly.

  PrefillPlan                                  Tq query blocks, N sequences, Hkv KV heads,
  |                                            P permuted slots of the batch
  |- batch, block_size B, segment_size S,      what it was built for (`check` compares)
  |  max_kept_fraction, device, num_kv_heads,
  |  attention ('fa3', 'triton' or None: both), dense
  |- qblocks_host / qblocks    QueryBlocks: seq, row, length, pos [Tq] int32 (host / device)
  |- blocks_per_seq            [N] host ints: query blocks of each sequence
  |- own_blocks, visible_blocks   host ints per KV head: key blocks of the own causal
  |                            regions / causally visible key blocks (density's counts)
  |- estimate    EstimatePlan (None when dense): per sequence the permuted region length
  |              and first slot (host), perm_offset [N] and own_start [Tq] int32 (device),
  |              the kept-ids width
  |- dense_mask  the full causal PBSBlockMask's tensors (None unless dense or the batch
  |              has no permuted region): zeros, on the device
  |- tiles       TileTable (Triton route, when the query shape is known): per tile
  |              (query block, first row), [num_tiles, 2] int32 (device)
  |- varlen      VarlenPlan (FA3 route, sparse): scratch page layout, cu_seqlens of the
  |              query blocks, tail slots (and their cache rows, with a block table)
  `- dense_varlen  DenseVarlen (FA3 route, dense): cu_seqlens_q [N + 1], seq_lens [N]

What depends on a layer (the permutation, the selected blocks, the row table composing
the permutation with the block table) lives on the mask, `PBSBlockMask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pbs_vllm.kernels.block_mask import PBSBlockMask, QueryBlocks, RowTable, row_table_key
from pbs_vllm.kernels.inputs import check_prefill_inputs, permuted_region_lengths
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV, upload, upload_rows
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.selection import kept_cap

ATTENTION_ROUTES = ("fa3", "triton")


def has_permuted_region(batch: ChunkBatch, params: SparsityParams) -> bool:
    """Whether estimation builds a sparse mask for `batch` (else the dense mask, which
    attends straight from the cache)."""
    return any(permuted_region_lengths(batch, params.segment_size))


@dataclass(frozen=True)
class EstimatePlan:
    """What estimation derives from the batch and the block geometry: per sequence the
    permuted region length (n_perm) and first slot in perm (offsets, N + 1 entries), the
    kept-ids width; on the device perm_offset [N] int32 (offsets[:-1]) and each query
    block's own-segment start own_start [Tq] int32."""

    n_perm: list[int]
    offsets: list[int]
    width: int
    own_start: torch.Tensor
    perm_offset: torch.Tensor


@dataclass(frozen=True)
class TileTable:
    """The Triton attention kernel's launch grid for one GQA group and tile height:
    table [num_tiles, 2] int32 (query block, first (token, group head) row), latest query
    blocks first."""

    group: int
    block_m: int
    table: torch.Tensor


@dataclass(frozen=True)
class VarlenPlan:
    """What the FA3 (varlen) route derives from the batch and the block geometry.

    Host: perm_pages (P / B), n_pages (scratch pages per KV head), max_q (longest query
    block), max_own_pages.
    Device ([Tq] int32 unless noted): tail_seq / tail_pos ([n_tail] int64: the sequence and
    original position of every tail slot, padding included); cu_seqlens_q [Tq + 1];
    perm_page (first scratch page of the query block's sequence's permuted region);
    own_page (scratch page of its own_start); own_len (keys of its own region).
    planned_tail_rows: the tail slots' cache rows under the block table the plan was built
    with (None without one; `tail_rows` composes them for any other block table).
    """

    perm_pages: int
    n_pages: int
    max_q: int
    max_own_pages: int
    tail_seq: torch.Tensor
    tail_pos: torch.Tensor
    cu_seqlens_q: torch.Tensor
    perm_page: torch.Tensor
    own_page: torch.Tensor
    own_len: torch.Tensor
    planned_tail_rows: RowTable | None = None

    def tail_rows(self, kv: PagedKV) -> torch.Tensor:
        """[n_tail] int32 on the cache's device: the cache row (page * page_size + slot)
        of every tail slot under `kv`'s block table: the planned rows when the plan was
        built with this block table (the serving path), else composed here."""
        planned = self.planned_tail_rows
        if planned is not None and planned.key == row_table_key(kv.block_table, kv.page_size):
            return planned.rows
        return _tail_rows(self.tail_seq, self.tail_pos, kv.block_table, kv.page_size)


@dataclass(frozen=True)
class DenseVarlen:
    """The dense mask's single FA3 call: cu_seqlens_q [N + 1] and seq_lens [N] int32."""

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor


@dataclass(frozen=True)
class _DenseTensors:
    own_start: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    perm: torch.Tensor
    perm_offset: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True, repr=False, eq=False)
class PrefillPlan:
    """Every per-run structure PBS derives from a chunk batch (diagram: module docstring).

    Built by `plan_prefill` (or `plan_for`); frozen: nothing in it changes after building,
    and nothing is added on first use.
    """

    batch: ChunkBatch
    block_size: int
    segment_size: int
    max_kept_fraction: float | None
    device: torch.device
    num_kv_heads: int
    attention: str | None
    dense: bool
    qblocks_host: QueryBlocks
    qblocks: QueryBlocks
    blocks_per_seq: list[int]
    own_blocks: int
    visible_blocks: int
    estimate: EstimatePlan | None
    tiles: TileTable | None
    varlen: VarlenPlan | None
    dense_varlen: DenseVarlen | None
    _dense: _DenseTensors | None

    def check(
        self,
        batch: ChunkBatch,
        params: SparsityParams,
        device: torch.device | str,
        num_kv_heads: int | None = None,
    ) -> None:
        """Raise ValueError, naming the values, unless this plan was built for `batch`
        (same lengths), `params`' block geometry, `device` (and `num_kv_heads`)."""
        if batch is not self.batch and (
            batch.q_lens != self.batch.q_lens or batch.ctx_lens != self.batch.ctx_lens
        ):
            raise ValueError(
                f"plan built for a batch with q_lens={self.batch.q_lens}, "
                f"ctx_lens={self.batch.ctx_lens}, used with q_lens={batch.q_lens}, "
                f"ctx_lens={batch.ctx_lens}"
            )
        built = (self.block_size, self.segment_size, self.max_kept_fraction)
        given = (params.block_size, params.segment_size, params.max_kept_fraction)
        if built != given:
            raise ValueError(
                "plan built for (block_size, segment_size, max_kept_fraction)="
                f"{built}, used with {given}"
            )
        if _normalized(device) != self.device:
            raise ValueError(f"plan built for device {self.device}, used on {device}")
        if num_kv_heads is not None and num_kv_heads != self.num_kv_heads:
            raise ValueError(
                f"plan built for num_kv_heads={self.num_kv_heads}, used with {num_kv_heads}"
            )

    def dense_mask(self) -> PBSBlockMask:
        """The full causal mask of the batch: every query block computes keys [0, p]
        densely (a view of the planned tensors: no device work)."""
        d = self._dense
        if d is None:
            raise ValueError(
                "this plan has no dense mask: it was built with dense=False for a batch "
                "with a permuted region (build it with dense=True)"
            )
        return PBSBlockMask(
            plan=self,
            segment_size=0,
            own_start=d.own_start,
            kv_num_blocks=d.kv_num_blocks,
            kv_indices=d.kv_indices,
            perm=d.perm,
            perm_offset=d.perm_offset,
            row_table=RowTable(None, None, d.rows),
        )

    def on(self, device: torch.device | str) -> PrefillPlan:
        """The same plan built for `device` (no block table: tail rows are composed on use)."""
        params = SparsityParams(
            block_size=self.block_size,
            segment_size=self.segment_size,
            max_kept_fraction=self.max_kept_fraction,
        )
        tiles = None if self.tiles is None else (self.tiles.group, self.tiles.block_m)
        return plan_prefill(
            self.batch,
            params,
            device,
            self.num_kv_heads,
            self.attention,
            tiles=tiles,
            dense=self.dense,
        )

    def __repr__(self) -> str:
        planned = [
            name
            for name in ("estimate", "tiles", "varlen", "dense_varlen")
            if getattr(self, name) is not None
        ]
        if self._dense is not None:
            planned.insert(0, "dense_mask")
        perm = self.estimate.offsets[-1] if self.estimate is not None else 0
        return (
            f"PrefillPlan(seqs={len(self.batch)}, tokens={sum(self.batch.q_lens)}, "
            f"B={self.block_size}, S={self.segment_size}, kv_heads={self.num_kv_heads}, "
            f"device={self.device}, route={self.attention or 'fa3+triton'}, "
            f"dense={self.dense}, query_blocks={len(self.qblocks_host)}, "
            f"permuted_slots={perm}, planned=[{', '.join(planned)}])"
        )


def _normalized(device: torch.device | str) -> torch.device:
    """`device` with its index (the current CUDA device for a bare 'cuda')."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def query_blocks(batch: ChunkBatch, block_size: int) -> QueryBlocks:
    """The query blocks of `batch` on the host (see `QueryBlocks`)."""
    seq, row, length, pos = [], [], [], []
    for b, (q0, n, c) in enumerate(zip(batch.cu_seqlens_q, batch.q_lens, batch.ctx_lens)):
        p = c
        while p < c + n:
            end = min((p // block_size + 1) * block_size, c + n)
            seq.append(b)
            row.append(q0 + p - c)
            length.append(end - p)
            pos.append(p)
            p = end
    as_t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return QueryBlocks(as_t(seq), as_t(row), as_t(length), as_t(pos))


def tile_table(qblocks: QueryBlocks, group: int, block_m: int) -> torch.Tensor:
    """[num_tiles, 2] int32 on the host: (query block, first row) per tile of the Triton
    kernel. A query block of L tokens has L * group rows, split into
    ceil(L * group / block_m) tiles. The latest query blocks (the most keys under a causal
    mask) come first."""
    lengths = qblocks.length.long()
    n_tiles = (lengths * group + block_m - 1) // block_m
    qb = torch.repeat_interleave(torch.arange(len(lengths)), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    first_row = (torch.arange(len(qb)) - first_tile[qb]) * block_m
    return torch.stack([qb, first_row], dim=1).flip(0).to(torch.int32).contiguous()


def _tail_rows(tail_seq, tail_pos, block_table: torch.Tensor, page_size: int) -> torch.Tensor:
    rows = block_table[tail_seq, tail_pos // page_size].long() * page_size
    return (rows + tail_pos % page_size).to(torch.int32)


def _estimate_plan(
    batch: ChunkBatch, params: SparsityParams, qb_host: QueryBlocks, qb: QueryBlocks, device
) -> EstimatePlan:
    bs, ss = params.block_size, params.segment_size
    n_perm = permuted_region_lengths(batch, ss)
    offsets = [0]
    for n in n_perm:
        offsets.append(offsets[-1] + n)
    width = max(n // bs for n in n_perm) if any(n_perm) else 1
    if params.max_kept_fraction is not None and not params.dense_last_tokens:
        width = int(kept_cap(torch.tensor(width), params.max_kept_fraction))
    return EstimatePlan(
        n_perm=n_perm,
        offsets=offsets,
        width=width,
        own_start=qb.pos // ss * ss,
        perm_offset=upload(torch.tensor(offsets[:-1], dtype=torch.int32), device),
    )


def _varlen_plan(batch: ChunkBatch, bs: int, ss: int, qb: QueryBlocks, device, pages) -> VarlenPlan:
    # Permuted regions: whole segments before each sequence's last query segment.
    perm_first, start = [], 0
    for n in batch.seq_lens:
        perm_first.append(start // bs)
        start += (n - 1) // ss * ss
    perm_pages = start // bs
    tail_start = [(c // ss) * ss for c in batch.ctx_lens]
    tail_first, tail_seq, tail_pos, page = [], [], [], perm_pages
    for b, (t0, n) in enumerate(zip(tail_start, batch.seq_lens)):
        n_tail = -(-(n - t0) // bs)
        tail_first.append(page)
        page += n_tail
        pos = torch.arange(t0, t0 + n_tail * bs).clamp_max(n - 1)
        tail_seq.append(torch.full_like(pos, b))
        tail_pos.append(pos)
    seq = qb.seq.long()
    own_start = (qb.pos // ss * ss).long()
    own_len = qb.pos.long() + qb.length.long() - own_start
    t0 = torch.tensor(tail_start)[seq]
    own_page = torch.tensor(tail_first)[seq] + (own_start - t0) // bs
    cu = torch.cat([qb.row.long(), torch.tensor([sum(batch.q_lens)])])
    packed = torch.stack([torch.tensor(perm_first)[seq], own_page, own_len]).to(torch.int32)
    perm_page, own_page_d, own_len_d = upload_rows(packed, device)
    tail_seq_d, tail_pos_d = upload_rows(
        torch.stack([torch.cat(tail_seq), torch.cat(tail_pos)]), device
    )
    planned = None
    if pages is not None:
        block_table, page_size = pages
        rows = _tail_rows(tail_seq_d, tail_pos_d, block_table, page_size)
        planned = RowTable(block_table, row_table_key(block_table, page_size), rows)
    return VarlenPlan(
        perm_pages=perm_pages,
        n_pages=page,
        max_q=int(qb.length.max()),
        max_own_pages=int(((own_len + bs - 1) // bs).max()),
        tail_seq=tail_seq_d,
        tail_pos=tail_pos_d,
        cu_seqlens_q=upload(cu.to(torch.int32), device),
        perm_page=perm_page,
        own_page=own_page_d,
        own_len=own_len_d,
        planned_tail_rows=planned,
    )


def plan_prefill(
    batch: ChunkBatch,
    params: SparsityParams,
    device: torch.device | str,
    num_kv_heads: int,
    attention: str | None = None,
    *,
    tiles: tuple[int, int] | None = None,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
    dense: bool = False,
) -> PrefillPlan:
    """Build the plan of `batch` under `params`' block geometry on `device`.

    attention: the route to plan, 'fa3' (the varlen plan) or 'triton' (the tile table),
    None for both. tiles: (GQA group, rows per tile) of the Triton kernel
    (`attention.tile_shape`); without it the Triton kernel builds its tile table per call.
    block_table / page_size: the run's block table rows (on `device`), so the FA3 route's
    tail rows are planned too. dense: the run attends with the full causal mask only (no
    estimation, no varlen plan). Uploads go through `paged.upload` (non-blocking); the
    device work is queued on the current stream, none of it waits for the device.
    """
    if attention is not None and attention not in ATTENTION_ROUTES:
        raise ValueError(f"attention={attention!r}: must be one of {ATTENTION_ROUTES} or None")
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads={num_kv_heads}: must be >= 1")
    if (block_table is None) != (page_size is None):
        raise ValueError(
            f"block_table and page_size come together, got block_table "
            f"{'None' if block_table is None else tuple(block_table.shape)} and "
            f"page_size={page_size}"
        )
    device = _normalized(device)
    bs, ss = params.block_size, params.segment_size
    qb_host = query_blocks(batch, bs)
    packed = torch.stack([qb_host.seq, qb_host.row, qb_host.length, qb_host.pos])
    qb = QueryBlocks(*upload_rows(packed, device))
    last = (qb_host.pos + qb_host.length - 1).long()
    own = last // bs - (qb_host.pos.long() // ss * ss) // bs + 1
    fa3, triton_route = attention in ("fa3", None), attention in ("triton", None)
    sparse = not dense and has_permuted_region(batch, params)

    estimate = None if dense else _estimate_plan(batch, params, qb_host, qb, device)
    table = None
    if tiles is not None and triton_route:
        group, block_m = tiles
        table = TileTable(group, block_m, upload(tile_table(qb_host, group, block_m), device))
    varlen = dense_varlen = dense_tensors = None
    if fa3 and not dense:
        pages = None if block_table is None else (block_table, page_size)
        varlen = _varlen_plan(batch, bs, ss, qb_host, device, pages)
    if not sparse:
        tq, hkv = len(qb_host), num_kv_heads
        i32 = dict(dtype=torch.int32, device=device)
        dense_tensors = _DenseTensors(
            own_start=torch.zeros(tq, **i32),
            kv_num_blocks=torch.zeros(hkv, tq, **i32),
            kv_indices=torch.zeros(hkv, tq, 1, **i32),
            perm=torch.zeros(hkv, 0, **i32),
            perm_offset=torch.zeros(len(batch), **i32),
            rows=torch.zeros(hkv, 0, **i32),
        )
        if fa3:
            lens = torch.tensor([batch.cu_seqlens_q, [0, *batch.seq_lens]], dtype=torch.int32)
            cu, seq_lens = upload_rows(lens, device)
            dense_varlen = DenseVarlen(cu, seq_lens[1:])
    return PrefillPlan(
        batch=batch,
        block_size=bs,
        segment_size=ss,
        max_kept_fraction=params.max_kept_fraction,
        device=device,
        num_kv_heads=num_kv_heads,
        attention=attention,
        dense=dense,
        qblocks_host=qb_host,
        qblocks=qb,
        blocks_per_seq=torch.bincount(qb_host.seq, minlength=len(batch)).tolist(),
        own_blocks=int(own.sum()),
        visible_blocks=int((last // bs + 1).sum()),
        estimate=estimate,
        tiles=table,
        varlen=varlen,
        dense_varlen=dense_varlen,
        _dense=dense_tensors,
    )


def plan_for(
    q: torch.Tensor,
    kv: PagedKV,
    batch: ChunkBatch,
    params: SparsityParams,
    attention: str | None = None,
    dense: bool = False,
) -> PrefillPlan:
    """`plan_prefill` for queries q [T, Hq, D] over `kv` (the tile table for q's heads,
    the tail rows for kv's block table): the on-the-fly plan of the public entry points.
    The inputs are checked first (`check_prefill_inputs`)."""
    from pbs_vllm.kernels.attention import tile_shape

    check_prefill_inputs(q, kv, batch)
    hkv = kv.num_kv_heads
    return plan_prefill(
        batch,
        params,
        q.device,
        hkv,
        attention,
        tiles=tile_shape(q.shape[1], hkv, q.shape[2], q.dtype, params.block_size),
        block_table=kv.block_table,
        page_size=kv.page_size,
        dense=dense,
    )

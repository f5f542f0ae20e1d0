"""`PBSBlockMask`: the compact block-index structure the PBS attention kernel reads.

Query blocks sit on absolute positions: query token at position p is in block p // B and
segment p // S. A chunk that starts off a block boundary gets a partial first block.
For every query block (flattened over the batch, Tq in total) and KV head the mask holds:
  * a dense causal region: keys [own_start, p] for each query position p (the block's
    own segment, or everything for a dense mask, own_start = 0);
  * a list of selected *permuted* key blocks that lie wholly before own_start. Permuted
    block j of sequence b covers permuted slots [j*B, (j+1)*B) of that sequence, whose
    original key positions are perm[h, perm_offset[b] + slot].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from pbs_vllm.kernels.paged import ChunkBatch

if TYPE_CHECKING:
    from pbs_vllm.kernels.plan import PrefillPlan


@dataclass
class QueryBlocks:
    """Query blocks of a chunk batch, flattened over the batch ([Tq] int32 each). A plan
    (`pbs_vllm.kernels.plan.PrefillPlan`) holds them on the host and on its device."""

    seq: torch.Tensor  # sequence index of the block
    row: torch.Tensor  # first query row (index into q) of the block
    length: torch.Tensor  # query tokens of the block present in this chunk
    pos: torch.Tensor  # absolute position of the block's first present query token

    def __len__(self) -> int:
        return self.seq.numel()

    def to(self, device: torch.device | str) -> QueryBlocks:
        return QueryBlocks(*(t.to(device) for t in (self.seq, self.row, self.length, self.pos)))


def row_table_key(block_table: torch.Tensor, page_size: int) -> tuple:
    """What a table of cache rows (slot -> page * page_size + slot in page) depends on
    besides the slots: the block table's identity and contents version, and the page size."""
    bt = block_table
    return (bt.data_ptr(), tuple(bt.shape), bt.stride(), bt._version, page_size)


class RowTable(NamedTuple):
    """Cache rows composed with one block table. key: its `row_table_key` when composed
    (None: rows valid under any block table, i.e. none); block_table is kept alive so its
    address cannot be reused by another table while the rows are held."""

    block_table: torch.Tensor | None
    key: tuple | None
    rows: torch.Tensor


@dataclass
class PBSBlockMask:
    """Per query block and KV head: a dense causal region plus selected permuted key blocks.

    Fields (Tq query blocks, Hkv KV heads, P permuted key slots over the batch):
      plan           the PrefillPlan of the mask's batch (its batch, block_size B and
                     device QueryBlocks are the mask's `batch`, `block_size`, `qblocks`)
      segment_size   S (0 for a dense mask)
      own_start      [Tq] int32   first key position of the dense causal region
      kv_num_blocks  [Hkv, Tq] int32   selected permuted key blocks per query block
      kv_indices     [Hkv, Tq, max_sel] int32   their ids, ascending; padding undefined
      perm           [Hkv, P] int32   original key position of each permuted slot
      perm_offset    [batch] int32    first slot of sequence b in perm
      row_table      RowTable: perm composed with the block table the mask was estimated
                     over ([Hkv, P] int32 cache rows; the permutation kernel writes it),
                     or None (the attention kernels compose it per call)
    """

    plan: PrefillPlan
    segment_size: int
    own_start: torch.Tensor
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    perm: torch.Tensor
    perm_offset: torch.Tensor
    row_table: RowTable | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.segment_size not in (0, self.plan.segment_size):
            raise ValueError(
                f"segment_size={self.segment_size}: must be 0 (dense) or the plan's "
                f"{self.plan.segment_size}"
            )

    @property
    def batch(self) -> ChunkBatch:
        return self.plan.batch

    @property
    def block_size(self) -> int:
        return self.plan.block_size

    @property
    def qblocks(self) -> QueryBlocks:
        """The query blocks on the mask's device."""
        return self.plan.qblocks

    @property
    def num_kv_heads(self) -> int:
        return self.kv_num_blocks.shape[0]

    def _perm_slots(self, seq: int) -> tuple[int, int]:
        """(first slot, number of slots) of sequence `seq` in `perm`."""
        offsets = self.perm_offset.tolist() + [self.perm.shape[1]]
        return offsets[seq], offsets[seq + 1] - offsets[seq]

    def to_dense(self, seq: int) -> torch.Tensor:
        """Token-level mask of sequence `seq`: bool [Hkv, q_len, seq_len], on the mask's device.

        Entry [h, i, k] says whether query i of the chunk (absolute position ctx_len + i)
        attends original key position k under KV head h: its own causal region
        [own_start, position] plus every key of its selected permuted blocks.
        """
        if not 0 <= seq < len(self.batch):
            raise ValueError(f"seq={seq}: must be in [0, {len(self.batch)})")
        dev, h, bs = self.own_start.device, self.num_kv_heads, self.block_size
        q_len, ctx = self.batch.q_lens[seq], self.batch.ctx_lens[seq]
        blocks = torch.nonzero(self.qblocks.seq == seq).flatten()  # [nqb] ascending
        lengths = self.qblocks.length[blocks].long()
        block_of_row = torch.repeat_interleave(torch.arange(len(blocks), device=dev), lengths)
        q_pos = torch.arange(ctx, ctx + q_len, device=dev)
        k_pos = torch.arange(ctx + q_len, device=dev)
        own = self.own_start[blocks].long()[block_of_row]
        causal = (k_pos[None, :] >= own[:, None]) & (k_pos[None, :] <= q_pos[:, None])

        first, n_slots = self._perm_slots(seq)
        picked = torch.zeros(h, len(blocks), ctx + q_len, dtype=torch.bool, device=dev)
        if n_slots:
            n_sel = self.kv_num_blocks[:, blocks].long()  # [Hkv, nqb]
            idx = self.kv_indices[:, blocks].long()  # [Hkv, nqb, max_sel]
            valid = torch.arange(idx.shape[-1], device=dev) < n_sel[..., None]
            n_kb = n_slots // bs  # extra column n_kb swallows the undefined padding
            on_block = torch.zeros(h, len(blocks), n_kb + 1, dtype=torch.bool, device=dev)
            on_block.scatter_(2, torch.where(valid, idx, n_kb), valid)
            on_slot = on_block[..., :-1].repeat_interleave(bs, dim=2)
            positions = self.perm[:, first : first + n_kb * bs].long()
            picked.scatter_(2, positions[:, None, :].expand_as(on_slot), on_slot)
        return picked[:, block_of_row] | causal[None]

    def _static_counts_per_head(self) -> tuple[int, int]:
        """(key blocks of the own causal regions, causally visible key blocks) of one KV
        head, summed over query blocks: fixed by the batch and the block geometry (own
        regions start at the query block's segment, or at 0 for a dense mask), the same for
        every head; the plan holds both (host ints)."""
        visible = self.plan.visible_blocks
        return (self.plan.own_blocks if self.segment_size else visible), visible

    def _static_counts(self) -> tuple[int, int]:
        """`_static_counts_per_head` summed over the KV heads."""
        own, visible = self._static_counts_per_head()
        return own * self.num_kv_heads, visible * self.num_kv_heads

    def density_per_head_tensor(self) -> torch.Tensor:
        """`density_tensor()` per KV head: [Hkv] float64 on the mask's device (no host
        sync), the computed fraction of the causally visible key blocks of each head over
        the batch. Every head sees the same number of blocks, so the mean over heads equals
        `density_tensor()`."""
        own, visible = self._static_counts_per_head()
        selected = self.kv_num_blocks.sum(dim=1, dtype=torch.float64)
        return (selected + own) / visible

    def density(self) -> float:
        """The computed fraction of the causally visible key blocks, over the batch and KV
        heads: computed key blocks / causally visible key blocks.

        The own causal region counts the key blocks it touches; 1.0 for a dense mask. Not
        the kept fraction of candidate blocks that `SparsityParams.max_kept_fraction` caps
        (own blocks count here, and the denominator is every visible block), nor the
        token-level `pair_fraction` of `pbs_vllm.fidelity`.
        """
        return self.density_tensor().item()

    def density_tensor(self) -> torch.Tensor:
        """`density()` (the computed fraction of the causally visible key blocks) as a 0-d
        float64 tensor on the mask's device (no host sync)."""
        own, visible = self._static_counts()
        selected = self.kv_num_blocks.sum(dtype=torch.float64)
        return (selected + own) / visible

    def sparsity(self) -> float:
        """1 - density(): the fraction of causally visible key blocks skipped."""
        return 1.0 - self.density()

    def __repr__(self) -> str:
        max_sel = int(self.kv_num_blocks.max().item()) if self.kv_num_blocks.numel() else 0
        return (
            f"PBSBlockMask(batch={len(self.batch)}, B={self.block_size}, "
            f"S={self.segment_size}, kv_heads={self.num_kv_heads}, "
            f"query_blocks={len(self.qblocks)}, density={self.density():.4f}, "
            f"max_selected={max_sel})"
        )


def dense_block_mask(
    batch: ChunkBatch, block_size: int, num_kv_heads: int, device: torch.device | str
) -> PBSBlockMask:
    """The full causal mask for `batch`: every query block computes keys [0, p] densely.

    Builds a dense plan on the fly (`plan_prefill(..., dense=True)`); the serving path
    takes its step's planned mask (`PrefillPlan.dense_mask`) instead.
    """
    from pbs_vllm.kernels.params import SparsityParams
    from pbs_vllm.kernels.plan import plan_prefill

    params = SparsityParams(block_size=block_size, segment_size=block_size)
    return plan_prefill(batch, params, device, num_kv_heads, dense=True).dense_mask()


def random_block_mask(
    batch: ChunkBatch,
    block_size: int,
    segment_size: int,
    num_kv_heads: int,
    fraction: float,
    device: torch.device | str,
    seed: int = 0,
    plan: PrefillPlan | None = None,
) -> PBSBlockMask:
    """A synthetic PBS mask for tests and benchmarks (no estimator involved).

    plan: the batch's plan (e.g. `plan_for` with the attention's queries and cache, so the
    attention kernels find their tile table planned); None builds one on the fly.

    Every complete segment before a sequence's last query segment gets an independent
    random permutation per KV head; each query block keeps ceil(fraction * candidates)
    of its candidate permuted blocks (those wholly before its own segment), chosen
    uniformly at random. fraction=1.0 keeps all: the same attention as the dense mask.
    """
    bs, seg = block_size, segment_size
    if bs < 1 or seg < bs or seg % bs:
        raise ValueError(f"segment_size={seg}: must be a positive multiple of block_size={bs}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: must be in [0, 1]")
    from pbs_vllm.kernels.params import SparsityParams
    from pbs_vllm.kernels.plan import plan_prefill

    params = SparsityParams(block_size=bs, segment_size=seg)
    if plan is None:
        plan = plan_prefill(batch, params, device, num_kv_heads)
    else:
        plan.check(batch, params, device, num_kv_heads)
    gen = torch.Generator(device=device).manual_seed(seed)
    qb_host = plan.qblocks_host
    i32 = dict(dtype=torch.int32, device=device)

    perms, offsets, start = [], [], 0
    for n in batch.seq_lens:
        n_seg = (n - 1) // seg  # complete segments before the last query's segment
        keys = torch.rand(num_kv_heads, n_seg, seg, generator=gen, device=device)
        base = torch.arange(n_seg, device=device)[:, None] * seg
        perms.append((keys.argsort(dim=-1) + base).reshape(num_kv_heads, -1))
        offsets.append(start)
        start += n_seg * seg
    perm = torch.cat(perms, dim=1).to(torch.int32)

    own_start = (qb_host.pos // seg) * seg
    n_cand = (own_start // bs).long()
    n_keep = torch.ceil(n_cand.double() * fraction).long().clamp(max=n_cand)
    tq, width = len(qb_host), max(int(n_cand.max()), 1)
    cand = torch.arange(width, device=device)
    priority = torch.rand(num_kv_heads, tq, width, generator=gen, device=device)
    priority.masked_fill_(cand >= n_cand.to(device)[:, None], 2.0)  # never picked
    max_sel = max(int(n_keep.max()), 1)
    chosen = priority.argsort(dim=-1)[..., :max_sel]
    chosen.masked_fill_(cand[:max_sel] >= n_keep.to(device)[:, None], width)
    kv_indices = chosen.sort(dim=-1).values.to(torch.int32)

    return PBSBlockMask(
        plan=plan,
        segment_size=seg,
        own_start=own_start.to(**i32),
        kv_num_blocks=n_keep.to(**i32).expand(num_kv_heads, tq).contiguous(),
        kv_indices=kv_indices,
        perm=perm,
        perm_offset=torch.tensor(offsets, **i32),
    )

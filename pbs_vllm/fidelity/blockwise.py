"""Fidelity of block selections one query block at a time: long prompts, sampled rows.

`metrics.mask_fidelity` holds the dense probabilities of a whole prompt ([Hq, N, N]: 4K
tokens at most on a 24 GiB machine). Here the dense attention of one query block's rows
is computed at a time ([Hq, L, n] over its visible keys), every selection of that block is
scored against it, and the sums are kept, so a 16K-32K prompt fits and any subset of
query blocks can be scored (all of them reproduce `mask_fidelity` exactly).

A *selection* of query block k (of a whole-prompt mask: one sequence, ctx 0) says which
of its candidate permuted key blocks (those wholly before its own causal region) it
computes: bool [Hkv, C]. `block_parts` splits the block's dense attention by candidate
block once per permutation, so each selection then costs a sum (many taus, estimators and
oracles per block for the price of one dense pass). `mask_keep` reads a PBS mask's
selection; `oracle_keep` keeps, under the same permutation, the blocks of the largest
true attention mass (how far a better estimate of the same permuted blocks could go).

Shapes: q [N, Hq, D], k and v [N, Hkv, D]; query head h reads KV head h // (Hq / Hkv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pbs_vllm.kernels.block_mask import PBSBlockMask


@dataclass(frozen=True)
class BlockRows:
    """A query block of a whole prompt: its query rows [row0, row1) (positions equal rows),
    the first key of its own causal region, its candidate permuted key blocks, the dense
    causal probabilities of its rows over keys [0, row1) (probs [Hq, L, row1], float32 or
    float64) and the dense output (out [L, Hq, D] float64)."""

    row0: int
    row1: int
    own_start: int
    n_cand: int
    probs: torch.Tensor
    out: torch.Tensor


def dense_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: tuple[int, int],
    own_start: int,
    block_size: int,
    dtype: torch.dtype = torch.float64,
) -> BlockRows:
    """The dense causal attention of the query block of rows [row0, row1) of a whole
    prompt (positions equal rows) whose own causal region starts at key `own_start`
    (a multiple of block_size: its candidates are the blocks before it)."""
    row0, row1 = rows
    if not 0 <= row0 < row1 <= q.shape[0] or own_start % block_size or own_start > row0:
        raise ValueError(
            f"rows {rows}, own_start {own_start}: need 0 <= row0 < row1 <= {q.shape[0]} and "
            f"own_start <= row0, a multiple of block_size={block_size}"
        )
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = q[row0:row1].to(dtype).transpose(0, 1)  # [Hq, L, D]
    ks = k[:row1].to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, n, D]
    scores = torch.bmm(qs, ks.mT).mul_(scale)
    hidden = torch.arange(row1)[None, :] > torch.arange(row0, row1)[:, None]
    probs = scores.masked_fill_(hidden, float("-inf")).softmax(dim=-1)
    out = _apply(probs, v[:row1], group)
    return BlockRows(row0, row1, own_start, own_start // block_size, probs, out)


def mask_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PBSBlockMask,
    block: int,
    dtype: torch.dtype = torch.float64,
) -> BlockRows:
    """`dense_rows` of query block `block` of `mask` (a whole-prompt mask)."""
    _check_whole_prompt(mask, q.shape[0])
    qb = mask.plan.qblocks_host
    row0 = int(qb.row[block])
    rows = (row0, row0 + int(qb.length[block]))
    return dense_rows(q, k, v, rows, int(mask.own_start[block]), mask.block_size, dtype)


def _apply(probs: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
    """probs [Hq, L, n] over v [n, Hkv, D] -> [L, Hq, D] float64."""
    vs = v.to(probs.dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, n, D]
    return torch.bmm(probs, vs).transpose(0, 1).double()


@dataclass(frozen=True)
class BlockParts:
    """The dense attention of one query block split by where its keys lie, under one
    permutation: own [Hq, L, D] / own_mass [Hq, L], the unnormalised output and the mass
    of the own causal region; cand [Hq, L, C, D] / cand_mass [Hq, L, C], the same per
    candidate permuted block (C = n_cand). Any selection's output is then a sum."""

    own: torch.Tensor
    own_mass: torch.Tensor
    cand: torch.Tensor
    cand_mass: torch.Tensor


def block_parts(rows: BlockRows, v: torch.Tensor, perm: torch.Tensor, block_size: int):
    """`BlockParts` of `rows` with candidate blocks in the order of perm [Hkv, >= C * B]
    (original position of each permuted slot) over v [N, Hkv, D]."""
    hq, n_rows, n = rows.probs.shape
    hkv, d = v.shape[1], v.shape[2]
    group = hq // hkv
    probs, dt = rows.probs, rows.probs.dtype
    own_p = probs[..., rows.own_start :]
    own = _apply(own_p, v[rows.own_start : n], group).transpose(0, 1)  # [Hq, L, D]
    c = rows.n_cand
    cand = torch.zeros(hq, n_rows, c, d, dtype=torch.float64)
    cand_mass = torch.zeros(hq, n_rows, c, dtype=torch.float64)
    if c:
        slots = perm[:, : c * block_size].long().cpu()
        for h in range(hkv):
            heads = slice(h * group, (h + 1) * group)
            p_h = probs[heads][..., slots[h]].view(group, n_rows, c, block_size)
            v_h = v[slots[h], h].to(dt).view(c, block_size, d)
            cand[heads] = torch.einsum("glcb,cbd->glcd", p_h, v_h).double()
            cand_mass[heads] = p_h.sum(-1).double()
    return BlockParts(own, own_p.sum(-1).double(), cand, cand_mass)


def keep_of(num: torch.Tensor, idx: torch.Tensor, n_cand: int) -> torch.Tensor:
    """Selection bool [Hkv, n_cand] of num [Hkv] kept block ids idx [Hkv, >= max(num)]."""
    num, idx = num.long().cpu(), idx.long().cpu()
    keep = torch.zeros(num.shape[0], n_cand + 1, dtype=torch.bool)
    valid = torch.arange(idx.shape[-1])[None, :] < num[:, None]
    keep.scatter_(1, torch.where(valid, idx, n_cand).clamp_max(n_cand), valid)
    return keep[:, :n_cand]


def mask_keep(mask: PBSBlockMask, block: int) -> torch.Tensor:
    """Which candidate permuted blocks query block `block` keeps under `mask`: bool
    [Hkv, C] (C = its candidates)."""
    c = int(mask.own_start[block]) // mask.block_size
    return keep_of(mask.kv_num_blocks[:, block], mask.kv_indices[:, block], c)


def candidate_block_mass(parts: BlockParts, num_kv_heads: int) -> torch.Tensor:
    """True attention mass of each candidate permuted block: [Hkv, C] float64, summed over
    the block's keys, averaged over its queries and the KV head's query heads."""
    m = parts.cand_mass.mean(dim=1)  # [Hq, C]
    return m.view(num_kv_heads, -1, m.shape[-1]).mean(dim=1)


def oracle_keep(parts: BlockParts, num_kv_heads: int, n_keep: torch.Tensor) -> torch.Tensor:
    """The `n_keep[h]` candidate blocks of the largest true mass per KV head: bool [Hkv, C]."""
    mass = candidate_block_mass(parts, num_kv_heads)
    order = mass.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(mass.shape[1]).expand_as(order))
    return ranks < n_keep.long()[:, None]


def oracle_counts(parts: BlockParts, num_kv_heads: int, tau: float) -> torch.Tensor:
    """Per KV head, the fewest candidate blocks whose true mass reaches `tau` of the
    candidates' true mass (all of them at tau >= 1): [Hkv] int64."""
    mass = candidate_block_mass(parts, num_kv_heads)
    c = mass.shape[1]
    if tau >= 1.0 or c == 0:
        return torch.full((num_kv_heads,), c, dtype=torch.long)
    share = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    share = share / share[:, -1:].clamp_min(1e-300)
    return torch.clamp((share < tau).sum(-1) + 1, max=c)


@dataclass
class FidelitySums:
    """Sums over scored query blocks: mass kept (and queries x query heads counted),
    squared output error and squared dense output (per KV head), and computed / visible
    key blocks."""

    hkv: int
    mass: float = 0.0
    count: int = 0
    err_sq: list[float] = field(default_factory=list)
    ref_sq: list[float] = field(default_factory=list)
    computed_blocks: int = 0
    visible_blocks: int = 0

    def __post_init__(self) -> None:
        self.err_sq = self.err_sq or [0.0] * self.hkv
        self.ref_sq = self.ref_sq or [0.0] * self.hkv

    def add(self, rows: BlockRows, parts: BlockParts, keep: torch.Tensor, block_size: int):
        """Score the selection `keep` (bool [Hkv, C] over the candidate blocks of `parts`)
        of `rows` and add it to the sums."""
        hq = rows.probs.shape[0]
        group = hq // self.hkv
        k = keep.repeat_interleave(group, dim=0).double()  # [Hq, C]
        mass = parts.own_mass + (parts.cand_mass * k[:, None, :]).sum(-1)  # [Hq, L]
        out = parts.own + torch.einsum("hlcd,hc->hld", parts.cand, k)
        out = (out / mass[..., None]).transpose(0, 1)  # [L, Hq, D]
        err = (out - rows.out).square().sum(dim=(0, 2)).view(self.hkv, group).sum(-1)
        ref = rows.out.square().sum(dim=(0, 2)).view(self.hkv, group).sum(-1)
        for h in range(self.hkv):
            self.err_sq[h] += float(err[h])
            self.ref_sq[h] += float(ref[h])
        self.mass += float(mass.sum())
        self.count += mass.numel()
        bs, n = block_size, rows.row1
        own_blocks = (n - 1) // bs - rows.own_start // bs + 1
        self.computed_blocks += int(keep.sum()) + own_blocks * self.hkv
        self.visible_blocks += ((n - 1) // bs + 1) * self.hkv

    @property
    def recall(self) -> float:
        """Dense attention mass on the computed keys, mean over queries and query heads."""
        return self.mass / max(self.count, 1)

    @property
    def rel_error(self) -> float:
        """||out_sparse - out_dense||_F / ||out_dense||_F over the scored rows."""
        return math.sqrt(sum(self.err_sq) / max(sum(self.ref_sq), 1e-300))

    @property
    def density(self) -> float:
        """Computed / causally visible key blocks over the scored query blocks."""
        return self.computed_blocks / max(self.visible_blocks, 1)


def spaced(items: list[int], count: int | None) -> list[int]:
    """`count` of `items`, evenly spaced, always with the last one (for query blocks: the
    answer position); None or more than there are: all of them."""
    if count is None or count >= len(items):
        return list(items)
    if count < 1:
        raise ValueError(f"count={count}: must be >= 1 or None")
    step = len(items) / count
    picked = {items[min(int(i * step), len(items) - 1)] for i in range(count - 1)}
    picked.add(items[-1])
    return sorted(picked)


def _check_whole_prompt(mask: PBSBlockMask, n: int) -> None:
    batch = mask.batch
    if len(batch) != 1 or batch.ctx_lens != [0] or batch.q_lens != [n]:
        raise ValueError(
            f"mask covers q_lens={batch.q_lens}, ctx_lens={batch.ctx_lens}; blockwise "
            f"fidelity needs one whole prompt of {n} tokens (q_lens=[{n}], ctx_lens=[0])"
        )

"""Fidelity report: PBS against the unpermuted ablation and a top-k oracle, over tau.

Methods (all on one whole prompt, masks from the plain-PyTorch reference estimator):
  pbs                 PBS at tau (permute=True, mean pooling)
  unpermuted          the unpermuted ablation at the same tau (permute=False)
  unpermuted-matched  unpermuted with PBS's budget: tau=1 and max_kept_fraction = f, the fraction
                      of candidate blocks PBS kept; every query block keeps ceil(f * its
                      candidates) blocks, so its total is >= PBS's (never less compute)
  oracle              per query block and KV head, PBS's number of original-order key blocks
                      with the largest true attention mass
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from pbs_vllm.fidelity.metrics import attend, dense_probs, mask_fidelity
from pbs_vllm.fidelity.oracle import topk_oracle_mask
from pbs_vllm.kernels.block_mask import PBSBlockMask
from pbs_vllm.kernels.estimate_ref import build_block_mask_ref
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams

METHODS = ("pbs", "unpermuted", "unpermuted-matched", "oracle")


@dataclass(frozen=True)
class ReportRow:
    """One method at one tau; pair_fraction / recall / rel_error as in `metrics.Fidelity`."""

    tau: float
    method: str
    pair_fraction: float
    recall: float
    rel_error: float


class PromptAttention:
    """One prompt's q [N, Hq, D], k and v [N, Hkv, D] with its dense reference attention."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        check_qkv(q, k, v)
        self.q, self.k, self.v = q.float(), k.float(), v.float()
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        self.probs = dense_probs(q, k, self.scale)
        self.out = attend(self.probs, v)
        n = q.shape[0]
        self.batch = ChunkBatch(q_lens=[n], ctx_lens=[0])
        self.kv = PagedKV.from_contiguous(self.k, self.v, [n])

    def mask(self, params: SparsityParams) -> PBSBlockMask:
        """The reference estimator's block mask for the whole prompt."""
        return build_block_mask_ref(self.q, self.kv, self.batch, params, self.scale)

    def row(self, tau: float, method: str, mask: PBSBlockMask) -> ReportRow:
        fid = mask_fidelity(mask.to_dense(0), self.probs, self.v, self.out)
        return ReportRow(tau, method, fid.pair_fraction, fid.recall, fid.rel_error)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [N, Hq, D], k = v shape [N, Hkv, D], Hq a multiple of Hkv; ValueError otherwise."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            "need q [N, Hq, D] and k, v [N, Hkv, D]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} does not match k {tuple(k.shape)}: need the same N and D "
            "and Hq a multiple of Hkv"
        )


def candidate_fraction(mask: PBSBlockMask) -> float:
    """Kept / candidate key blocks over all query blocks and KV heads of a mask."""
    n_cand = mask.own_start.long() // mask.block_size
    total = n_cand.sum().item() * mask.num_kv_heads
    if total == 0:
        raise ValueError(
            "no query block has candidate key blocks: the prompt must span more than one "
            f"segment (segment_size={mask.segment_size})"
        )
    return mask.kv_num_blocks.long().sum().item() / total


def compare_at_tau(
    prompt: PromptAttention, params: SparsityParams
) -> tuple[list[ReportRow], dict[str, PBSBlockMask]]:
    """Rows for every method of METHODS at params.tau, plus their masks by method name."""
    pbs = prompt.mask(replace(params, permute=True))
    frac = candidate_fraction(pbs)
    masks = {
        "pbs": pbs,
        "unpermuted": prompt.mask(replace(params, permute=False)),
        "unpermuted-matched": prompt.mask(
            replace(params, permute=False, tau=1.0, max_kept_fraction=min(1.0, frac))
        ),
        "oracle": topk_oracle_mask(prompt.probs, pbs),
    }
    return [prompt.row(params.tau, name, masks[name]) for name in METHODS], masks


def fidelity_report(
    prompt: PromptAttention,
    taus: Iterable[float],
    block_size: int,
    segment_size: int,
    progress: bool = False,
) -> list[ReportRow]:
    """compare_at_tau for each tau (mean pooling, sink kept, no max_kept_fraction cap)."""
    rows = []
    for tau in tqdm(list(taus), desc="tau", disable=not progress):
        params = SparsityParams(block_size=block_size, segment_size=segment_size, tau=tau)
        rows += compare_at_tau(prompt, params)[0]
    return rows


def format_table(rows: Sequence[ReportRow]) -> str:
    """Fixed-width text table, one line per row."""
    lines = [f"{'tau':>5}  {'method':<19} {'pair_fraction':>13} {'recall':>8} {'rel_error':>10}"]
    lines += [
        f"{r.tau:>5.2f}  {r.method:<19} {r.pair_fraction:>13.4f} {r.recall:>8.4f} {r.rel_error:>10.4f}"
        for r in rows
    ]
    return "\n".join(lines)


def write_csv(rows: Sequence[ReportRow], path: str | Path) -> None:
    """Rows as CSV with a header: tau, method, pair_fraction, recall, rel_error."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ReportRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)

"""Heatmaps of selected key blocks per query block, before and after permutation.

Needs matplotlib (the `viz` extra); drawn with the Agg backend, no display required.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pbs_vllm.kernels.block_mask import PBSBlockMask


def permuted_key_order(mask: PBSBlockMask, head: int) -> torch.Tensor:
    """Original key position of each permuted slot of sequence 0 under KV head `head`:
    [seq_len] int64, the permutation over the permuted region, identity after it."""
    n = mask.batch.seq_lens[0]
    slots = mask.perm_offset.tolist() + [mask.perm.shape[1]]
    perm = mask.perm[head, slots[0] : slots[1]].long().cpu()
    return torch.cat([perm, torch.arange(perm.numel(), n)])


def tile_coverage(
    token_mask: torch.Tensor, block_size: int, key_order: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of each (query block, key block) tile that is computed: [nqb, nkb] float32.

    token_mask [q_len, seq_len] bool of a whole prompt; key_order [seq_len] lists the
    original key position shown in each column (None: original order).
    """
    m = token_mask.cpu().float()
    if key_order is not None:
        m = m[:, key_order]
    q_len, n = m.shape
    nqb, nkb = -(-q_len // block_size), -(-n // block_size)
    m = F.pad(m, (0, nkb * block_size - n, 0, nqb * block_size - q_len))
    return m.view(nqb, block_size, nkb, block_size).mean(dim=(1, 3))


def plot_selection_heatmap(
    unpermuted: PBSBlockMask, pbs: PBSBlockMask, head: int, path: str | Path
) -> None:
    """One PNG of three panels for KV head `head` of a whole-prompt (one sequence) mask:
    the unpermuted selection, PBS's selection in permuted block coordinates, and PBS's
    selection mapped back to original key positions (fraction of each tile computed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0 <= head < pbs.num_kv_heads:
        raise ValueError(f"head={head}: must be in [0, {pbs.num_kv_heads}) (KV heads)")
    bs = pbs.block_size
    pbs_tokens = pbs.to_dense(0)[head]
    panels = [
        ("unpermuted (original order)", tile_coverage(unpermuted.to_dense(0)[head], bs)),
        ("PBS (permuted blocks)", tile_coverage(pbs_tokens, bs, permuted_key_order(pbs, head))),
        ("PBS (original positions)", tile_coverage(pbs_tokens, bs)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), constrained_layout=True)
    for ax, (title, cover) in zip(axes, panels):
        image = ax.imshow(
            cover.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        ax.set_title(title)
        ax.set_xlabel(f"key block (B={bs})")
        ax.set_ylabel("query block")
    fig.colorbar(image, ax=axes, shrink=0.8, label="fraction of tile computed")
    fig.suptitle(f"KV head {head}: selected key blocks per query block (S={pbs.segment_size})")
    fig.savefig(path, dpi=100)
    plt.close(fig)

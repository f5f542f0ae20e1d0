"""Fidelity tooling: synthetic attention, mask metrics, top-k oracle, heatmaps, reports."""

from __future__ import annotations

from pbs_vllm.fidelity.heatmap import plot_selection_heatmap, tile_coverage
from pbs_vllm.fidelity.metrics import Fidelity, attend, dense_probs, mask_fidelity
from pbs_vllm.fidelity.oracle import topk_oracle_mask
from pbs_vllm.fidelity.report import (
    METHODS,
    PromptAttention,
    ReportRow,
    compare_at_tau,
    fidelity_report,
    format_table,
    write_csv,
)
from pbs_vllm.fidelity.synthetic import SyntheticQKV, SyntheticSpec, make_synthetic_qkv

__all__ = [
    "METHODS",
    "Fidelity",
    "PromptAttention",
    "ReportRow",
    "SyntheticQKV",
    "SyntheticSpec",
    "attend",
    "compare_at_tau",
    "dense_probs",
    "fidelity_report",
    "format_table",
    "make_synthetic_qkv",
    "mask_fidelity",
    "plot_selection_heatmap",
    "tile_coverage",
    "topk_oracle_mask",
    "write_csv",
]

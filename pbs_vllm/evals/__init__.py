"""Offline accuracy suites: RULER-style long-context prompts (`ruler`), the pure helpers
that compare engine settings on them (`compare`), and the engine arguments of the runner
(`engine`). Nothing imported here imports vLLM or torch."""

from __future__ import annotations

from pbs_vllm.evals.compare import (
    REFERENCE,
    SETTINGS,
    MissingDensityError,
    Setting,
    first_token_agreement,
    markdown_table,
    mean_topk_kl,
    order_settings,
    parse_settings,
    setting_config,
    summarize,
    topk_kl,
)
from pbs_vllm.evals.ruler import (
    TASKS,
    Sample,
    make_prompts,
    parse_length,
    parse_lengths,
    parse_tasks,
    score,
)

__all__ = [
    "REFERENCE",
    "SETTINGS",
    "TASKS",
    "MissingDensityError",
    "Sample",
    "Setting",
    "first_token_agreement",
    "make_prompts",
    "markdown_table",
    "mean_topk_kl",
    "order_settings",
    "parse_length",
    "parse_lengths",
    "parse_settings",
    "parse_tasks",
    "score",
    "setting_config",
    "summarize",
    "topk_kl",
]

"""Prometheus metrics of the PBS prefill path, served beside vLLM's own on `/metrics`.

Metrics (created on first use, in the process that records them):
  pbs:prefill_tokens_total{path="sparse"|"dense"}  counter, prefill tokens by attention path
  pbs:prefill_density                               gauge, latest achieved mask density:
                                                    the computed fraction of the causally
                                                    visible key blocks
  pbs:fallback_total{reason=...}                    counter, prefills sent to dense attention:
                                                    short_prompt (per request and step),
                                                    dense_cost (per request and step),
                                                    dense_held (per layer and step)

Getting them onto vLLM's `/metrics`: the attention backend runs in the engine-core (or
worker) process, `/metrics` is served by the API-server process from its own registry.
vLLM reads every process's metrics only in prometheus_client's multiprocess mode, i.e.
when `PROMETHEUS_MULTIPROC_DIR` names a directory in the environment *before* vLLM starts
(then `vllm.v1.metrics.prometheus.get_prometheus_registry` serves a MultiProcessCollector
over it). `pbs-vllm serve-tiny` sets a fresh directory; with plain `vllm serve` set it
yourself (a fresh, empty directory per run). Without it the metrics stay in the engine
process: visible only when vLLM runs in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0);
the backend's periodic log line still reports the same numbers.

Only the first tensor-parallel rank of the first pipeline stage records, so tokens are
counted once per step however many workers run the model.
"""

from __future__ import annotations

import functools

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@functools.cache
def _metrics():
    """(tokens counter, density gauge, fallback counter), registered once per process."""
    from prometheus_client import Counter, Gauge

    tokens = Counter(
        "pbs:prefill_tokens",
        "Prefill tokens computed by PBS attention, by path (sparse PBS or dense fallback).",
        ["path"],
    )
    density = Gauge(
        "pbs:prefill_density",
        "Achieved PBS mask density of the latest sampled sparse prefill (the computed "
        "fraction of the causally visible key blocks).",
        multiprocess_mode="mostrecent",
    )
    fallbacks = Counter(
        "pbs:fallback",
        "Prefills that PBS sent to dense attention, by reason.",
        ["reason"],
    )
    return tokens, density, fallbacks


@functools.cache
def _is_reporting_rank() -> bool:
    """True outside vLLM's model parallelism, else only on TP rank 0 of the first PP stage."""
    try:
        from vllm.distributed import parallel_state as ps
    except ImportError:
        return True
    if not ps.model_parallel_is_initialized():
        return True
    return ps.get_tp_group().rank_in_group == 0 and ps.get_pp_group().is_first_rank


def record_step(sparse_tokens: int, dense_tokens: int, density: float | None = None) -> None:
    """Add one step's prefill tokens by path; set the density gauge when a sample is given."""
    if sparse_tokens < 0 or dense_tokens < 0:
        raise ValueError(
            f"sparse_tokens={sparse_tokens}, dense_tokens={dense_tokens}: must be >= 0"
        )
    if density is not None and not 0.0 <= density <= 1.0:
        raise ValueError(f"density={density}: must be in [0, 1] or None")
    if not _is_reporting_rank():
        return
    tokens, gauge, _ = _metrics()
    if sparse_tokens:
        tokens.labels(path="sparse").inc(sparse_tokens)
    if dense_tokens:
        tokens.labels(path="dense").inc(dense_tokens)
    if density is not None:
        gauge.set(density)


def record_fallback(reason: str, count: int = 1) -> None:
    """Count `count` prefills sent to dense attention for `reason` (e.g. "short_prompt")."""
    if not reason or count < 0:
        raise ValueError(f"reason={reason!r}, count={count}: need a non-empty reason, count >= 0")
    if _is_reporting_rank() and count:
        _metrics()[2].labels(reason=reason).inc(count)

"""Process-wide counters of the PBS prefill path, logged every `stats_log_interval_s`.

The builder records each step's token split; the impl adds mask density samples (the
computed fraction of the causally visible key blocks, `PBSBlockMask.density()`) while a
log line is due (`density_due()`): one step per interval (every layer of it), not every
step. A sample never synchronises the device: the densities travel to the host by an
asynchronous copy (`defer_sample`) and are counted once the copy has landed (checked at
each step's `maybe_log`, waited for by `snapshot`); routing takes its own copy
(`backend/routing.py`). `STATS.snapshot()` gives the totals as a dict,
with the mean density per layer and, from the samples taken while a log line was due,
per (layer, KV head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pbs_vllm import metrics
from pbs_vllm.backend.log import get_logger

logger = get_logger(__name__)


def to_host_async(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(host tensor, event recorded after its copy) of `values`, without a sync: a CUDA
    tensor is copied into pinned memory without blocking; a CPU tensor is returned as it
    is, with None."""
    if values.device.type != "cuda":
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


@dataclass
class PBSStats:
    """Cumulative counters since start (or `reset()`); density is a mean over samples."""

    steps: int = 0
    decode_tokens: int = 0
    sparse_prefill_tokens: int = 0
    dense_prefill_tokens: int = 0
    density_sum: float = 0.0
    density_samples: int = 0
    last_density: float | None = None
    layer_density: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, n]
    # name -> one [sum, n] per KV head
    layer_head_density: dict[str, list[list[float]]] = field(default_factory=dict)
    log_interval_s: float = 0.0
    _last_log: float = field(default_factory=time.monotonic, repr=False)
    _samples_at_log: int = field(default=0, repr=False)
    _waited: bool = field(default=False, repr=False)
    # Deferred samples: (copy-done event or None, host values, masks, heads per mask, layer)
    _pending: list[tuple] = field(default_factory=list, repr=False)

    def configure(self, log_interval_s: float) -> None:
        """Set the log interval in seconds (0 disables logging and density sampling)."""
        self.log_interval_s = log_interval_s

    def reset(self) -> None:
        """Zero every counter and restart the log clock (the log interval is kept)."""
        self.steps = self.decode_tokens = self.density_samples = 0
        self.sparse_prefill_tokens = self.dense_prefill_tokens = 0
        self.density_sum = 0.0
        self.last_density = None
        self.layer_density = {}
        self.layer_head_density = {}
        self._last_log = time.monotonic()
        self._samples_at_log = 0
        self._waited = False
        self._pending = []

    def record_step(self, decode_tokens: int, sparse_tokens: int, dense_tokens: int) -> None:
        """Count one scheduler step's decode / sparse prefill / dense prefill tokens."""
        self.steps += 1
        self.decode_tokens += decode_tokens
        self.sparse_prefill_tokens += sparse_tokens
        self.dense_prefill_tokens += dense_tokens
        metrics.record_step(sparse_tokens, dense_tokens)

    def density_due(self) -> bool:
        """Whether the impl should compute a density sample now (a log line is due)."""
        return 0 < self.log_interval_s <= time.monotonic() - self._last_log

    def record_density(self, density: float, layer: str | None = None) -> None:
        """Add one sparse-mask density sample (one layer of one step)."""
        self.density_sum += density
        self.density_samples += 1
        self.last_density = density
        if layer is not None:
            acc = self.layer_density.setdefault(layer, [0.0, 0])
            acc[0] += density
            acc[1] += 1
        metrics.record_step(0, 0, density)

    def record_head_density(self, densities: list[float], layer: str) -> None:
        """Add one per-KV-head density sample of `layer` (one mask: a density per head).

        A layer's samples are expected to have the same head count; a longer sample
        extends its accumulators.
        """
        accs = self.layer_head_density.setdefault(layer, [])
        accs.extend([0.0, 0] for _ in range(len(densities) - len(accs)))
        for acc, d in zip(accs, densities):
            acc[0] += d
            acc[1] += 1

    def add_sample(
        self, values: list[float], masks: int, heads: list[int], layer: str | None
    ) -> None:
        """Record one layer's sample: `values` holds the densities of its `masks` sparse
        masks, then (if `heads` lists each mask's KV-head count) their per-head densities."""
        for d in values[:masks]:
            self.record_density(d, layer)
        start = masks
        for n in heads:
            if layer is not None:
                self.record_head_density(values[start : start + n], layer)
            start += n

    def defer_sample(
        self, values: torch.Tensor, masks: int, heads: list[int], layer: str | None
    ) -> None:
        """`add_sample` for values still on the device, without a sync: an asynchronous
        copy to pinned host memory, counted once it has landed (CPU values: at once)."""
        host, done = to_host_async(values)
        if done is None:
            self.add_sample(host.tolist(), masks, heads, layer)
            return
        self._pending.append((done, host, masks, heads, layer))

    def collect(self, wait: bool = False) -> None:
        """Count the deferred samples whose copies have landed (all of them, waiting for
        the copies, if `wait`), in the order they were taken."""
        while self._pending:
            done, host, masks, heads, layer = self._pending[0]
            if wait:
                done.synchronize()
            elif not done.query():
                return
            self._pending.pop(0)
            self.add_sample(host.tolist(), masks, heads, layer)

    def mean_density(self) -> float | None:
        return self.density_sum / self.density_samples if self.density_samples else None

    def maybe_log(self) -> None:
        """Log one line with the totals once the interval has passed (called per step).

        The first step after the interval only lets the impl take density samples; the
        line follows at the next step, or at once if samples already arrived.
        """
        self.collect()
        if not self.density_due():
            return
        if self.density_samples == self._samples_at_log and not self._waited:
            self._waited = True
            return
        self._last_log = time.monotonic()
        self._samples_at_log = self.density_samples
        self._waited = False
        mean = self.mean_density()
        logger.info(
            "PBS prefill: %d steps, %d sparse / %d dense prefill tokens, %d decode tokens, "
            "mean density %s (last %s, %d samples)",
            self.steps,
            self.sparse_prefill_tokens,
            self.dense_prefill_tokens,
            self.decode_tokens,
            "n/a" if mean is None else f"{mean:.3f}",
            "n/a" if self.last_density is None else f"{self.last_density:.3f}",
            self.density_samples,
        )

    def snapshot(self) -> dict[str, float | int | None]:
        """The counters and mean density as a plain dict (deferred samples included:
        waits for their copies)."""
        self.collect(wait=True)
        return {
            "steps": self.steps,
            "decode_tokens": self.decode_tokens,
            "sparse_prefill_tokens": self.sparse_prefill_tokens,
            "dense_prefill_tokens": self.dense_prefill_tokens,
            "density_samples": self.density_samples,
            "mean_density": self.mean_density(),
            "last_density": self.last_density,
            "density_per_layer": {k: v[0] / v[1] for k, v in self.layer_density.items()},
            "density_per_layer_head": {
                k: [s / n if n else None for s, n in heads]
                for k, heads in self.layer_head_density.items()
            },
        }


STATS = PBSStats()

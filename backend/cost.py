"""Predicted time of one layer's prefill attention: the stock kernel against PBS, from rates
measured per GPU and kept in one table (`RATES`). No vLLM or torch inside.

For one layer and step, with F the FLOPs of the step's causal attention (4 x head_dim x
query heads x causal (query, key) pairs, summed over its prefill sequences):

    stock(F)    = F / R                                   R: stock FA3's causal prefill rate
    pbs(F, d)   = max(host, estimate + attend_fixed + d * F_sparse / (e * R) + F_dense / (e * R))

d is the density of the step's sparse masks (the computed fraction of their candidate key
blocks), e PBS's rate per computed block against R (by attention route), F_dense the part
of the step that PBS attends with a full mask (sequences below `dense_fallback_len` beside
sparse ones), host the host time of one PBS layer call (launches; the GPU overlaps it with
the layer's other work only up to the GPU work itself), estimate = a fixed part + a part
per key (pooling, permutation) + a part per causal pair (the strided scores).

`max(host, ...)` holds only while no layer waits for the GPU: routing reads each step's
densities without a sync (`backend/routing.py`). When it read them with one sync per
layer, host and GPU time added up instead, and the routed tau 0.9 path lost at 16K / 30K
on the 0.5B model where the same masks unrouted won (H100, 2026-12-07, docs/benchmarks.md).

The break-even density of a step (`CostModel.switch_above`) is the density from which the
stock kernel is predicted faster, with a `margin`: PBS must be predicted `margin` faster
than the stock kernel to be chosen. Where not even an empty mask would win (a short or
host-bound step), it is 0 and the step goes to the stock kernel unestimated.

How the table's Hopper row reproduces the measurements it comes from (Qwen2.5-Coder-0.5B,
14 q / 2 KV heads, d 64, tau 0.9, H100, docs/benchmarks.md): FA3's TTFT with 24 layers'
attention replaced by the prediction at the measured density gives 38 / 54 / 109 ms at
8K / 16K / 30K, measured 41 / 56 / 114 ms (FA3: 27 / 62 / 152 ms). At 8K stock attention
takes 0.26 ms per layer against PBS's 0.7 ms of host time: no density wins there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuRates:
    """Measured costs of one GPU kind (`name`: a substring of the CUDA device name).

    dense_tflops: stock FA3's causal prefill rate per head dim (TFLOP/s; the nearest listed
    head dim stands in for others). efficiency: PBS attention's rate per computed block as a
    fraction of that, per route ('fa3', 'triton'). host_ms: host time of one PBS layer
    call, 'eager' (every kernel launched from Python) or 'graphs' (step graphs replayed).
    estimate_*: estimation's GPU time, fixed per call, per key x KV head x head dim, and per
    causal pair x query head x head dim (ms). attend_fixed_ms: the attention's fixed GPU
    time per call (page tables, scratch gather launches).
    """

    name: str
    dense_tflops: Mapping[int, float]
    efficiency: Mapping[str, float]
    host_ms: Mapping[str, float]
    estimate_fixed_ms: float
    estimate_ms_per_key: float
    estimate_ms_per_pair: float
    attend_fixed_ms: float
    source: str = ""

    def rate(self, head_dim: int) -> float:
        """Stock rate in FLOP per ms at `head_dim` (the nearest listed head dim)."""
        nearest = min(self.dense_tflops, key=lambda d: (abs(d - head_dim), d))
        return self.dense_tflops[nearest] * 1e9


# H100 and H200 share the GH100's compute (132 SMs); FA3's rates and the real model's
# time to first token agree within 4% between the two cards (docs/benchmarks.md).
_HOPPER = dict(
    # fa3_dense, bench_kernels.py, H200 2026-12-03: 469-474 TFLOP/s at d 64, 601-602 at d 128
    dense_tflops={64: 470.0, 128: 600.0},
    # PBS through FA3 per computed block: 0.84-1.01 from 25% density up (0.71 at 10%, 32K);
    # the Triton kernel: 0.59-0.72
    efficiency={"fa3": 0.85, "triton": 0.66},
    # bench_layers.py, 24 layers at the Qwen shape, H100 2026-12-07: 0.66-0.71 ms of host
    # time per layer eager, 0.13-0.14 ms with step graphs
    host_ms={"eager": 0.7, "graphs": 0.15},
    # estimation at tau 0.9: 0.72 ms at 32K and 4.13 ms at 128K (Llama shape), 2.94 ms for a
    # 16K chunk over 128K keys, ~0.19 ms per 16K chunk at the Qwen shape (30K profile)
    estimate_fixed_ms=0.1,
    estimate_ms_per_key=1.84e-8,
    estimate_ms_per_pair=4.7e-14,
    attend_fixed_ms=0.03,
    source="docs/benchmarks.md: Hopper path (H200, 2026-12-03), step graphs (H100, 2026-12-07)",
)

RATES: tuple[GpuRates, ...] = (
    GpuRates(name="H200", **_HOPPER),
    GpuRates(name="H100", **_HOPPER),
)


def rates_for(device_name: str | None) -> GpuRates | None:
    """The table's row for a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    if not device_name:
        return None
    upper = device_name.upper()
    return next((r for r in RATES if r.name.upper() in upper), None)


@dataclass(frozen=True)
class StepWork:
    """What a step's prefills cost, summed over its sequences: causal (query, key) pairs
    of the sparse and of the dense-mask sequences, and the keys the sparse ones read."""

    sparse_pairs: int = 0
    dense_pairs: int = 0
    sparse_keys: int = 0

    @staticmethod
    def of(runs: Sequence[tuple[Sequence[int], Sequence[int], bool]]) -> StepWork:
        """From (q_lens, ctx_lens, dense) per prefill run."""
        sparse = dense = keys = 0
        for q_lens, ctx_lens, is_dense in runs:
            pairs = sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, ctx_lens))
            if is_dense:
                dense += pairs
            else:
                sparse += pairs
                keys += sum(q + c for q, c in zip(q_lens, ctx_lens))
        return StepWork(sparse, dense, keys)


@dataclass(frozen=True)
class CostModel:
    """Predicted times (ms) of one layer's prefill attention for a model's per-rank shape on
    one GPU kind; `margin`: how much faster PBS must be predicted to be chosen."""

    rates: GpuRates
    num_heads: int
    num_kv_heads: int
    head_size: int
    margin: float = 0.05
    _flops_per_pair: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin={self.margin}: must be in [0, 1)")
        object.__setattr__(self, "_flops_per_pair", 4.0 * self.head_size * self.num_heads)

    def stock_ms(self, work: StepWork) -> float:
        """The stock kernel's attention of every prefill sequence of the step."""
        pairs = work.sparse_pairs + work.dense_pairs
        return pairs * self._flops_per_pair / self.rates.rate(self.head_size)

    def estimate_ms(self, work: StepWork) -> float:
        """Estimation (scores, permutation, selection) of the step's sparse sequences."""
        if not work.sparse_pairs:
            return 0.0
        r = self.rates
        return (
            r.estimate_fixed_ms
            + r.estimate_ms_per_key * work.sparse_keys * self.num_kv_heads * self.head_size
            + r.estimate_ms_per_pair * work.sparse_pairs * self.num_heads * self.head_size
        )

    def _efficiency(self, route: str) -> float:
        try:
            return self.rates.efficiency[route]
        except KeyError:
            raise ValueError(
                f"route={route!r}: the rates of {self.rates.name} know {sorted(self.rates.efficiency)}"
            ) from None

    def pbs_ms(self, work: StepWork, density: float, route: str, graphs: bool = False) -> float:
        """PBS at `density` (of the sparse sequences' masks): estimation and attention."""
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density={density}: must be in [0, 1]")
        slow = self.rates.rate(self.head_size) * self._efficiency(route)
        gpu = (
            self.estimate_ms(work)
            + self.rates.attend_fixed_ms
            + (density * work.sparse_pairs + work.dense_pairs) * self._flops_per_pair / slow
        )
        return max(self.rates.host_ms["graphs" if graphs else "eager"], gpu)

    def switch_above(self, work: StepWork, route: str, graphs: bool = False) -> float:
        """The density from which the stock kernel is predicted faster than PBS (PBS must
        be `margin` faster to be chosen): 0.0 where no density wins (also a step without
        sparse sequences), infinity where every one does, a full mask included."""
        if not work.sparse_pairs:
            return 0.0
        budget = (1.0 - self.margin) * self.stock_ms(work)
        if self.pbs_ms(work, 0.0, route, graphs) >= budget:
            return 0.0
        if self.pbs_ms(work, 1.0, route, graphs) < budget:
            return math.inf
        fixed = self.estimate_ms(work) + self.rates.attend_fixed_ms
        slow = self.rates.rate(self.head_size) * self._efficiency(route)
        per_density = work.sparse_pairs * self._flops_per_pair / slow
        fixed += work.dense_pairs * self._flops_per_pair / slow
        return max(0.0, (budget - fixed) / per_density)

"""Which prefills run sparse and which go to the stock kernel: every such decision, no vLLM
or torch inside (unit-tested on its own).

Per request and step, in the metadata builder: `prefill_is_dense` (below
`dense_fallback_len`: stock, unestimated), `step_can_switch` (whether the step's layers
may switch after estimation) and `step_switch_above`: the step's break-even density, from
which the stock kernel attends the step faster than PBS would. With `dense_above` "auto"
it is the cost model's prediction for the step's lengths on this GPU (`backend/cost.py`);
0 (no density could win: a short, host-bound step) sends the whole step to the stock
kernel unestimated (`no_density_wins`). A number is a fixed break-even density.

Then one `LayerRouting` object per layer, its state explicit, decides per layer and step
in `PBSAttentionImpl.forward`, before estimation, `held(step)`: the layer's last switch to
the stock kernel predicts, through the fall of density with context (`DENSITY_FALLOFF`, or
slower where the layer's own readings showed it), a density at this step's length at or
above the step's break-even, so the step goes to the stock kernel unestimated; each held
step uses up one of the `dense_hold_steps` steps a switch grants (without it, a model whose
masks never win, e.g. random weights, would pay for estimation in every step).

A switch comes from a reading, `observe(step, densities)`: an estimated step's density
(its sparse masks' densities weighted by their causal pairs) at or above its break-even
switches the layer and remembers that density; a step that could have switched and came
out sparse ends the hold. The reading reaches routing at the layer's next call, never in
the step that measured it: the densities travel to the host without a sync, so that step
runs PBS whatever they say. Reading them at once would need a host sync in every layer,
which serialises the layer's host time with its GPU time; on Qwen2.5-Coder-0.5B that cost
more than PBS saved at 16K-30K (docs/benchmarks.md). The price of the lag: the step that
first finds a layer dense runs it on PBS (for a long prefill its first chunk, the cheapest).

Holding needs the step to carry the stock metadata of all its rows
(`StepView.can_switch`: `dense_above` set and no decodes in the step); `needs_densities`
says which steps produce readings (the same ones; the stats take their own samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pbs_vllm.backend.cost import CostModel, StepWork

# How density falls with context: d(L) ~ L ** -DENSITY_FALLOFF. Measured on
# Qwen2.5-Coder-0.5B with code prompts at tau 0.9 (docs/benchmarks.md): 0.31-0.35 from 8K
# to 30K, 0.43 from 64K to 127K (YaRN); at tau 0.99 (the default) 0.15 from 8K to 30K and
# 0.30 from 64K to 127K. Random weights do not fall at all. A falloff assumed too fast
# only makes a hold end earlier than it could (the layer then measures again).
DENSITY_FALLOFF = 0.35

# The break-even density `dense_above: "auto"` uses where the cost model has no rates
# (the CPU, GPUs without a row in backend/cost.py's table, layers of mixed shapes): the
# Triton kernel's measured crossover against FA3 (docs/method.md).
AUTO_FALLBACK_ABOVE = 0.6


def prefill_is_dense(seq_len: int, dense_fallback_len: int) -> bool:
    """Per request, in the metadata builder: a prefill whose sequence is shorter than
    `dense_fallback_len` runs on the stock kernel, unestimated (below the length at which
    PBS was measured to win, or to keep the model's answers)."""
    return seq_len < dense_fallback_len


def step_can_switch(switch_above: float | None, num_decodes: int) -> bool:
    """Per step, in the metadata builder: whether its layers may switch to the stock
    kernel after estimation (a break-even density a mask can reach, `step_switch_above`),
    so the builder must also build stock metadata for all rows (`StepView.can_switch`).
    Only without decodes: two stock builds in one step could share the stock builder's
    persistent buffers (FA3's scheduler metadata under full CUDA graphs)."""
    return switch_above is not None and switch_above <= 1.0 and num_decodes == 0


def step_switch_above(
    dense_above: float | str | None,
    cost: CostModel | None,
    work: StepWork,
    route: str,
    graphs: bool = False,
) -> float | None:
    """Per step, in the metadata builder: the step's break-even density (None: never
    switch). dense_above "auto" asks `cost` (None: `AUTO_FALLBACK_ABOVE`); a number is
    used as it is."""
    if dense_above is None:
        return None
    if dense_above == "auto":
        if cost is None:
            return AUTO_FALLBACK_ABOVE
        return cost.switch_above(work, route, graphs)
    if isinstance(dense_above, str) or not 0.0 < dense_above <= 1.0:
        raise ValueError(f"dense_above={dense_above!r}: must be in (0, 1], 'auto' or None")
    return float(dense_above)


def no_density_wins(switch_above: float | None) -> bool:
    """Whether the step's break-even density is 0: no mask, however sparse, is predicted
    to beat the stock kernel, so the step goes there unestimated."""
    return switch_above is not None and switch_above <= 0.0


@dataclass(frozen=True)
class StepView:
    """What routing reads from a step: can_switch (the step holds stock metadata for all
    of its rows), longest (its longest prefill sequence, in tokens), switch_above (its
    break-even density; None: never switch) and weights (each sparse mask's causal pairs,
    in the order of the densities; empty: equal weights)."""

    can_switch: bool
    longest: int
    switch_above: float | None = None
    weights: tuple[int, ...] = ()

    def density(self, densities: Sequence[float]) -> float:
        """The step's density: its sparse masks' densities, weighted by their pairs."""
        if not self.weights or len(self.weights) != len(densities) or not sum(self.weights):
            return sum(densities) / len(densities)
        return sum(w * d for w, d in zip(self.weights, densities)) / sum(self.weights)


@dataclass
class LayerRouting:
    """Routing state of one attention layer.

    hold_steps: the steps a switch holds on the stock kernel, at most.
    held_steps: steps the last switch still grants; switch_density / switch_len: the
    density and longest sequence of that switch, from which `predicted_density` carries
    the layer's density to other lengths, falling as `falloff` says: what the last reading
    at a longer sequence than the last switch showed, between 0 and DENSITY_FALLOFF (the
    prior, until then). Random weights do not fall, so a layer of theirs found dense again
    at a longer sequence is then held for the rest of a long prefill instead of being
    measured on PBS again and again.
    """

    hold_steps: int = 1
    held_steps: int = 0
    switch_density: float = 0.0
    switch_len: int = 0
    falloff: float = DENSITY_FALLOFF

    def __post_init__(self) -> None:
        if self.hold_steps < 1:
            raise ValueError(f"hold_steps={self.hold_steps}: must be >= 1")

    @staticmethod
    def _can_switch(step: StepView) -> bool:
        return step.can_switch and step.switch_above is not None

    def predicted_density(self, length: int) -> float:
        """The layer's density at `length` as its last switch predicts it: that switch's
        density, falling as `falloff` says past that switch's length (a shorter sequence
        is predicted no sparser)."""
        if self.switch_len <= 0:
            return 0.0
        return self.switch_density * (max(length, self.switch_len) / self.switch_len) ** (
            -self.falloff
        )

    def held(self, step: StepView) -> bool:
        """Whether this step runs on the stock kernel without estimation (uses one held
        step when it does)."""
        if not self._can_switch(step) or self.held_steps <= 0:
            return False
        if self.predicted_density(step.longest) >= step.switch_above:
            self.held_steps -= 1
            return True
        return False

    def needs_densities(self, step: StepView) -> bool:
        """Whether this step's masks' densities are a reading for `observe`: only where
        the layer could switch (stats samples are taken apart from it)."""
        return self._can_switch(step)

    def observe(self, step: StepView, densities: list[float] | None) -> bool:
        """A reading of an estimated step (handed over at the layer's next call): whether
        it switches the layer to the stock kernel for the steps `held` grants. densities:
        of the step's sparse masks (None or empty: not read, so no switch)."""
        if not self._can_switch(step) or not densities:
            return False
        density = step.density(densities)
        if 0 < self.switch_len < step.longest and self.switch_density > 0 and density > 0:
            # measured further on than the last switch: how fast the density fell
            shown = math.log(self.switch_density / density) / math.log(
                step.longest / self.switch_len
            )
            self.falloff = min(max(shown, 0.0), DENSITY_FALLOFF)
        if density >= step.switch_above:
            self.held_steps = self.hold_steps
            self.switch_density, self.switch_len = density, step.longest
            return True
        self.held_steps = 0  # sparse where it could have switched
        return False

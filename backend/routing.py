"""Which prefills run sparse and which go to the stock kernel: every such decision, no vLLM
or torch inside (unit-tested on its own).

Per request and step, in the metadata builder: `prefill_is_dense` (below
`dense_fallback_len`: stock, unestimated) and `step_can_switch` (whether the step's layers
may switch after estimation). Then one `LayerRouting` object per layer, its state
explicit, takes two decisions per layer and step in `PBSAttentionImpl.forward`:

1. before estimation, `held(step)`: a recent step of this layer came out too dense, and
   its density, carried to this step's length by the fall of density with context
   (`DENSITY_FALLOFF`), still predicts a mask too dense, so this step goes to the stock
   kernel unestimated; each held step uses up one of the `dense_hold_steps` - 1 steps the
   switch granted;
2. after estimation, `switch(step, densities)`: every sparse mask of the layer keeps at
   least `dense_above` of its blocks, so the stock kernel attends the whole step densely
   (faster than PBS at that density) and a hold starts; a step that could have switched
   and came out sparse ends the hold.

Both need the step to carry the stock metadata of all its rows (`StepView.can_switch`:
`dense_above` set and no decodes in the step). The densities cost one host sync, so
`needs_densities` says when they must be read: only when the switch can happen (the
stats take their samples without a sync, `backend/stats.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

# How density falls with context: d(L) ~ L ** -DENSITY_FALLOFF. Measured on
# Qwen2.5-Coder-0.5B with code prompts at tau 0.9 (docs/benchmarks.md): 0.31-0.35 from 8K
# to 30K, 0.43 from 64K to 127K (YaRN); random weights do not fall at all, which only
# makes a hold end earlier than it could.
DENSITY_FALLOFF = 0.35


def prefill_is_dense(seq_len: int, dense_fallback_len: int) -> bool:
    """Per request, in the metadata builder: a prefill whose sequence is shorter than
    `dense_fallback_len` runs on the stock kernel, unestimated (below the length at which
    PBS was measured to win, or to keep the model's answers)."""
    return seq_len < dense_fallback_len


def step_can_switch(dense_above: float | None, num_decodes: int) -> bool:
    """Per step, in the metadata builder: whether its layers may switch to the stock
    kernel after estimation, so the builder must also build stock metadata for all rows
    (`StepView.can_switch`). Only without decodes: two stock builds in one step could
    share the stock builder's persistent buffers (FA3's scheduler metadata under full
    CUDA graphs)."""
    return dense_above is not None and num_decodes == 0


@dataclass(frozen=True)
class StepView:
    """What routing reads from a step: can_switch (the step holds stock metadata for all
    of its rows) and longest (its longest prefill sequence, in tokens)."""

    can_switch: bool
    longest: int


@dataclass
class LayerRouting:
    """Routing state of one attention layer.

    dense_above: the kept-block fraction from which a layer's step goes to the stock
    kernel (None: never). hold_steps: steps a switch covers, itself included (1: every
    step is estimated). held_steps / held_up_to: steps left on the stock kernel, and the
    longest sequence they may have: the length at which the switching step's lowest
    density, falling as `DENSITY_FALLOFF` says, would reach `dense_above`.
    """

    dense_above: float | None
    hold_steps: int = 1
    held_steps: int = 0
    held_up_to: int = 0

    def __post_init__(self) -> None:
        if self.dense_above is not None and not 0.0 < self.dense_above <= 1.0:
            raise ValueError(f"dense_above={self.dense_above}: must be in (0, 1] or None")
        if self.hold_steps < 1:
            raise ValueError(f"hold_steps={self.hold_steps}: must be >= 1")

    def _can_switch(self, step: StepView) -> bool:
        return step.can_switch and self.dense_above is not None

    def held(self, step: StepView) -> bool:
        """Whether this step runs on the stock kernel without estimation (uses one held
        step when it does)."""
        if self._can_switch(step) and self.held_steps > 0 and step.longest <= self.held_up_to:
            self.held_steps -= 1
            return True
        return False

    def needs_densities(self, step: StepView) -> bool:
        """Whether the masks' densities must be read (a host sync) for this step: only
        where the switch can happen (stats samples never need one)."""
        return self._can_switch(step)

    def switch(self, step: StepView, densities: list[float] | None) -> bool:
        """After estimation: whether the whole step goes to the stock kernel. densities:
        of the step's sparse masks (None or empty: not read, so no switch)."""
        if not self._can_switch(step):
            return False
        if densities and all(d >= self.dense_above for d in densities):
            self.held_steps = self.hold_steps - 1
            reach = (min(densities) / self.dense_above) ** (1.0 / DENSITY_FALLOFF)
            self.held_up_to = max(self.held_up_to, int(step.longest * reach))
            return True
        if densities:
            self.held_steps = self.held_up_to = 0  # sparse where it could have switched
        return False

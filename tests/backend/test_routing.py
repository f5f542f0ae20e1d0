"""The per-layer routing state machine (`backend/routing.py`), without vLLM or torch."""

from __future__ import annotations

import pytest

from pbs_vllm.backend.routing import LayerRouting, StepView

SWITCHABLE = StepView(can_switch=True, longest=1000)
WITH_DECODES = StepView(can_switch=False, longest=1000)


def test_no_switch_without_dense_above():
    r = LayerRouting(dense_above=None, hold_steps=8)
    assert not r.needs_densities(SWITCHABLE)  # stats samples never need a sync
    assert not r.switch(SWITCHABLE, [1.0])
    assert not r.held(SWITCHABLE)


def test_switch_needs_every_mask_dense():
    r = LayerRouting(dense_above=0.6, hold_steps=1)
    assert r.needs_densities(SWITCHABLE)
    assert not r.needs_densities(WITH_DECODES)
    assert not r.switch(SWITCHABLE, [0.9, 0.5])
    assert r.switch(SWITCHABLE, [0.9, 0.6])
    assert not r.switch(SWITCHABLE, None)  # densities not read: no switch
    assert not r.switch(WITH_DECODES, [1.0])  # no stock metadata for all rows


@pytest.mark.parametrize("hold", [1, 2, 5])
def test_switch_holds_for_hold_steps_minus_one(hold):
    r = LayerRouting(dense_above=0.6, hold_steps=hold)
    assert r.switch(SWITCHABLE, [0.95])
    held = [r.held(SWITCHABLE) for _ in range(hold + 2)]
    assert held == [True] * (hold - 1) + [False] * 3


def test_hold_covers_only_steps_no_longer_than_the_switch():
    """At the switch's own density (dense_above itself) no longer step is held."""
    r = LayerRouting(dense_above=0.6, hold_steps=4)
    assert r.switch(StepView(True, 500), [0.6])
    assert not r.held(StepView(True, 501))  # longer: estimate (masks may be sparser)
    assert r.held(StepView(True, 500))
    assert not r.held(StepView(False, 100))  # decodes in the step: never held
    assert r.held(StepView(True, 10))
    assert r.switch(StepView(True, 800), [0.6])  # a longer switch raises the bound
    assert r.held_up_to == 800 and r.held_steps == 3


@pytest.mark.parametrize("density", [0.65, 0.8, 0.95])
def test_hold_reaches_the_length_where_density_would_fall_to_dense_above(density):
    """A dense switch holds longer steps (the later chunks of a long prefill) while its
    density, falling with context as DENSITY_FALLOFF says, stays at least dense_above."""
    from pbs_vllm.backend.routing import DENSITY_FALLOFF

    r = LayerRouting(dense_above=0.6, hold_steps=8)
    assert r.switch(StepView(True, 16384), [0.99, density])  # the lowest density counts
    reach = 16384 * (density / 0.6) ** (1 / DENSITY_FALLOFF)
    assert r.held_up_to == int(reach)
    assert r.held(StepView(True, int(reach)))
    assert not r.held(StepView(True, int(reach) + 1))
    # random weights (density 0.9 at 16K) hold a 64K prefill's 32K and 48K chunks
    if density >= 0.9:
        assert r.held(StepView(True, 32768)) and r.held(StepView(True, 49152))


def test_sparse_step_ends_the_hold():
    r = LayerRouting(dense_above=0.6, hold_steps=8)
    assert r.switch(SWITCHABLE, [0.9])
    assert not r.switch(StepView(True, 2000), [0.3])
    assert (r.held_steps, r.held_up_to) == (0, 0)
    assert not r.held(SWITCHABLE)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="dense_above=1.5"):
        LayerRouting(dense_above=1.5)
    with pytest.raises(ValueError, match="hold_steps=0"):
        LayerRouting(dense_above=0.6, hold_steps=0)


def test_step_rules_of_the_builder():
    from pbs_vllm.backend.routing import prefill_is_dense, step_can_switch

    assert prefill_is_dense(65535, 65536) and not prefill_is_dense(65536, 65536)
    assert not prefill_is_dense(10, 0)  # 0: every prefill runs PBS
    assert step_can_switch(0.6, 0)
    assert not step_can_switch(0.6, 3)  # decodes in the step
    assert not step_can_switch(None, 0)

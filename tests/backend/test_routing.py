"""The per-layer routing state machine (`backend/routing.py`) and the cost model behind
`dense_above: auto` (`backend/cost.py`), without vLLM or torch."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pbs_vllm.backend.cost import RATES, CostModel, StepWork, rates_for
from pbs_vllm.backend.routing import (
    AUTO_FALLBACK_ABOVE,
    DENSITY_FALLOFF,
    LayerRouting,
    StepView,
    no_density_wins,
    prefill_is_dense,
    step_can_switch,
    step_switch_above,
)

SWITCHABLE = StepView(can_switch=True, longest=1000, switch_above=0.6)
WITH_DECODES = StepView(can_switch=False, longest=1000, switch_above=0.6)
H100 = "NVIDIA H100 80GB HBM3"


def step(longest: int, above: float | None = 0.6, weights=()) -> StepView:
    return StepView(True, longest, above, tuple(weights))


def test_no_switch_without_a_break_even_density():
    r = LayerRouting(hold_steps=8)
    never = StepView(True, 1000, None)
    assert not r.needs_densities(never)  # stats samples never need a sync
    assert not r.observe(never, [1.0])
    assert not r.held(never)
    assert not r.observe(step(1000, math.inf), [1.0])  # every density wins: never switch


def test_switch_reads_the_steps_weighted_density():
    r = LayerRouting(hold_steps=1)
    assert r.needs_densities(SWITCHABLE)
    assert not r.needs_densities(WITH_DECODES)
    assert not r.observe(SWITCHABLE, [0.9, 0.2])  # mean 0.55
    assert r.observe(SWITCHABLE, [0.9, 0.3])  # mean 0.6
    # weighted by causal pairs: the long run's sparse mask dominates
    assert not r.observe(step(1000, weights=(1, 9)), [0.95, 0.5])
    assert r.observe(step(1000, weights=(9, 1)), [0.95, 0.5])
    assert not r.observe(SWITCHABLE, None)  # densities not read: no switch
    assert not r.observe(WITH_DECODES, [1.0])  # no stock metadata for all rows


@pytest.mark.parametrize("hold", [1, 2, 5])
def test_switch_holds_for_hold_steps(hold):
    r = LayerRouting(hold_steps=hold)
    assert r.observe(SWITCHABLE, [0.95])
    held = [r.held(SWITCHABLE) for _ in range(hold + 2)]
    assert held == [True] * hold + [False] * 2


def test_hold_covers_only_steps_no_longer_than_the_switch():
    """At the switch's own density (the break-even itself) no longer step is held."""
    r = LayerRouting(hold_steps=4)
    assert r.observe(step(500), [0.6])
    assert not r.held(step(501))  # longer: estimate (masks may be sparser)
    assert r.held(step(500))
    assert not r.held(StepView(False, 100, 0.6))  # decodes in the step: never held
    assert r.held(step(10))
    assert r.observe(step(800), [0.6])  # a later switch replaces the prediction
    assert (r.switch_len, r.held_steps) == (800, 4)


@pytest.mark.parametrize("density", [0.65, 0.8, 0.95])
def test_hold_reaches_the_length_where_density_would_fall_to_the_break_even(density):
    """A switch holds longer steps (the later chunks of a long prefill) while its density,
    falling with context as DENSITY_FALLOFF says, stays at least the step's break-even."""
    r = LayerRouting(hold_steps=8)
    assert r.observe(step(16384, weights=(1, 1000)), [0.99, density])
    reach = 16384 * (r.switch_density / 0.6) ** (1 / DENSITY_FALLOFF)
    assert r.held(step(int(reach) - 1))
    assert not r.held(step(int(reach) + 2))
    # a step with a higher break-even is held less far
    assert not r.held(step(int(reach) - 1, above=0.99))
    if density >= 0.9:  # random weights: a 64K prefill's later chunks are held
        assert r.held(step(32768)) and r.held(step(49152))


def test_a_layer_dense_again_further_on_learns_its_slower_falloff():
    """Random weights: the hold of a switch at 16K ends where DENSITY_FALLOFF says the
    density would fall below the break-even (~2.4x the length); the layer measured dense
    there again (no fall) is then held over the rest of a long prefill."""
    r = LayerRouting(hold_steps=8)
    assert r.observe(step(16384, above=0.75), [0.99])
    assert r.held(step(32768, above=0.75))
    assert not r.held(step(49152, above=0.75))  # predicted 0.67: measure again
    assert r.observe(step(49152, above=0.75), [0.99])  # still dense
    assert r.falloff == 0.0
    assert all(r.held(step(n, above=0.78)) for n in range(65536, 180000, 16384))
    # a real model's layer whose density fell faster than the prior: the prior stays
    r = LayerRouting(hold_steps=8)
    assert r.observe(step(16384), [0.9])
    assert r.observe(step(65536), [0.6])  # fell as L ** -0.29
    assert r.falloff == pytest.approx(math.log(0.9 / 0.6) / math.log(4))
    assert r.observe(step(131072), [0.61])  # then no fall at all
    assert r.falloff == 0.0
    assert not r.observe(step(262144), [0.2])  # a sparse reading further on shows a fall
    assert r.falloff == DENSITY_FALLOFF  # clamped to the prior
    # a reading at a shorter sequence than the last switch teaches nothing
    r.falloff = 0.1
    assert not r.observe(step(100000), [0.3]) and r.falloff == 0.1


def test_sparse_step_ends_the_hold():
    r = LayerRouting(hold_steps=8)
    assert r.observe(SWITCHABLE, [0.9])
    assert not r.observe(step(2000), [0.3])
    assert r.held_steps == 0
    assert not r.held(SWITCHABLE)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="hold_steps=0"):
        LayerRouting(hold_steps=0)
    work = StepWork.of([([100], [0], False)])
    with pytest.raises(ValueError, match="dense_above=1.5"):
        step_switch_above(1.5, None, work, "fa3")
    with pytest.raises(ValueError, match="dense_above='always'"):
        step_switch_above("always", None, work, "fa3")


def test_step_rules_of_the_builder():
    assert prefill_is_dense(65535, 65536) and not prefill_is_dense(65536, 65536)
    assert not prefill_is_dense(10, 0)  # 0: every prefill runs PBS
    assert step_can_switch(0.6, 0)
    assert not step_can_switch(0.6, 3)  # decodes in the step
    assert not step_can_switch(None, 0)
    assert not step_can_switch(math.inf, 0)  # no density switches: no stock metadata
    assert no_density_wins(0.0) and not no_density_wins(None) and not no_density_wins(0.3)


def test_break_even_of_a_number_of_auto_and_of_none():
    work = StepWork.of([([16384], [0], False)])
    cost = CostModel(rates_for(H100), 14, 2, 64)
    assert step_switch_above(0.7, cost, work, "fa3") == 0.7  # a number is used as it is
    assert step_switch_above(None, cost, work, "fa3") is None
    assert step_switch_above("auto", None, work, "fa3") == AUTO_FALLBACK_ABOVE
    assert step_switch_above("auto", cost, work, "fa3") == cost.switch_above(work, "fa3")


# ------------------------------------------------------------------------- cost model


def test_rates_table_lookup():
    assert rates_for(H100).name == "H100"
    assert rates_for("NVIDIA H200").name == "H200"
    assert rates_for("NVIDIA A100-SXM4-80GB") is None
    assert rates_for(None) is None and rates_for("") is None
    for r in RATES:
        assert set(r.host_ms) == {"eager", "graphs"} and set(r.efficiency) >= {"fa3", "triton"}
        assert 0 < r.efficiency["triton"] <= r.efficiency["fa3"] <= 1


def test_step_work_counts_causal_pairs_and_keys():
    w = StepWork.of([([3, 2], [0, 5], False), ([4], [1], True)])
    assert w.sparse_pairs == (3 * 4 // 2) + (2 * 5 + 2 * 3 // 2)
    assert w.dense_pairs == 4 * 1 + 4 * 5 // 2
    assert w.sparse_keys == 3 + 7


def test_pbs_time_is_host_bound_below_and_linear_in_density_above():
    m = CostModel(rates_for(H100), 14, 2, 64)
    w = StepWork.of([([30720], [0], False)])
    assert m.pbs_ms(w, 0.0, "fa3") == m.rates.host_ms["eager"]  # host-bound at density 0
    t = [m.pbs_ms(w, d, "fa3") for d in (0.5, 0.75, 1.0)]
    assert t[1] - t[0] == pytest.approx(t[2] - t[1])
    assert m.pbs_ms(w, 1.0, "triton") > m.pbs_ms(w, 1.0, "fa3")  # the slower route
    assert m.pbs_ms(w, 0.5, "fa3", graphs=True) <= m.pbs_ms(w, 0.5, "fa3")
    with pytest.raises(ValueError, match="density=1.5"):
        m.pbs_ms(w, 1.5, "fa3")
    with pytest.raises(ValueError, match="route='flex'"):
        m.pbs_ms(w, 0.5, "flex")


def test_break_even_solves_the_margin_equation():
    m = CostModel(rates_for(H100), 32, 8, 128)
    w = StepWork.of([([16384], [49152], False)])
    d = m.switch_above(w, "fa3")
    assert 0 < d < 1
    assert m.pbs_ms(w, d, "fa3") == pytest.approx((1 - m.margin) * m.stock_ms(w))
    assert m.pbs_ms(w, d * 0.99, "fa3") < (1 - m.margin) * m.stock_ms(w)


def test_the_real_models_measured_crossover():
    """Qwen2.5-Coder-0.5B (14 q / 2 KV heads, d 64) on an H100, eager: PBS lost at 8K
    (0.71x, host-bound) and won at 16K and past it (docs/benchmarks.md)."""
    m = CostModel(rates_for(H100), 14, 2, 64)
    at = {n: m.switch_above(StepWork.of([([n], [0], False)]), "fa3") for n in (8192, 16384)}
    assert at[8192] == 0.0  # no density wins: stock, unestimated
    assert 0.5 < at[16384] < 0.8  # the measured 0.38 (tau 0.9) wins
    # a short extend over a long context (a prefix-cache hit) is host-bound too
    assert m.switch_above(StepWork.of([([512], [100_000], False)]), "fa3") == 0.0
    # a later chunk of a long prefill: the break-even rises with the work per call
    later = m.switch_above(StepWork.of([([16384], [114_688], False)]), "fa3")
    assert at[16384] < later < 1


def test_everything_wins_and_nothing_to_win():
    m = CostModel(rates_for(H100), 32, 8, 128, margin=0.0)
    free = CostModel(replace(m.rates, efficiency={"fa3": 1.5, "triton": 1.2}), 32, 8, 128, 0.0)
    w = StepWork.of([([65536], [0], False)])
    assert free.switch_above(w, "fa3") == math.inf
    assert m.switch_above(StepWork.of([([64], [0], True)]), "fa3") == 0.0  # no sparse run
    with pytest.raises(ValueError, match="margin=1.0"):
        CostModel(rates_for(H100), 32, 8, 128, margin=1.0)


@pytest.mark.parametrize(
    ("flash_ms", "chunks", "density", "measured_ms"),
    [
        (27, [(8192, 0)], 0.447, 41),
        (62, [(16384, 0)], 0.376, 56),
        (152, [(16384, 0), (14336, 16384)], 0.295, 114),
    ],
    ids=["8k", "16k", "30k"],
)
def test_the_rates_reproduce_the_measured_ttft(flash_ms, chunks, density, measured_ms):
    """The Hopper row against the measurements it summarises (docs/benchmarks.md, H100,
    2026-12-07, Qwen2.5-Coder-0.5B, tau 0.9, eager): FA3's TTFT with its 24 layers'
    attention replaced by the predicted PBS time lands within 10% of PBS's TTFT."""
    m = CostModel(rates_for(H100), 14, 2, 64)
    saved = 0.0
    for q, ctx in chunks:
        w = StepWork.of([([q], [ctx], False)])
        saved += m.stock_ms(w) - m.pbs_ms(w, density, "fa3")
    assert flash_ms - 24 * saved == pytest.approx(measured_ms, rel=0.1)

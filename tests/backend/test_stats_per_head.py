"""Per-(layer, KV head) density samples of `PBSStats`: recording, snapshot, reset."""

from __future__ import annotations

import pytest

from pbs_vllm.backend.stats import PBSStats


def test_per_head_means_in_snapshot():
    stats = PBSStats()
    stats.record_head_density([0.2, 0.4], "layers.0")
    stats.record_head_density([0.4, 0.8], "layers.0")
    stats.record_head_density([1.0, 0.5, 0.25], "layers.1")
    snap = stats.snapshot()["density_per_layer_head"]
    assert snap["layers.0"] == pytest.approx([0.3, 0.6])
    assert snap["layers.1"] == pytest.approx([1.0, 0.5, 0.25])
    # Per-head samples leave the scalar counters alone.
    assert stats.density_samples == 0 and stats.snapshot()["density_per_layer"] == {}


def test_longer_sample_extends_heads():
    stats = PBSStats()
    stats.record_head_density([0.5], "l")
    stats.record_head_density([0.7, 0.1], "l")
    assert stats.snapshot()["density_per_layer_head"]["l"] == pytest.approx([0.6, 0.1])


def test_reset_clears_per_head():
    stats = PBSStats()
    stats.configure(5.0)
    stats.record_head_density([0.5, 0.5], "l")
    stats.record_density(0.5, "l")
    stats.reset()
    snap = stats.snapshot()
    assert snap["density_per_layer_head"] == {} and snap["density_per_layer"] == {}
    assert stats.log_interval_s == 5.0
    stats.record_head_density([0.25], "m")
    assert stats.snapshot()["density_per_layer_head"] == {"m": [0.25]}


def test_snapshot_is_a_copy():
    stats = PBSStats()
    stats.record_head_density([0.5, 0.5], "l")
    stats.snapshot()["density_per_layer_head"]["l"][0] = 9.0
    assert stats.snapshot()["density_per_layer_head"]["l"] == [0.5, 0.5]


def test_impl_records_per_head_with_the_scalar_densities():
    """`_densities` while a sample is due: one scalar and one per-head sample per
    sparse mask, split from one transfer; dense runs are skipped."""
    from types import SimpleNamespace

    from pbs_vllm.backend.impl import PBSAttentionImpl
    from pbs_vllm.backend.routing import LayerRouting, StepView
    from pbs_vllm.backend.stats import STATS
    from pbs_vllm.kernels import ChunkBatch
    from pbs_vllm.kernels.block_mask import random_block_mask

    masks = [
        random_block_mask(ChunkBatch([40], [150]), 16, 32, 2, 0.3, "cpu", seed=1),
        random_block_mask(ChunkBatch([64, 9], [200, 70]), 16, 32, 2, 0.8, "cpu", seed=2),
    ]
    work = [(SimpleNamespace(dense=False), None, None, mask) for mask in masks]
    work.append((SimpleNamespace(dense=True), None, None, masks[0]))
    impl = SimpleNamespace(routing=LayerRouting(dense_above=None))
    saved = STATS.log_interval_s
    try:
        STATS.reset()
        STATS.configure(1e-9)
        step = StepView(can_switch=False, longest=270)
        densities = PBSAttentionImpl._densities(impl, work, step, "l")
        snap = STATS.snapshot()
    finally:
        STATS.configure(saved)
        STATS.reset()
    assert densities == pytest.approx([m.density() for m in masks])
    assert snap["density_samples"] == 2
    scalars = [m.density() for m in masks]
    heads = [m.density_per_head_tensor().tolist() for m in masks]
    assert snap["density_per_layer"]["l"] == pytest.approx(sum(scalars) / 2)
    want = [(a + b) / 2 for a, b in zip(*heads)]
    assert snap["density_per_layer_head"]["l"] == pytest.approx(want)

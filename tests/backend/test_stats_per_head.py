"""Per-(layer, KV head) density samples of `PBSStats`: recording, snapshot, reset."""

from __future__ import annotations

import pytest
import torch

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
    """`_read_densities` while a sample is due: one scalar and one per-head sample per
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
    impl = SimpleNamespace(routing=LayerRouting(), _reading=None)
    saved = STATS.log_interval_s
    try:
        STATS.reset()
        STATS.configure(1e-9)
        step = StepView(can_switch=False, longest=270)
        PBSAttentionImpl._read_densities(impl, work, step, "l")
        snap = STATS.snapshot()
    finally:
        STATS.configure(saved)
        STATS.reset()
    assert impl._reading is None  # routing cannot switch here: sampled, no reading
    assert snap["density_samples"] == 2
    scalars = [m.density() for m in masks]
    heads = [m.density_per_head_tensor().tolist() for m in masks]
    assert snap["density_per_layer"]["l"] == pytest.approx(sum(scalars) / 2)
    want = [(a + b) / 2 for a, b in zip(*heads)]
    assert snap["density_per_layer_head"]["l"] == pytest.approx(want)


class _Copy:
    """Stands in for a CUDA event of an asynchronous device-to-host copy."""

    def __init__(self) -> None:
        self.landed = False

    def query(self) -> bool:
        return self.landed

    def synchronize(self) -> None:
        self.landed = True


def test_add_sample_splits_mask_and_head_densities():
    stats = PBSStats()
    stats.add_sample([0.5, 0.25, 0.4, 0.6, 0.2, 0.3], 2, [2, 2], "l")
    snap = stats.snapshot()
    assert snap["density_samples"] == 2 and snap["mean_density"] == pytest.approx(0.375)
    assert snap["density_per_layer_head"]["l"] == pytest.approx([0.3, 0.45])
    stats.add_sample([0.9], 1, [], None)  # no layer name: no per-layer entry
    assert stats.snapshot()["density_samples"] == 3


def test_deferred_samples_count_once_their_copy_lands():
    """A sample reaches the host without a sync: it is counted at the
    first maybe_log after its copy landed, in order, and snapshot waits for the rest."""
    stats = PBSStats()
    first, second = _Copy(), _Copy()
    stats._pending = [
        (first, torch.tensor([0.2, 0.1, 0.3]), 1, [2], "a"),
        (second, torch.tensor([0.6]), 1, [], "b"),
    ]
    stats.maybe_log()
    assert stats.density_samples == 0  # nothing landed yet
    second.landed = True
    stats.maybe_log()
    assert stats.density_samples == 0  # the older copy goes first
    first.landed = True
    stats.maybe_log()
    assert stats.density_samples == 2 and stats.last_density == pytest.approx(0.6)
    stats._pending = [(_Copy(), torch.tensor([0.4]), 1, [], "c")]
    snap = stats.snapshot()  # waits
    assert snap["density_samples"] == 3 and snap["density_per_layer"]["c"] == pytest.approx(0.4)


def test_defer_sample_of_cpu_values_counts_at_once():
    stats = PBSStats()
    stats.defer_sample(torch.tensor([0.5, 0.4, 0.6]), 1, [2], "l")
    assert stats.density_samples == 1 and not stats._pending
    assert stats.snapshot()["density_per_layer_head"]["l"] == pytest.approx([0.4, 0.6])


def test_impl_hands_densities_to_routing_at_the_next_call_without_a_sync():
    """Where the step could switch, the masks' densities become the layer's pending reading
    (not a stats sample unless one is due), which the next call hands to routing; a step
    that cannot switch leaves none."""
    from types import SimpleNamespace

    from pbs_vllm.backend.impl import PBSAttentionImpl
    from pbs_vllm.backend.routing import LayerRouting, StepView
    from pbs_vllm.backend.stats import STATS
    from pbs_vllm.kernels import ChunkBatch
    from pbs_vllm.kernels.block_mask import random_block_mask

    mask = random_block_mask(ChunkBatch([40], [150]), 16, 32, 2, 0.3, "cpu", seed=3)
    work = [(SimpleNamespace(dense=False), None, None, mask)]
    impl = SimpleNamespace(routing=LayerRouting(hold_steps=4), _reading=None)
    saved = STATS.log_interval_s
    try:
        STATS.reset()
        STATS.configure(0.0)  # no sample due
        PBSAttentionImpl._read_densities(impl, work, StepView(False, 190, 0.6), "l")
        assert impl._reading is None  # decodes in the step: no reading
        switchable = StepView(True, 190, mask.density() - 0.01)
        PBSAttentionImpl._read_densities(impl, work, switchable, "l")
        step, host, done = impl._reading
        assert step is switchable and done is None
        assert host.tolist() == pytest.approx([mask.density()])
        assert STATS.snapshot()["density_samples"] == 0
        PBSAttentionImpl._fold_reading(impl)
        assert impl._reading is None
        assert (impl.routing.held_steps, impl.routing.switch_len) == (4, 190)
        assert impl.routing.switch_density == pytest.approx(mask.density())
    finally:
        STATS.configure(saved)
        STATS.reset()

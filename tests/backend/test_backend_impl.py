"""PBS impl + builder on a real VllmConfig and paged cache, against float references."""

from __future__ import annotations

import pytest
import torch
from backend_harness import Req, causal_reference
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata

from pbs_vllm.backend.metadata import PBSAttentionMetadata
from pbs_vllm.backend.stats import STATS
from pbs_vllm.config import PBSConfigError
from pbs_vllm.kernels import PagedKV, build_block_mask, pbs_attention_ref

# dense_above off: a full mask (density 1) must still run the PBS kernels here.
FULL_MASK = {
    "block_size": 16,
    "segment_size": 32,
    "tau": 1.0,
    "dense_above": None,
    "stats_log_interval_s": 0,
}
# decodes first (vLLM reorders the batch), then a short extend, a middle chunk of a long
# prompt, and a fresh prompt; GQA 4 query heads over 2 KV heads.
MIXED = [Req(37, 1), Req(100, 1), Req(5, 1), Req(40, 3), Req(96, 80), Req(0, 70)]


@pytest.mark.parametrize(
    ("dense_fallback_len", "dense_tokens"),
    [(0, 0), (100, 73), (10_000, 153)],
    ids=["all-sparse-path", "mixed-runs", "all-dense"],
)
def test_mixed_batch_matches_causal_reference(harness_factory, dense_fallback_len, dense_tokens):
    """tau=1 keeps every block, so any route (stock decode, PBS sparse or dense) is exact.

    A step whose prefills are all below dense_fallback_len is handed to the stock
    backend whole: its metadata is the stock builder's own.
    """
    h = harness_factory({**FULL_MASK, "dense_fallback_len": dense_fallback_len})
    STATS.reset()
    step = h.step(MIXED)
    m = step.metadata
    if dense_tokens == 153:
        assert isinstance(m, CPUAttentionMetadata) and m.num_actual_tokens == 156
    else:
        assert isinstance(m, PBSAttentionMetadata)
        assert isinstance(m.decode, CPUAttentionMetadata)
        assert m.num_decode_tokens == 3 and m.decode.num_actual_tokens == 3
        assert sum(r.rows.stop - r.rows.start for r in m.prefill_runs) == 153
    torch.testing.assert_close(
        step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
    )
    snap = STATS.snapshot()
    assert (snap["decode_tokens"], snap["dense_prefill_tokens"]) == (3, dense_tokens)
    assert snap["sparse_prefill_tokens"] == 153 - dense_tokens


def test_dense_fallback_splits_runs_by_sequence_length(harness_factory):
    h = harness_factory({**FULL_MASK, "dense_fallback_len": 100})
    runs = h.step(MIXED).metadata.prefill_runs
    # seq lens of the prefills: 43 (dense), 176 (sparse), 70 (dense)
    assert [(r.rows, r.reqs, r.dense) for r in runs] == [
        (slice(3, 6), slice(3, 4), True),
        (slice(6, 86), slice(4, 5), False),
        (slice(86, 156), slice(5, 6), True),
    ]
    assert (runs[1].batch.q_lens, runs[1].batch.ctx_lens) == ([80], [96])


def test_sparse_path_matches_kernel_reference_with_its_mask(harness_factory):
    """Real sparsity: output equals the float reference under the mask the kernels pick
    from the same keys, read here from a contiguous copy instead of our cache views."""
    pbs = {
        "block_size": 16,
        "segment_size": 32,
        "tau": 0.5,
        "max_kept_fraction": 0.3,
        "dense_fallback_len": 0,
        "stats_log_interval_s": 1e-9,
    }
    h = harness_factory(pbs)
    STATS.reset()
    step = h.step([Req(0, 1), Req(160, 64), Req(0, 150)])
    (run,) = step.metadata.prefill_runs
    reqs = step.reqs[run.reqs]
    kv = PagedKV.from_contiguous(
        torch.cat(step.keys[run.reqs]), torch.cat(step.values[run.reqs]), [r.seq for r in reqs]
    )
    q = step.query[run.rows]
    params = h.impl.params
    mask = build_block_mask(q, kv, run.batch, params, h.scale)
    assert mask.density() < 0.8
    expected = pbs_attention_ref(q, kv, mask, h.scale)
    torch.testing.assert_close(step.output[run.rows], expected, atol=2e-4, rtol=1e-3)
    dense = causal_reference(step, h.scale)[run.rows]
    assert (step.output[run.rows].double() - dense).abs().max() > 1e-2
    assert STATS.snapshot()["last_density"] == pytest.approx(mask.density())


def test_decode_only_batch_passes_stock_metadata_through(harness_factory):
    h = harness_factory(FULL_MASK)
    step = h.step([Req(30, 1), Req(65, 1), Req(1, 1)])
    assert step.metadata.prefill_runs == [] and step.metadata.num_decode_tokens == 3
    torch.testing.assert_close(
        step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
    )


def test_cache_bytes_equal_those_the_stock_backend_writes(harness_factory):
    h = harness_factory(FULL_MASK)
    before = h.kv_cache.clone()
    step = h.step(MIXED)
    ours = h.kv_cache.clone()
    # Replay the same writes with a stand-alone stock impl on the original cache.
    h.kv_cache.copy_(before)
    stock = CPUAttentionBackendImpl(4, 64, h.scale, 2, None, None, "auto")
    for i, r in enumerate(step.reqs):
        pos = torch.arange(r.seq)
        slots = step.block_table[i, pos // 32].long() * 32 + pos % 32
        stock.do_kv_cache_update(h.layer, step.keys[i], step.values[i], h.kv_cache, slots)
    assert torch.equal(ours.view(torch.uint8), h.kv_cache.view(torch.uint8))
    assert not torch.equal(ours, before)


@pytest.mark.parametrize(
    ("layer_kwargs", "head_size"),
    [({"per_layer_sliding_window": 64}, 64), ({"logits_soft_cap": 30.0}, 64), ({}, 80)],
    ids=["sliding-window", "softcap", "head-size-80"],
)
def test_unsupported_layers_run_the_stock_impl(harness_factory, layer_kwargs, head_size):
    h = harness_factory(FULL_MASK, head_size=head_size, **layer_kwargs)
    assert type(h.impl) is CPUAttentionBackendImpl
    assert not h.builder.uses_pbs
    step = h.step([Req(10, 1), Req(0, 40)])
    assert isinstance(step.metadata, CPUAttentionMetadata)
    assert torch.isfinite(step.output).all()


def test_bad_config_fails_when_the_layer_is_built(harness_factory):
    with pytest.raises(PBSConfigError, match="tau"):
        harness_factory({"tau": 2})


def test_decode_only_step_plans_no_prefill_runs(harness_factory, monkeypatch):
    """A step of decodes alone never reads host sequence lengths (no prefill planning)."""
    import pbs_vllm.backend.metadata as metadata

    def no_host_lens(common):
        raise AssertionError("decode-only step asked for host seq_lens")

    monkeypatch.setattr(metadata, "host_seq_lens", no_host_lens)
    h = harness_factory({**FULL_MASK, "dense_fallback_len": 0})
    step = h.step([Req(37, 1), Req(100, 1), Req(5, 1)])
    assert isinstance(step.metadata, PBSAttentionMetadata) and not step.metadata.prefill_runs
    torch.testing.assert_close(
        step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
    )


def _count_impl_calls(monkeypatch, name: str, module=None) -> list[int]:
    """Counts the calls of `name`, a function the impl's module (or `module`) imported."""
    import pbs_vllm.backend.impl as impl

    impl = module or impl
    calls = [0]
    real = getattr(impl, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(impl, name, counted)
    return calls


def _count_pbs_attention(monkeypatch) -> list[int]:
    """Counts calls of the PBS attention kernel made by the impl."""
    import pbs_vllm.backend.prefill_kernel as prefill_kernel  # attends the prefill masks

    return _count_impl_calls(monkeypatch, "pbs_attention", prefill_kernel)


PREFILLS = [Req(96, 80), Req(0, 70)]  # no decodes: a step that may switch to stock


@pytest.mark.parametrize(
    ("reqs", "switches"),
    [(PREFILLS, True), ([Req(37, 1), *PREFILLS], False)],
    ids=["prefills-only", "with-decodes"],
)
def test_dense_masks_switch_the_layer_to_the_stock_kernel(
    harness_factory, monkeypatch, reqs, switches
):
    """Full masks (density 1) reach dense_above. The step that measures them runs PBS (its
    densities reach routing at the layer's next call, without a sync); without decodes the
    next step is held on the stock kernel, unestimated; with decodes PBS runs as usual.
    Every step exact."""
    calls = _count_pbs_attention(monkeypatch)
    estimated = _count_impl_calls(monkeypatch, "prefill_mask")
    h = harness_factory({**FULL_MASK, "dense_above": 0.6, "dense_fallback_len": 0})
    STATS.reset()
    per_step = []
    for _ in range(2):
        before = (estimated[0], calls[0])
        step = h.step(reqs)
        per_step.append((estimated[0] > before[0], calls[0] > before[1]))
        assert (step.metadata.stock_all is not None) == switches
        torch.testing.assert_close(
            step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
        )
    assert per_step == [(True, True), (False, False) if switches else (True, True)]


def test_sparse_masks_below_dense_above_run_pbs(harness_factory, monkeypatch):
    calls = _count_pbs_attention(monkeypatch)
    h = harness_factory(
        {
            **FULL_MASK,
            "tau": 1.0,
            "max_kept_fraction": 0.25,
            "dense_above": 0.6,
            "dense_fallback_len": 0,
        }
    )
    for n in (1, 2):  # the second call reads the first's densities: sparse, not held
        h.step(PREFILLS)
        assert calls[0] == n
        step, host, _ = h.impl._reading
        assert step.switch_above == 0.6 and max(host.tolist()) < 0.6
    assert h.impl.routing.held_steps == 0


@pytest.mark.parametrize("hold", [1, 3])
def test_dense_switch_holds_the_layer_on_stock_for_hold_steps(harness_factory, monkeypatch, hold):
    """After a switch the layer's next steps without decodes skip estimation and attend on
    the stock kernel until `dense_hold_steps` have run dense, while their sequences stay
    within the length at which the switch's density would fall below the step's break-even
    (`LayerRouting.predicted_density`); then it estimates again. A step with decodes, or with a
    sequence past that length, estimates regardless. Every step stays exact."""
    calls = _count_pbs_attention(monkeypatch)
    estimated = _count_impl_calls(monkeypatch, "prefill_mask")
    h = harness_factory(
        {**FULL_MASK, "dense_above": 0.95, "dense_fallback_len": 0, "dense_hold_steps": hold}
    )
    # PREFILLS: 176 keys at full density, held up to 176 * (1 / 0.95) ** (1 / 0.35) = 203
    shorter, within = [Req(96, 60), Req(0, 70)], [Req(130, 60), Req(0, 70)]  # 156 / 190 keys
    beyond = [Req(160, 60), Req(0, 70)]  # 220 keys
    steps = [PREFILLS, [Req(37, 1), *PREFILLS], shorter, within, beyond, PREFILLS, PREFILLS]
    per_step = []
    for reqs in steps:
        before = (estimated[0], calls[0])
        step = h.step(reqs)
        per_step.append((estimated[0] > before[0], calls[0] > before[1]))
        torch.testing.assert_close(
            step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
        )
    # (estimated, ran PBS) per step: step 0 runs PBS and finds the layer dense, which the
    # next call reads; the decode step runs PBS regardless; the step past the hold's reach
    # (220 keys > 203) runs PBS, finds it dense again and restarts the hold.
    ran, held = (True, True), (False, False)
    if hold == 1:  # one held step per switch, then a PBS step that measures again; found
        # dense again at 190 keys, the layer's density is known not to fall (full masks),
        # so the switch there also holds the longer step (220 keys)
        assert per_step == [ran, ran, held, ran, held, ran, held]
    else:
        assert per_step == [ran, ran, held, held, ran, held, held]


def test_sparse_step_ends_the_dense_hold(harness_factory, monkeypatch):
    """A short step whose masks are mostly its dense own segment holds the layer on the
    stock kernel; a long step with a 25% cap (past the hold's reach) comes out sparse and
    ends the hold, so the next short step estimates and runs PBS again."""
    estimated = _count_impl_calls(monkeypatch, "prefill_mask")
    calls = _count_pbs_attention(monkeypatch)
    h = harness_factory(
        {**FULL_MASK, "max_kept_fraction": 0.25, "dense_above": 0.6, "dense_fallback_len": 0}
    )
    short, long = [Req(0, 48)], [Req(320, 32)]
    per_step = []
    for reqs in (short, short, long, short, short):
        before = (estimated[0], calls[0])
        h.step(reqs)
        per_step.append((estimated[0] > before[0], calls[0] > before[1]))
    ran, held = (True, True), (False, False)
    assert per_step == [ran, held, ran, ran, held]


def _cost_model(monkeypatch, **rates):
    """The builder's cost model for `dense_above: auto`, with the Hopper rates changed."""
    from dataclasses import replace

    from pbs_vllm.backend import metadata as metadata_mod
    from pbs_vllm.backend.cost import RATES, CostModel

    changed = replace(RATES[0], **rates)
    monkeypatch.setattr(
        metadata_mod, "routing_cost_model", lambda device, heads: CostModel(changed, *heads)
    )


@pytest.mark.parametrize("with_decodes", [False, True])
def test_auto_sends_a_step_no_density_could_win_to_the_stock_kernel(
    harness_factory, monkeypatch, with_decodes
):
    """dense_above auto: where the cost model predicts that no mask, however sparse, beats
    the stock kernel (here: a host time of a second per layer call), the builder hands the
    whole step to the stock backend, decodes included: nothing is estimated."""
    _cost_model(monkeypatch, host_ms={"eager": 1e3, "graphs": 1e3})
    calls = _count_pbs_attention(monkeypatch)
    estimated = _count_impl_calls(monkeypatch, "prefill_mask")
    h = harness_factory({**FULL_MASK, "dense_above": "auto", "dense_fallback_len": 0})
    STATS.reset()
    step = h.step([Req(37, 1), *PREFILLS] if with_decodes else PREFILLS)
    assert isinstance(step.metadata, CPUAttentionMetadata)
    assert (calls[0], estimated[0]) == (0, 0)
    torch.testing.assert_close(
        step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
    )
    assert STATS.snapshot()["sparse_prefill_tokens"] == 0


@pytest.mark.parametrize(("efficiency", "switches"), [(0.85, True), (50.0, False)])
def test_auto_switches_where_the_cost_model_says_the_stock_kernel_is_faster(
    harness_factory, monkeypatch, efficiency, switches
):
    """dense_above auto, host time and estimation free: full masks (density 1) switch to the stock kernel
    at the Hopper rates; with PBS predicted faster at any density (an efficiency of 50x)
    the step never switches and carries no stock metadata for its rows."""
    _cost_model(
        monkeypatch,
        host_ms={"eager": 0.0, "graphs": 0.0},
        estimate_fixed_ms=0.0,
        estimate_ms_per_key=0.0,
        estimate_ms_per_pair=0.0,
        attend_fixed_ms=0.0,
        efficiency={"fa3": efficiency, "triton": efficiency},
    )
    calls = _count_pbs_attention(monkeypatch)
    h = harness_factory({**FULL_MASK, "dense_above": "auto", "dense_fallback_len": 0})
    step = h.step(PREFILLS)
    m = step.metadata
    assert isinstance(m, PBSAttentionMetadata)
    assert (m.stock_all is not None) == switches
    assert m.switch_above > 1.0 if not switches else 0.0 < m.switch_above < 1.0
    assert len(m.sparse_weights) == len([r for r in m.prefill_runs if not r.dense])
    assert calls[0] == 1  # the step that measures the density runs PBS
    step = h.step(PREFILLS)  # the next one is held on the stock kernel where it switched
    assert calls[0] == (1 if switches else 2)
    torch.testing.assert_close(
        step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
    )


def test_builder_plans_every_run_once_and_forward_only_launches(harness_factory, monkeypatch):
    """The builder builds one PrefillPlan per prefill run (on `PrefillRun.plan`); the
    layer's forward estimates and attends over it, never planning on the fly."""
    from pbs_vllm.backend import metadata as metadata_mod
    from pbs_vllm.kernels import estimate, prefill

    h = harness_factory({**FULL_MASK, "dense_fallback_len": 100})
    built = []
    real = metadata_mod.plan_prefill
    monkeypatch.setattr(
        metadata_mod, "plan_prefill", lambda *a, **k: built.append(a[0]) or real(*a, **k)
    )

    def refuse(*args, **kwargs):
        raise AssertionError("a layer built a plan on the fly")

    monkeypatch.setattr(prefill, "plan_for", refuse)
    monkeypatch.setattr(estimate, "plan_for", refuse)
    step = h.step(MIXED)
    runs = step.metadata.prefill_runs
    assert [r.dense for r in runs] == [True, False, True]
    assert built == [r.batch for r in runs]
    for run in runs:
        assert run.plan.batch is run.batch and run.plan.dense == run.dense
        assert run.plan.num_kv_heads == 2 and run.plan.tiles is not None
    torch.testing.assert_close(
        step.output.double(), causal_reference(step, h.scale), atol=2e-4, rtol=1e-3
    )


def test_profile_pass_reserves_the_working_memory_once(monkeypatch):
    """vLLM's memory-profiling pass (attn_metadata None) allocates PBS's measured working
    memory once per process on CUDA, never on the CPU or when nothing was measured."""
    import pbs_vllm.backend.impl as impl
    import pbs_vllm.kernels.warmup as warmup

    calls = []
    monkeypatch.setattr(warmup, "reserve_in_profile", lambda n, d: calls.append((n, d)) or True)
    monkeypatch.setattr(impl, "_RESERVE", {"bytes": 0, "done": False})
    impl._reserve_in_profile(torch.device("cuda"))  # nothing measured: nothing to reserve
    assert calls == []
    impl._RESERVE["bytes"] = 3 << 20
    impl._reserve_in_profile(torch.device("cpu"))
    assert calls == []
    impl._reserve_in_profile(torch.device("cuda"))
    impl._reserve_in_profile(torch.device("cuda"))
    assert calls == [(3 << 20, torch.device("cuda"))]

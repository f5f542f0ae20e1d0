"""Step graphs (`pbs_vllm.kernels.graphs`): PBS work captured over one layer's cache and
replayed over another's through `PagedKV.cache_offset`.

On the CPU: the kernels that read the cache honour the offset (Triton interpreter, where
pointers are host addresses), the kernels that cannot honour it refuse it, and
`StepGraphs.bind` accepts only caches that can stand in for the captured one. On a Hopper
GPU with vLLM (marker `gpu`): the captured estimation and FA3 attention replayed over
other layers give exactly what the eager calls give on those layers.
"""

from __future__ import annotations

import pytest
import torch
from attention_util import _fa3, _random_qkv

from pbs_vllm.kernels import varlen
from pbs_vllm.kernels.attention import _row_table, pbs_attention
from pbs_vllm.kernels.attention_ref import varlen_attention_ref
from pbs_vllm.kernels.block_mask import dense_block_mask, random_block_mask
from pbs_vllm.kernels.estimate import build_block_mask
from pbs_vllm.kernels.graphs import StepGraphs, capture_prefill
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.plan import plan_for, plan_prefill
from pbs_vllm.kernels.prefill import prefill_mask


def _layers(paged_kv, n, batch, hq, hkv, d, dtype, device, seed, page_size=16, layout="fused"):
    """n layers' (q, PagedKV) with one block table (same page order) and fresh contents."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n):
        q, k, v = _random_qkv(gen, batch, hq, hkv, d, dtype, device)
        kv = paged_kv(k, v, batch.seq_lens, page_size, torch.Generator().manual_seed(seed), layout)
        layers.append((q, kv))
    return layers


def _assert_same_mask(got, want) -> None:
    """Same kept blocks (entries past a row's count are scratch) and permutation."""
    torch.testing.assert_close(got.kv_num_blocks, want.kv_num_blocks, rtol=0, atol=0)
    torch.testing.assert_close(got.perm, want.perm, rtol=0, atol=0)
    for b in range(len(want.batch)):
        assert torch.equal(got.to_dense(b), want.to_dense(b))


def _offset(base: PagedKV, other: PagedKV) -> torch.Tensor:
    size = base.key_cache.element_size()
    dk = other.key_cache.data_ptr() - base.key_cache.data_ptr()
    dv = other.value_cache.data_ptr() - base.value_cache.data_ptr()
    assert dk % size == 0 and dv % size == 0
    return torch.tensor([dk // size, dv // size], device=base.key_cache.device)


@pytest.mark.parametrize("layout", ["fused", "head_major"])
def test_offset_kernels_read_the_other_layer(paged_kv, triton_kernels, layout):
    """Estimation and the FA3 route's gather over layer A's cache plus the offset to layer
    B equal the same calls on B (Triton interpreter)."""
    batch = ChunkBatch(q_lens=[40, 70], ctx_lens=[100, 5])
    (q, kv_a), (_, kv_b) = _layers(paged_kv, 2, batch, 4, 2, 16, torch.float32, "cpu", 5, 8, layout)
    via_a = PagedKV(kv_a.key_cache, kv_a.value_cache, kv_a.block_table, _offset(kv_a, kv_b))
    params = SparsityParams(block_size=16, segment_size=32, tau=0.8)
    want = build_block_mask(q, kv_b, batch, params, 0.25)
    got = build_block_mask(q, via_a, batch, params, 0.25)
    _assert_same_mask(got, want)
    plan = varlen.varlen_plan(want)
    rows, tail = _row_table(want, kv_b), plan.tail_rows(kv_b)
    assert tail is plan.planned_tail_rows.rows  # planned with kv_b's block table
    ks_b, vs_b = varlen.gather_scratch(kv_b, rows, tail, 0, 2)
    ks_a, vs_a = varlen.gather_scratch(via_a, rows, tail, 0, 2)
    torch.testing.assert_close(ks_a, ks_b, rtol=0, atol=0)
    torch.testing.assert_close(vs_a, vs_b, rtol=0, atol=0)
    assert not ks_a.isnan().any()


def test_kernels_that_read_the_cache_directly_refuse_an_offset(paged_kv, torch_kernels):
    batch = ChunkBatch(q_lens=[40], ctx_lens=[60])
    (q, kv), (_, other) = _layers(paged_kv, 2, batch, 4, 2, 16, torch.float32, "cpu", 1, 8)
    with_off = PagedKV(kv.key_cache, kv.value_cache, kv.block_table, _offset(kv, other))
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=1)
    dense = dense_block_mask(batch, 16, 2, "cpu")
    params = SparsityParams(block_size=16, segment_size=32)
    calls = {
        "Triton attention": lambda: pbs_attention(q, with_off, mask, 0.25),
        "PyTorch estimation": lambda: build_block_mask(q, with_off, batch, params, 0.25),
        "dense FA3": lambda: varlen.pbs_attention_varlen(
            q, with_off, dense, 0.25, varlen_attention_ref
        ),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="takes no cache_offset"):
            call()


def test_cache_offset_must_be_two_int64_on_the_cache_device():
    k = torch.zeros(2, 4, 1, 16)
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_offset must be an int64 tensor of shape"):
        PagedKV(k, k, table, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_offset must be an int64 tensor of shape"):
        PagedKV(k, k, table, torch.zeros(3, dtype=torch.int64))


def test_bind_takes_only_caches_of_the_captured_layout(paged_kv):
    batch = ChunkBatch(q_lens=[40], ctx_lens=[60])
    (q, kv_a), (q_b, kv_b) = _layers(paged_kv, 2, batch, 4, 2, 16, torch.float32, "cpu", 3, 8)
    graphs = StepGraphs(40, 4, 16, torch.float32, "cpu")
    assert "captured=[]" in repr(graphs)
    assert graphs.bind(q, kv_a.key_cache, kv_a.value_cache)
    assert graphs.offset.tolist() == [0, 0] and torch.equal(graphs.q, q)
    assert graphs.bind(q_b, kv_b.key_cache, kv_b.value_cache)
    assert graphs.offset.tolist() == _offset(kv_a, kv_b).tolist()
    assert torch.equal(graphs.q, q_b)
    other_shape = torch.zeros(kv_a.key_cache.shape[0] + 1, *kv_a.key_cache.shape[1:])
    assert not graphs.bind(q, other_shape, other_shape)
    assert not graphs.bind(q[:10], kv_b.key_cache, kv_b.value_cache)
    assert not graphs.bind(q.double(), kv_b.key_cache, kv_b.value_cache)


def test_the_masks_varlen_plan_is_its_plans(gen):
    batch = ChunkBatch(q_lens=[64, 9], ctx_lens=[64, 300])
    params = SparsityParams(block_size=16, segment_size=32)
    plan = plan_prefill(batch, params, "cpu", 2, "fa3")
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=1, plan=plan)
    assert varlen.varlen_plan(mask) is plan.varlen
    assert plan.varlen.perm_pages * 16 == mask.perm.shape[1]
    triton_only = plan_prefill(batch, params, "cpu", 2, "triton")
    mask = random_block_mask(batch, 16, 32, 2, 0.5, device="cpu", seed=1, plan=triton_only)
    with pytest.raises(ValueError, match="attention='triton'.*FA3 route needs"):
        varlen.varlen_plan(mask)


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("group", "head_dim", "hkv"), [(7, 64, 2), (4, 128, 8)])
def test_gpu_step_graphs_replay_other_layers_exactly(paged_kv, group, head_dim, hkv):
    """Capture estimation + FA3 attention at layer 0, replay over layers 1-3: masks and
    outputs equal the eager calls on each layer (the output poisoned before each replay)."""
    fa3 = _fa3()
    if fa3 is None:
        pytest.skip("needs a Hopper GPU and vLLM's FA3")

    def attend(q, kv, mask, scale, out):
        varlen.pbs_attention_varlen(q, kv, mask, scale, fa3, out=out)

    batch = ChunkBatch(q_lens=[3000, 700, 1], ctx_lens=[0, 4100, 2000])
    layers = _layers(paged_kv, 4, batch, hkv * group, hkv, head_dim, torch.bfloat16, "cuda", 11)
    params = SparsityParams(block_size=128, segment_size=512, tau=0.9)
    scale = head_dim**-0.5
    plan = plan_for(layers[0][0], layers[0][1], batch, params, "fa3")
    graphs = StepGraphs(sum(batch.q_lens), hkv * group, head_dim, torch.bfloat16, "cuda")
    for i, (q, kv) in enumerate(layers):
        assert graphs.bind(q, kv.key_cache, kv.value_cache)
        if i == 0:
            capture_prefill(graphs, kv.block_table, plan, params, scale, attend)
        graphs.out.fill_(float("nan"))
        mask = graphs.replay("estimate")
        graphs.replay("attend")
        want_mask = prefill_mask(q, kv, batch, params, scale, plan=plan)
        want = varlen.pbs_attention_varlen(q, kv, want_mask, scale, fa3)
        _assert_same_mask(mask, want_mask)
        assert not graphs.out.isnan().any()
        torch.testing.assert_close(graphs.out, want, rtol=0, atol=0)
    assert "captured=['attend', 'estimate']" in repr(graphs)


@pytest.mark.gpu
def test_gpu_upload_inside_a_capture_fails_the_capture():
    from pbs_vllm.kernels.graphs import GraphCaptureError
    from pbs_vllm.kernels.paged import upload

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    graphs = StepGraphs(4, 1, 16, torch.float16, "cuda")
    with pytest.raises(GraphCaptureError, match="upload"):
        graphs.capture("bad", lambda: upload(torch.arange(4), "cuda"))
    assert not graphs.captured("bad")
    # the stream left capture mode: ordinary work still runs
    assert torch.arange(4, device="cuda").sum().item() == 6


@pytest.mark.gpu
@pytest.mark.parametrize(("hq", "hkv", "head_dim"), [(14, 2, 64), (32, 8, 128)])
def test_gpu_start_up_check_passes(hq, hkv, head_dim):
    from pbs_vllm.kernels.graphs import check_step_graphs

    fa3 = _fa3()
    if fa3 is None:
        pytest.skip("needs a Hopper GPU and vLLM's FA3")

    def attend(q, kv, mask, scale, out):
        varlen.pbs_attention_varlen(q, kv, mask, scale, fa3, out=out)

    params = SparsityParams(block_size=128, segment_size=512, tau=0.9)
    assert check_step_graphs(hq, hkv, head_dim, torch.bfloat16, "cuda", params, 16, attend) is None

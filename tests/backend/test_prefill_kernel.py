"""The prefill-kernel choice (`backend/prefill_kernel.py`) without a GPU."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.backend import prefill_kernel
from pbs_vllm.backend.prefill_kernel import PrefillAttention, prefill_attention
from pbs_vllm.kernels.block_mask import random_block_mask
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV


@pytest.fixture(autouse=True)
def _fresh_choice():
    prefill_attention.cache_clear()
    yield
    prefill_attention.cache_clear()


def test_auto_takes_triton_without_hopper_and_says_why(caplog):
    attend = prefill_attention("auto")
    assert attend.kernel == "triton"
    assert prefill_attention("auto") is attend  # once per process


def test_fa3_where_it_cannot_run_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_kernel='fa3' cannot run here: no CUDA"):
        prefill_attention("fa3")


def test_unknown_choice_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"attention_kernel='cudnn': must be one of"):
        prefill_attention("cudnn")


def _case():
    gen = torch.Generator().manual_seed(0)
    batch = ChunkBatch(q_lens=[40], ctx_lens=[60])
    q = torch.randn(40, 4, 16, generator=gen)
    k, v = torch.randn(2, 100, 2, 16, generator=gen)
    kv = PagedKV.from_contiguous(k, v, [100], page_size=4)
    return q, kv, random_block_mask(batch, 16, 32, 2, 0.5, "cpu", seed=1)


def test_a_refused_call_moves_the_process_to_triton():
    q, kv, mask = _case()
    attend = PrefillAttention("triton")
    expected = attend(q, kv, mask, 0.25, torch.empty_like(q))
    calls = []

    def refusing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("page size must be a multiple of 256")

    attend.kernel, attend._varlen = "fa3", refusing
    out = attend(q, kv, mask, 0.25, torch.empty_like(q))
    torch.testing.assert_close(out, expected)
    assert attend.kernel == "triton" and calls == [1]
    attend(q, kv, mask, 0.25, torch.empty_like(q))
    assert calls == [1]


def test_fa3_path_runs_the_varlen_route():
    from pbs_vllm.kernels.attention_ref import varlen_attention_ref

    q, kv, mask = _case()
    attend = PrefillAttention("triton")
    expected = attend(q, kv, mask, 0.25, torch.empty_like(q))
    attend.kernel, attend._varlen = "fa3", varlen_attention_ref
    out = attend(q, kv, mask, 0.25, torch.empty_like(q))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert prefill_kernel.fa3_unavailable_reason() == "no CUDA device"


def test_impl_on_cpu_attends_with_triton_and_refuses_fa3(harness_factory):
    h = harness_factory({"block_size": 16, "segment_size": 32})
    assert h.impl.attend.kernel == "triton"
    with pytest.raises(ValueError, match="attention_kernel='fa3' cannot run here"):
        harness_factory({"block_size": 16, "segment_size": 32, "attention_kernel": "fa3"})

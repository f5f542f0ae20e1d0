"""The start-up warm-up: its plan reaches every candidate bucket of the selection kernel,
and it runs the kernels end to end on a small shape (the interpreter here)."""

from __future__ import annotations

import pytest
import torch
import triton

from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.warmup import MAX_WARMUP_KEYS, warm_up, warmup_lengths


def _bucket(n: int, p: SparsityParams) -> int:
    c = (n - 1) // p.segment_size * p.segment_size // p.block_size
    return max(16, triton.next_power_of_2(c))


def _reachable(max_len: int, p: SparsityParams) -> set[int]:
    """Buckets of every sequence length up to max_len, by brute force."""
    return {_bucket(n, p) for n in range(p.segment_size + 1, max_len + 1) if n > p.segment_size}


@pytest.mark.parametrize(
    "max_len, params",
    [
        (131072, SparsityParams()),
        (32768, SparsityParams()),
        (40000, SparsityParams(segment_size=384)),
        (2048, SparsityParams(block_size=16, segment_size=32)),
        (3000, SparsityParams(block_size=16, segment_size=48)),
    ],
)
def test_plan_reaches_every_bucket_once(max_len, params):
    lengths = warmup_lengths(max_len, params)
    assert all(n <= max_len for n in lengths)
    buckets = [_bucket(n, params) for n in lengths]
    assert len(set(buckets)) == len(buckets)
    assert set(buckets) == _reachable(max_len, params)


def test_plan_is_capped_and_empty_for_short_models():
    assert warmup_lengths(400, SparsityParams()) == []  # no sequence reaches a second segment
    assert max(warmup_lengths(10**7, SparsityParams())) <= MAX_WARMUP_KEYS


def test_warm_up_runs_on_a_small_shape(device):
    params = SparsityParams(block_size=16, segment_size=32)
    dtype = torch.float16 if device == "cuda" else torch.float32
    seconds = warm_up(4, 2, 16, dtype, device, params, page_size=16, max_len=300)
    assert seconds > 0


def test_compile_watch_reports_only_kernels_that_grew_after_arming():
    from pbs_vllm.kernels.warmup import CompileWatch

    counts = {"_select_kernel": 3, "_gather_kernel": 1}
    watch = CompileWatch(counts=lambda: dict(counts))
    assert not watch.armed and watch.check() == {}
    watch.arm()
    assert watch.check() == {}
    counts["_select_kernel"] = 4
    counts["_page_table_kernel"] = 1
    assert watch.check() == {"_select_kernel": 4, "_page_table_kernel": 1}
    assert watch.check() == {}  # reported once


def test_compiled_variants_names_pbs_kernels_only():
    from pbs_vllm.kernels.warmup import compiled_variants

    counts = compiled_variants()  # empty under the interpreter, per kernel on a GPU
    assert all(k.startswith("_") and k.endswith("_kernel") and n > 0 for k, n in counts.items())


@pytest.mark.gpu
def test_gpu_warm_up_leaves_nothing_to_compile_for_a_new_length():
    """After the warm-up for 8K, a 7K prefill (new length, new chunk shape) compiles no
    PBS kernel variant: what the serving path's CompileWatch checks."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
    from pbs_vllm.kernels.prefill import pbs_prefill
    from pbs_vllm.kernels.warmup import CompileWatch, warm_up

    params = SparsityParams()
    warm_up(14, 2, 64, torch.bfloat16, "cuda", params, 16, 8192)
    watch = CompileWatch()
    watch.arm()
    n = 7000
    kc, vc = torch.randn(2, -(-n // 16), 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    kv = PagedKV(kc, vc, torch.arange(kc.shape[0], dtype=torch.int32, device="cuda")[None])
    # 24, 23, 22 and 21 query blocks: every offset of a plan's packed index rows mod 16 B
    for q_len in (3000, 2900, 2800, 2650):
        q = torch.randn(q_len, 14, 64, device="cuda", dtype=torch.bfloat16)
        pbs_prefill(q, kv, ChunkBatch([q_len], [n - q_len]), params, 0.125)
    torch.cuda.synchronize()
    assert watch.check() == {}


def test_working_set_is_measured_on_cuda_only():
    from pbs_vllm.kernels.warmup import working_set_bytes

    with pytest.raises(ValueError, match="CUDA memory, got device cpu"):
        working_set_bytes(4, 2, 32, torch.float32, "cpu", SparsityParams(), 16, 256, 1024)


def test_reserve_in_profile_allocates_and_returns_the_memory():
    from pbs_vllm.kernels.warmup import reserve_in_profile

    assert reserve_in_profile(0, "cpu")
    assert reserve_in_profile(1 << 20, "cpu")


@pytest.mark.gpu
def test_gpu_working_set_grows_with_the_keys():
    """PBS's working memory for one chunk is positive and grows with the keys it ends at
    (what the backend keeps out of vLLM's KV cache)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pbs_vllm.kernels.warmup import working_set_bytes

    args = (14, 2, 64, torch.bfloat16, "cuda", SparsityParams(), 16, 4096)
    short, long = working_set_bytes(*args, 8192), working_set_bytes(*args, 65536)
    assert 0 < short < long

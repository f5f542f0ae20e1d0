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

"""Platform selection, KV views, version compat, stats and builder class settings."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from backend_harness import PAGE_SIZE
from vllm import _custom_ops as ops
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

from pbs_vllm.backend.compat import host_seq_lens
from pbs_vllm.backend.cpu_platform import PBSCpuPlatform
from pbs_vllm.backend.metadata import PBSAttentionMetadataBuilder, graphs_eligible, prefill_runs
from pbs_vllm.backend.pbs_attn import PBSAttentionBackend
from pbs_vllm.backend.stats import PBSStats
from pbs_vllm.backend.stats import logger as stats_logger
from pbs_vllm.backend.stock import paged_kv, stock_backend
from pbs_vllm.plugin import BACKEND_CLASS_PATH


def test_vllm_runs_on_the_pbs_cpu_platform():
    assert isinstance(current_platform, PBSCpuPlatform)
    assert stock_backend().get_name() == "CPU_ATTN"


@pytest.mark.parametrize("use_mla", [False, True])
def test_cpu_platform_selects_pbs_only_when_asked(use_mla):
    sel = AttentionSelectorConfig(
        head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32, use_mla=use_mla
    )

    def select(backend):
        try:
            return PBSCpuPlatform.get_attn_backend_cls(backend, sel)
        except NotImplementedError as e:  # vLLM <= 0.27 has no MLA backend on CPU
            assert use_mla, e
            return "refused by CpuPlatform"

    chosen, stock = select(AttentionBackendEnum.CUSTOM), select(None)
    assert (chosen == BACKEND_CLASS_PATH) is not use_mla
    assert stock != BACKEND_CLASS_PATH


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_paged_kv_views_read_what_cpu_attn_wrote(gen, isa):
    pages, hkv, d = 5, 2, 64
    cache = torch.randn(pages, hkv, PAGE_SIZE, 2 * d, generator=gen)
    raw = cache.view(pages, hkv, 2 * PAGE_SIZE, d)
    k = torch.randn(3 * PAGE_SIZE, hkv, d, generator=gen)
    v = torch.randn(3 * PAGE_SIZE, hkv, d, generator=gen)
    page_ids = torch.tensor([4, 1, 3])
    slots = (page_ids[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).flatten()
    ops.cpu_attn_reshape_and_cache(
        k,
        v,
        raw[:, :, :PAGE_SIZE],
        raw[:, :, PAGE_SIZE:],
        slots,
        isa,
        k_scale=1.0,
        v_scale=1.0,
        kv_cache_dtype="auto",
    )
    view = paged_kv(cache, torch.zeros(1, 1, dtype=torch.int32), isa)
    assert torch.equal(view.key_cache[page_ids].flatten(0, 1), k)
    assert torch.equal(view.value_cache[page_ids].flatten(0, 1), v)


def test_paged_kv_views_flash_layout(gen):
    cache = torch.randn(4, 2, 16, 2 * 8, generator=gen)  # [pages, Hkv, page, 2D]
    view = paged_kv(cache, torch.zeros(1, 1, dtype=torch.int32), None)
    assert torch.equal(view.key_cache, cache[..., :8].transpose(1, 2))
    assert torch.equal(view.value_cache, cache[..., 8:].transpose(1, 2))


def test_paged_kv_rejects_packed_cpu_isas():
    with pytest.raises(ValueError, match="amx"):
        paged_kv(torch.zeros(1, 1, 32, 128), torch.zeros(1, 1, dtype=torch.int32), "amx")


def test_backend_forwards_layout_and_sizes_to_the_stock_backend():
    stock = stock_backend()
    assert PBSAttentionBackend.get_name() == "CUSTOM"
    # MultipleOf compares by identity before vLLM 0.32: compare what it says
    sizes = lambda b: [vars(x) if hasattr(x, "__dict__") else x for x in b()]  # noqa: E731
    assert sizes(PBSAttentionBackend.get_supported_kernel_block_sizes) == sizes(
        stock.get_supported_kernel_block_sizes
    )
    if hasattr(stock, "supported_kv_cache_layouts"):  # vLLM >= 0.28; forwarded where it exists
        assert (
            PBSAttentionBackend.supported_kv_cache_layouts() == stock.supported_kv_cache_layouts()
        )
    else:
        assert not hasattr(PBSAttentionBackend, "supported_kv_cache_layouts")
    assert PBSAttentionBackend.supports_head_size(80) == stock.supports_head_size(80)


def test_builder_reorders_and_reports_decode_only_cudagraphs(harness_factory):
    h = harness_factory({"block_size": 16, "segment_size": 32})
    assert h.builder.reorder_batch_threshold == 1
    support = PBSAttentionMetadataBuilder.get_cudagraph_support(h.config, h.spec)
    assert support.value <= AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE.value


def test_prefill_runs_group_by_mode_and_skip_padding():
    qsl = torch.tensor([0, 1, 2, 12, 20, 60, 60, 60], dtype=torch.int32)
    seq = torch.tensor([9, 50, 10, 300, 400, 7, 7], dtype=torch.int32)
    runs = prefill_runs(qsl, seq, first_req=2, dense_below=100)
    assert [(r.rows, r.reqs, r.dense) for r in runs] == [
        (slice(2, 12), slice(2, 3), True),
        (slice(12, 60), slice(3, 5), False),
    ]
    assert (runs[1].batch.q_lens, runs[1].batch.ctx_lens) == ([8, 40], [292, 360])


def test_step_graphs_only_for_steps_of_sparse_runs_with_permuted_regions():
    """A dense run, or a sparse run whose sequences all sit in their first segment (its
    mask is dense and attends straight from one layer's cache), rules graphs out."""
    from pbs_vllm.kernels import SparsityParams

    params = SparsityParams(block_size=16, segment_size=32)
    qsl = torch.tensor([0, 10, 50, 90], dtype=torch.int32)
    mixed = prefill_runs(qsl, torch.tensor([10, 300, 400], dtype=torch.int32), 0, 100)
    assert [r.dense for r in mixed] == [True, False]
    assert not graphs_eligible(mixed, params)
    sparse = prefill_runs(qsl, torch.tensor([110, 300, 400], dtype=torch.int32), 0, 100)
    assert graphs_eligible(sparse, params)
    qsl_short = torch.tensor([0, 10, 20, 30], dtype=torch.int32)
    short = prefill_runs(qsl_short, torch.tensor([10, 20, 32], dtype=torch.int32), 0, 0)
    assert [r.dense for r in short] == [False] and not graphs_eligible(short, params)
    assert not graphs_eligible([], params)


def test_host_seq_lens_prefers_host_copies_without_device_reads():
    seq = torch.tensor([5, 9, 0], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 3]),
        query_start_loc_cpu=torch.tensor([0, 1, 3]),
        seq_lens=torch.full((3,), -1),
        seq_lens_cpu_upper_bound=seq,
        num_reqs=2,
        num_actual_tokens=3,
        max_query_len=2,
        max_seq_len=9,
        block_table_tensor=torch.zeros(2, 1, dtype=torch.int32),
        slot_mapping=torch.zeros(3, dtype=torch.int64),
    )
    assert host_seq_lens(common).tolist() == [5, 9]


def test_stats_sample_density_only_when_a_log_line_is_due(monkeypatch, caplog):
    stats = PBSStats()
    stats.record_step(decode_tokens=2, sparse_tokens=30, dense_tokens=4)
    assert not stats.density_due()  # interval 0: logging and sampling off
    stats.configure(5.0)
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 6.0)
    assert stats.density_due()
    stats.maybe_log()  # first due step: gives the impl this step to take samples
    assert stats.density_due()
    stats.record_density(0.25, "model.layers.0.self_attn.attn")
    stats.record_density(0.75, "model.layers.1.self_attn.attn")
    caplog.set_level(logging.INFO, logger=stats_logger.name)
    stats_logger.addHandler(caplog.handler)  # vLLM's loggers do not propagate to root
    try:
        stats.maybe_log()
    finally:
        stats_logger.removeHandler(caplog.handler)
    assert not stats.density_due()
    assert stats.snapshot() == {
        "steps": 1,
        "decode_tokens": 2,
        "sparse_prefill_tokens": 30,
        "dense_prefill_tokens": 4,
        "density_samples": 2,
        "mean_density": 0.5,
        "last_density": 0.75,
        "density_per_layer": {
            "model.layers.0.self_attn.attn": 0.25,
            "model.layers.1.self_attn.attn": 0.75,
        },
        "density_per_layer_head": {},
    }
    line = next(r.getMessage() for r in caplog.records if "PBS prefill" in r.getMessage())
    assert "30 sparse / 4 dense" in line and "mean density 0.500" in line
    stats.reset()
    assert stats.snapshot()["steps"] == 0 and stats.log_interval_s == 5.0

"""Per-step metadata of the PBS backend and the builder that makes it.

The batch arrives reordered decodes-first (`reorder_batch_threshold = 1`). Decodes get the
stock builder's metadata for the decode slice; prefills (chunks and multi-token extends)
get host-side `ChunkBatch`es built from CPU copies vLLM already holds, grouped into runs
of consecutive requests that share a mode (sparse, or dense below `dense_fallback_len`).
A step whose prefills are all dense gets the stock metadata itself, so the stock impl
(FA3 on Hopper) runs the whole step; dense runs beside sparse ones use the PBS kernel with
the full causal mask. With `dense_above` set, a step with sparse runs also carries the
stock metadata of the whole step, for layers whose estimated masks come out too dense, and
its break-even density (`backend/routing.py`): with `dense_above` "auto" the cost model's
(`backend/cost.py`), and a step that no density could win goes to the stock kernel whole.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from pbs_vllm import metrics
from pbs_vllm.backend.compat import host_seq_lens
from pbs_vllm.backend.cost import CostModel, StepWork, rates_for
from pbs_vllm.backend.log import get_logger
from pbs_vllm.backend.routing import (
    AUTO_FALLBACK_ABOVE,
    no_density_wins,
    prefill_is_dense,
    step_can_switch,
    step_switch_above,
)
from pbs_vllm.backend.stats import STATS
from pbs_vllm.backend.stock import stock_backend
from pbs_vllm.config import get_pbs_config
from pbs_vllm.kernels import ChunkBatch
from pbs_vllm.kernels.attention import tile_shape
from pbs_vllm.kernels.plan import PrefillPlan, has_permuted_region, plan_prefill

logger = get_logger(__name__)


@dataclass
class PrefillRun:
    """Consecutive prefill requests run by one `pbs_prefill` call.

    rows: their query rows in the step's [T, Hq, D] tensors; reqs: their rows of the
    block table; batch: host q/ctx lengths; dense: below dense_fallback_len; plan: what
    every layer's estimation and attention of the run derive from the batch (query
    blocks, tile tables, the dense mask...), built once by the metadata builder.
    """

    rows: slice
    reqs: slice
    batch: ChunkBatch
    dense: bool
    plan: PrefillPlan | None = None


@dataclass
class PBSAttentionMetadata:
    """decode: stock metadata of rows [0, num_decode_tokens) (None without decodes);
    block_table: [num_reqs, max_pages] int32 (device); prefill_runs: the prefill rows;
    stock_all: stock metadata of the whole step, for layers whose masks come out dense
    (None when `dense_above` is off, or the step has decodes or no sparse run);
    switch_above: the step's break-even density (None: never switch); sparse_weights: the
    causal pairs of each sparse run, in order (the step's density weighs masks by them).

      rows of the step's q / output [T, Hq, D]:
        [0, num_decode_tokens)        decodes: stock impl (metadata `decode`)
        prefill_rows                  prefill runs, in order; each run's PrefillPlan is
                                      built here (`plan_prefill`), before any layer runs
    """

    num_actual_tokens: int
    num_decode_tokens: int
    decode: Any
    block_table: torch.Tensor
    prefill_runs: list[PrefillRun]
    stock_all: Any = None
    switch_above: float | None = None
    sparse_weights: tuple[int, ...] = ()
    # CUDA graphs of the step's PBS work (`pbs_vllm.kernels.graphs`): whether the step can
    # have them (builder), and the StepGraphs the first layer creates (shared by the layers).
    graphs_eligible: bool = False
    graphs: Any = None

    @cached_property
    def prefill_rows(self) -> slice:
        """The step's prefill query rows (its runs are consecutive, after the decodes)."""
        return slice(self.prefill_runs[0].rows.start, self.prefill_runs[-1].rows.stop)

    @cached_property
    def longest_prefill(self) -> int:
        """Longest sequence of the step's prefill runs (0 without any); once per step."""
        return max((max(run.batch.seq_lens) for run in self.prefill_runs), default=0)


def prefill_runs(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, first_req: int, dense_below: int
) -> list[PrefillRun]:
    """Group requests [first_req, num_reqs) into runs of equal mode (host tensors in).

    query_start_loc: [num_reqs + 1]; seq_lens: [num_reqs]. Requests with no query tokens
    (padding at the end of a batch) are left out.
    """
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    real = [r for r in range(first_req, len(lens)) if starts[r + 1] > starts[r]]
    runs = []
    for dense, group in itertools.groupby(
        real, key=lambda r: prefill_is_dense(lens[r], dense_below)
    ):
        reqs = list(group)
        q_lens = [starts[r + 1] - starts[r] for r in reqs]
        ctx_lens = [lens[r] - q for r, q in zip(reqs, q_lens)]
        runs.append(
            PrefillRun(
                rows=slice(starts[reqs[0]], starts[reqs[-1] + 1]),
                reqs=slice(reqs[0], reqs[-1] + 1),
                batch=ChunkBatch(q_lens, ctx_lens),
                dense=dense,
            )
        )
    return runs


def graphs_eligible(runs: list[PrefillRun], params) -> bool:
    """Whether a step's PBS work can be captured as CUDA graphs and replayed over other
    layers: every prefill run sparse with a permuted region (a dense run, or a run whose
    sequences all fit in their first segment, attends straight from one layer's cache)."""
    return bool(runs) and all(
        not run.dense and has_permuted_region(run.batch, params) for run in runs
    )


def group_uses_pbs(vllm_config: VllmConfig, layer_names: list[str]) -> bool:
    """True when every attention layer of the group got a PBSAttentionImpl."""
    from pbs_vllm.backend.impl import PBSAttentionImpl

    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    return bool(layers) and all(isinstance(x.impl, PBSAttentionImpl) for x in layers.values())


def group_heads(vllm_config: VllmConfig, layer_names: list[str]) -> tuple[int, int, int] | None:
    """(query heads, KV heads, head size) shared by the group's attention layers, or None
    when they differ (plans then leave the Triton tile table to each call)."""
    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()
    shapes = {(x.impl.num_heads, x.impl.num_kv_heads, x.impl.head_size) for x in layers}
    return shapes.pop() if len(shapes) == 1 else None


_COST_LOGGED: set[str] = set()


def routing_cost_model(device, heads: tuple[int, int, int] | None) -> CostModel | None:
    """The cost model for `dense_above` "auto" on this device and per-rank head shape, or
    None (logged once per reason): not a CUDA device, a GPU without rates in
    backend/cost.py's table, or layers of mixed shapes."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    rates = rates_for(name)
    if rates is not None and heads is not None:
        model = CostModel(rates, *heads)
        why = f"cost model with the {rates.name} rates ({heads[0]} q / {heads[1]} KV heads, d {heads[2]})"
    else:
        model = None
        what = (
            "layers of mixed shapes"
            if rates is not None
            else f"no rates for {name or 'this device'}"
        )
        why = f"{what}: break-even density {AUTO_FALLBACK_ABOVE}"
    if why not in _COST_LOGGED:
        _COST_LOGGED.add(why)
        logger.info(f"PBS routing (dense_above auto): {why}")
    return model


class PBSAttentionMetadataBuilder(AttentionMetadataBuilder[PBSAttentionMetadata]):
    """Wraps the stock builder: its metadata for decodes, ChunkBatch runs for prefills.

    CUDA graphs: decode-only batches go to the stock metadata untouched, so full graphs of
    single-token decode batches work where the stock backend supports them; prefills run
    eagerly (UNIFORM_SINGLE_TOKEN_DECODE at most).
    """

    reorder_batch_threshold = 1

    def __init__(
        self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = get_pbs_config(vllm_config)
        self.dense_below = config.dense_fallback_len
        self.dense_above = config.dense_above
        self.params = config.sparsity_params()
        # The prefill attention (its route, read per step: FA3 can move the process to
        # Triton) whose plans the builder makes; the CPU attends through the Triton entry
        # point (the PyTorch kernels). CUDA graphs only with the FA3 route.
        self.attend = None
        if torch.device(device).type == "cuda":
            from pbs_vllm.backend.prefill_kernel import prefill_attention

            self.attend = prefill_attention(config.attention_kernel)
        self.cuda_graphs = config.cuda_graphs and self._route == "fa3"
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.page_size = kv_cache_spec.block_size
        self.tiles = None  # the Triton kernel's (GQA group, rows per tile) of the layers
        STATS.configure(config.stats_log_interval_s)
        self.stock = stock_backend().get_builder_cls()(
            kv_cache_spec, layer_names, vllm_config, device
        )
        self.cost = None  # the routing's cost model (dense_above "auto" on a known GPU)
        self.uses_pbs = group_uses_pbs(vllm_config, layer_names)
        if not self.uses_pbs:
            # Stock impls only (see impl.unsupported_reason): be the stock builder.
            self.reorder_batch_threshold = self.stock.reorder_batch_threshold
            return
        heads = group_heads(vllm_config, layer_names)
        if heads is not None:
            num_heads, self.num_kv_heads, head_size = heads
            dtype = vllm_config.model_config.dtype
            self.tiles = tile_shape(
                num_heads, self.num_kv_heads, head_size, dtype, self.params.block_size
            )
        if self.dense_above == "auto":
            self.cost = routing_cost_model(device, heads)

    @property
    def _route(self) -> str:
        """The prefill attention's route now: 'fa3' or 'triton' (the CPU's)."""
        return "triton" if self.attend is None else self.attend.kernel

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        stock = stock_backend().get_builder_cls().get_cudagraph_support(vllm_config, kv_cache_spec)
        return min(stock, AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE, key=lambda s: s.value)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata):
        decode = self.stock.build_for_cudagraph_capture(common_attn_metadata)
        if not self.uses_pbs:
            return decode
        return self._wrap_decodes(common_attn_metadata, decode)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ):
        common = common_attn_metadata
        if not self.uses_pbs:
            return self.stock.build(common_prefix_len, common, fast_build)
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            common, decode_threshold=1
        )
        runs = []
        if num_prefills:
            runs = prefill_runs(
                common.query_start_loc_cpu[: common.num_reqs + 1],
                host_seq_lens(common),
                num_decodes,
                self.dense_below,
            )
        switch_above = self._switch_above(runs)
        no_win = no_density_wins(switch_above)
        if runs and (no_win or all(run.dense for run in runs)):
            # Every prefill is below dense_fallback_len, or no density of the sparse ones
            # could beat the stock kernel (the cost model): the whole step is a stock step
            # (the stock kernels are the fastest dense attention there is).
            metadata = self.stock.build(common_prefix_len, common, fast_build)
        elif num_prefills == 0:
            metadata = self._wrap_decodes(
                common, self.stock.build(common_prefix_len, common, fast_build)
            )
        else:
            decode = None
            if num_decodes:
                decode_common = common.unpadded(num_decode_tokens, num_decodes).replace(
                    max_query_len=1
                )
                decode = self.stock.build(common_prefix_len, decode_common, fast_build)
            stock_all = None
            if step_can_switch(switch_above, num_decodes):
                stock_all = self.stock.build(common_prefix_len, common, fast_build)
            metadata = PBSAttentionMetadata(
                num_actual_tokens=common.num_actual_tokens,
                num_decode_tokens=num_decode_tokens,
                decode=decode,
                block_table=common.block_table_tensor,
                prefill_runs=runs,
                stock_all=stock_all,
                switch_above=switch_above,
                sparse_weights=tuple(
                    StepWork.of([(r.batch.q_lens, r.batch.ctx_lens, False)]).sparse_pairs
                    for r in runs
                    if not r.dense
                ),
                graphs_eligible=self._plan(runs, common.block_table_tensor),
            )
        tokens = {True: 0, False: 0}
        short = unwinnable = 0
        for run in runs:
            tokens[run.dense or no_win] += run.rows.stop - run.rows.start
            short += len(run.batch) if run.dense else 0
            unwinnable += len(run.batch) if no_win and not run.dense else 0
        STATS.record_step(num_decode_tokens, tokens[False], tokens[True])
        if short:
            metrics.record_fallback("short_prompt", short)
        if unwinnable:
            metrics.record_fallback("dense_cost", unwinnable)
        STATS.maybe_log()
        return metadata

    def _switch_above(self, runs: list[PrefillRun]) -> float | None:
        """The step's break-even density (`backend/routing.py`); None without sparse runs
        or with `dense_above` off."""
        if not any(not run.dense for run in runs):
            return None
        work = StepWork.of([(run.batch.q_lens, run.batch.ctx_lens, run.dense) for run in runs])
        graphs = self.cuda_graphs and graphs_eligible(runs, self.params)
        return step_switch_above(self.dense_above, self.cost, work, self._route, graphs)

    def _plan(self, runs: list[PrefillRun], block_table: torch.Tensor) -> bool:
        """Build every run's PrefillPlan (`run.plan`: the layers only launch); True if the
        step's PBS work can be captured as CUDA graphs (every run sparse with a permuted
        region: a dense mask attends straight from one layer's cache, which a graph cannot
        replay elsewhere)."""
        route = self._route
        for run in runs:
            # The FA3 route's tail rows are composed with the run's block table here too.
            pages = dict(block_table=block_table[run.reqs], page_size=self.page_size)
            run.plan = plan_prefill(
                run.batch,
                self.params,
                self.device,
                self.num_kv_heads,
                route,
                tiles=self.tiles,
                dense=run.dense,
                **(pages if route == "fa3" else {}),
            )
        return self.cuda_graphs and route == "fa3" and graphs_eligible(runs, self.params)

    def _wrap_decodes(self, common: CommonAttentionMetadata, decode) -> PBSAttentionMetadata:
        return PBSAttentionMetadata(
            num_actual_tokens=common.num_actual_tokens,
            num_decode_tokens=common.num_actual_tokens,
            decode=decode,
            block_table=common.block_table_tensor,
            prefill_runs=[],
        )

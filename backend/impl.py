"""`PBSAttentionImpl`: decode tokens on the stock impl, prefill tokens on the PBS kernels.

Per layer: route (`backend/routing.py` folds in the layer's density reading from its last
estimated step and decides whether this step is held on the stock kernel), estimate
(`prefill_mask` per prefill run, over the run's `PrefillPlan` that the metadata builder
built once for the step; where the step could switch, the masks' densities start on their
way to the host without a sync, for the layer's next call), attend (decodes on the stock
impl, prefill runs on the prefill kernel of `backend/prefill_kernel.py`: FA3 on Hopper, the
Triton kernel elsewhere). No layer waits for the GPU: a per-layer sync to read this step's
density cost more host time than PBS saved on a small model (docs/benchmarks.md).

A layer whose configuration the PBS kernels cannot run (see `unsupported_reason`) gets the
stock impl itself instead of a PBSAttentionImpl, so it behaves exactly like a stock run;
the reason is logged once per process.
"""

from __future__ import annotations

import inspect

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import AttentionImpl, AttentionLayer, AttentionType
from vllm.v1.kv_cache_interface import is_quantized_kv_cache

from pbs_vllm import metrics
from pbs_vllm.backend.log import get_logger
from pbs_vllm.backend.metadata import PBSAttentionMetadata
from pbs_vllm.backend.prefill_kernel import prefill_attention
from pbs_vllm.backend.routing import LayerRouting, StepView
from pbs_vllm.backend.stats import STATS, to_host_async
from pbs_vllm.backend.stock import CPU_VIEWABLE_ISAS, paged_kv, stock_backend
from pbs_vllm.config import get_pbs_config
from pbs_vllm.kernels import PagedKV, prefill_mask
from pbs_vllm.kernels.graphs import GraphCaptureError, StepGraphs

logger = get_logger(__name__)


def impl_args(
    num_heads: int,
    head_size: int,
    scale: float,
    num_kv_heads: int,
    alibi_slopes: list[float] | None,
    sliding_window: int | None,
    kv_cache_dtype: str,
    logits_soft_cap: float | None = None,
    attn_type: str = AttentionType.DECODER,
    kv_sharing_target_layer_name: str | None = None,
    **extra_impl_args,
) -> dict:
    """The Attention layer's impl arguments by name (its call: positional + extras)."""
    named = dict(locals())
    return {**named.pop("extra_impl_args"), **named}


def unsupported_reason(args: dict) -> str | None:
    """Why the PBS kernels cannot run a layer with these `impl_args` (None if they can)."""
    head_size, kv_cache_dtype = args["head_size"], args["kv_cache_dtype"]
    if args["attn_type"] != AttentionType.DECODER:
        return f"attention type {args['attn_type']!r} (PBS runs causal decoder attention only)"
    if not 16 <= head_size <= 256 or head_size & (head_size - 1):
        return f"head size {head_size} (PBS needs a power of two in 16..256)"
    if args["sliding_window"] is not None:
        return f"sliding window {args['sliding_window']}"
    if args["logits_soft_cap"]:
        return f"logit softcap {args['logits_soft_cap']}"
    if args["alibi_slopes"] is not None:
        return "ALiBi slopes"
    if args.get("sinks") is not None:
        return "attention sinks"
    extras = sorted(k for k, v in args.items() if k not in _PLAIN_ARGS and v is not None)
    if extras:
        return f"impl options {extras}"
    if is_quantized_kv_cache(kv_cache_dtype):
        return f"quantized KV cache dtype {kv_cache_dtype!r}"
    if stock_backend().get_name() == "CPU_ATTN":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        cfg = get_current_vllm_config()
        isa = _get_attn_isa(
            cfg.model_config.dtype, cfg.cache_config.block_size, head_size, kv_cache_dtype
        )
        if isa not in CPU_VIEWABLE_ISAS:
            return f"CPU attention ISA {isa!r} (PBS reads the {CPU_VIEWABLE_ISAS} layouts)"
    return None


_PLAIN_ARGS = set(inspect.signature(impl_args).parameters) | {"sinks"}


_WARMED_UP: set[tuple] = set()
# PBS kernels that compile while serving, after the warm-up (armed by a successful one).
_COMPILES = None


def _compile_watch():
    global _COMPILES
    if _COMPILES is None:
        from pbs_vllm.kernels.warmup import CompileWatch

        _COMPILES = CompileWatch()
    return _COMPILES


# PBS's working memory per prefill step, measured at the warm-up and allocated once in
# vLLM's memory-profiling forward pass (see _reserve_in_profile).
_RESERVE = {"bytes": 0, "done": False}


def _reserve_in_profile(device: torch.device) -> None:
    """vLLM sizes the KV cache from the peak memory of a profiling forward pass in which
    attention does nothing (attn_metadata None); PBS's estimation and attention then find
    only vLLM's margin free (an FA3 call once ran out of memory that way). Allocating the
    measured working set there, once per process, makes the KV cache leave room for it."""
    if _RESERVE["done"] or not _RESERVE["bytes"] or device.type != "cuda":
        return
    _RESERVE["done"] = True
    from pbs_vllm.kernels.warmup import reserve_in_profile

    mib = _RESERVE["bytes"] / 2**20
    if reserve_in_profile(_RESERVE["bytes"], device):
        logger.info(f"PBS: {mib:.0f} MiB of prefill working memory kept out of the KV cache")
    else:
        logger.warning(
            f"PBS: could not allocate {mib:.0f} MiB of prefill working memory in "
            "the memory profile; long prefills may run out of GPU memory"
        )


def _kernel_shape(impl, dtype: torch.dtype) -> tuple:
    """(q heads, KV heads, head dim, dtype, device, params): the leading arguments of the
    start-up routines of `pbs_vllm.kernels.warmup` and `graphs` for this layer."""
    device = torch.device("cuda", torch.cuda.current_device())
    return impl.num_heads, impl.num_kv_heads, impl.head_size, dtype, device, impl.params


def _measure_working_set(impl, dtype: torch.dtype, max_len: int, page_size: int, chunk: int):
    """Record PBS's peak working memory for the largest chunk (`chunk` queries ending at
    key `max_len`), doubled with step graphs (a step's graph pool can outlive it while
    the next step captures)."""
    from pbs_vllm.kernels.warmup import working_set_bytes

    try:
        nbytes = working_set_bytes(
            *_kernel_shape(impl, dtype), page_size, chunk, max_len, attend=impl.attend
        )
    except Exception as e:  # serving still works, without the reservation
        logger.warning(f"PBS working-memory measurement failed ({type(e).__name__}: {e})")
        return
    nbytes *= 2 if impl.cuda_graphs else 1
    _RESERVE["bytes"] = max(_RESERVE["bytes"], nbytes)
    logger.info(
        f"PBS working memory: {nbytes / 2**20:.0f} MiB for a {chunk}-token prefill chunk "
        f"over {max_len} keys" + (" (doubled for step graphs)" if impl.cuda_graphs else "")
    )


def _warm_up_once(impl, dtype: torch.dtype, max_len: int, page_size: int, chunk: int) -> None:
    """Compile and tune the PBS kernels once per process and layer shape (see
    `pbs_vllm.kernels.warmup`), then measure their working memory for a `chunk`-token
    chunk; a failure is logged and leaves the kernels to compile on first use."""
    key = (impl.num_heads, impl.num_kv_heads, impl.head_size, dtype, impl.params, page_size)
    if key in _WARMED_UP:
        return
    _WARMED_UP.add(key)
    from pbs_vllm.kernels.warmup import warm_up

    shape = (
        f"{impl.num_heads} q / {impl.num_kv_heads} KV heads, head dim {impl.head_size}, "
        f"{impl.attend.kernel} attention"
    )
    try:
        seconds = warm_up(*_kernel_shape(impl, dtype), page_size, max_len, attend=impl.attend)
    except Exception as e:  # serving still works: the kernels compile on first use
        logger.warning(f"PBS warm-up for {shape} failed ({type(e).__name__}: {e}); skipped")
        return
    logger.info(
        f"PBS warm-up: kernels compiled for {shape} up to {max_len} tokens in {seconds:.1f} s"
    )
    _compile_watch().arm()
    _measure_working_set(impl, dtype, max_len, page_size, chunk)
    if impl.cuda_graphs and impl.attend.kernel == "fa3":
        _check_step_graphs(impl, dtype, page_size)


def _check_step_graphs(impl, dtype: torch.dtype, page_size: int) -> None:
    """Capture and replay one small synthetic step (`check_step_graphs`); a failure turns
    the step graphs off for the process, with one log line."""
    from pbs_vllm.kernels.graphs import check_step_graphs

    try:
        reason = check_step_graphs(*_kernel_shape(impl, dtype), page_size, impl.attend)
    except Exception as e:  # the eager path still serves
        reason = f"{type(e).__name__}: {e}"
    if reason is None:
        logger.info("PBS step graphs: a captured step replays exactly over another layer")
        return
    _GRAPHS["ok"] = False
    logger.warning(f"PBS step graphs off: the start-up check failed ({reason})")


def _report_compiles(longest: int) -> None:
    """Log the PBS kernels that compiled new variants while serving (after the warm-up)."""
    grown = _compile_watch().check()
    if grown:
        names = ", ".join(f"{k} ({n} variants)" for k, n in sorted(grown.items()))
        logger.warning(
            f"PBS kernels compiled while serving, after the start-up warm-up (a prefill of "
            f"{longest} tokens waited for them): {names}"
        )


# Process-wide state of the step graphs: after _MAX_CAPTURE_FAILURES failed captures
# they are off for good.
_GRAPHS = {"ok": True, "failures": 0}
_MAX_CAPTURE_FAILURES = 3


def _graphs_failed(m: PBSAttentionMetadata, error: Exception) -> None:
    """A capture failed: the rest of this step launches eagerly (one log line), and after
    a few such failures every later step too."""
    m.graphs_eligible = False
    _GRAPHS["failures"] += 1
    off = _GRAPHS["failures"] >= _MAX_CAPTURE_FAILURES
    _GRAPHS["ok"] = not off
    logger.warning(
        f"PBS prefill: CUDA graph capture failed ({error}); this step launches its kernels "
        "eagerly" + ("; cuda_graphs off for this process" if off else "")
    )


class PBSAttentionImpl(AttentionImpl[PBSAttentionMetadata]):
    """Routes a layer's decode rows to the stock impl and its prefill rows to PBS.

    Constructed with the stock impl's arguments (see `impl_args`). forward: query
    [T, Hq, D], output [T, Hq, D]; rows [0, num_decode_tokens) are decodes (the batch is
    reordered decodes-first), the rest are prefill chunks whose K/V the stock
    `do_kv_cache_update` has already written to kv_cache.
    """

    def __new__(cls, *args, **kwargs):
        reason = unsupported_reason(impl_args(*args, **kwargs))
        if reason is not None:
            logger.warning_once(
                f"PBS attention: {reason}; these layers run the stock "
                f"{stock_backend().get_name()} attention for all tokens"
            )
            return stock_backend().get_impl_cls()(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.stock = stock_backend().get_impl_cls()(*args, **kwargs)
        for name in (
            "num_heads",
            "head_size",
            "scale",
            "num_kv_heads",
            "kv_cache_dtype",
            "attn_type",
            "kv_sharing_target_layer_name",
        ):
            setattr(self, name, getattr(self.stock, name))
        vllm_config = get_current_vllm_config()
        config = get_pbs_config(vllm_config)
        self.params = config.sparsity_params()
        self.routing = LayerRouting(config.dense_hold_steps)
        # (step, densities on their way to the host, copy-done event or None): the reading
        # of this layer's last estimated step that could switch, for its next call
        self._reading: tuple[StepView, torch.Tensor, torch.cuda.Event | None] | None = None
        self.cuda_graphs = config.cuda_graphs
        self._on_cpu = stock_backend().get_name() == "CPU_ATTN"
        # attend(q, kv, mask, scale, out): FA3 on Hopper, else Triton (chosen once, logged)
        kernel = config.attention_kernel
        self.attend = prefill_attention("triton" if self._on_cpu and kernel == "auto" else kernel)
        # (max_len, page_size, chunk) to compile the kernels for at load time; chunk: the
        # most prefill tokens of one step (the working memory is measured for it)
        self._warmup = None
        self._longest_seen = 0  # longest prefill so far: compiles come with new lengths
        max_len = getattr(vllm_config.model_config, "max_model_len", None)
        if config.warmup and max_len and not self._on_cpu and torch.cuda.is_available():
            page_size = getattr(vllm_config.cache_config, "block_size", None) or 16
            sched = getattr(vllm_config, "scheduler_config", None)
            chunk = getattr(sched, "max_num_batched_tokens", None) or max_len
            self._warmup = (max_len, page_size, min(chunk, max_len))

    def get_impl_variants(self) -> tuple:
        """vLLM 0.32: lets the stock builder find its own impl inside ours."""
        return (self, self.stock)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        self.stock.process_weights_after_loading(act_dtype)
        if self._warmup is not None:
            _warm_up_once(self, act_dtype, *self._warmup)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Write this step's K/V exactly as the stock backend does (original order)."""
        self.stock.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: PBSAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(attn_metadata, PBSAttentionMetadata):
            # Profiling runs (None) and KV groups whose builder fell back to stock metadata.
            if attn_metadata is None:
                _reserve_in_profile(query.device)
            return self.stock.forward(
                layer,
                query,
                key,
                value,
                kv_cache,
                attn_metadata,
                output,
                output_scale,
                output_block_scale,
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("PBS attention does not fuse output quantization")
        m = attn_metadata
        step = StepView(
            can_switch=m.stock_all is not None,
            longest=m.longest_prefill,
            switch_above=m.switch_above,
            weights=m.sparse_weights,
        )
        self._fold_reading()
        if self.routing.held(step):
            # A recent step of this layer, with sequences at least as long, reached its
            # break-even density (dense_above, or the cost model's): the stock kernel
            # attends densely faster than PBS would sparsely.
            metrics.record_fallback("dense_held")
            return self.stock.forward(layer, query, key, value, kv_cache, m.stock_all, output)
        work, graphs = self._estimate(layer, query, kv_cache, m)
        self._read_densities(work, step, getattr(layer, "layer_name", None))
        if m.decode is not None:
            # The stock impl reads rows [0, m.decode.num_actual_tokens): the decodes.
            self.stock.forward(layer, query, key, value, kv_cache, m.decode, output)
        self._attend(layer, query, kv_cache, m, work, graphs, output)
        if m.longest_prefill > self._longest_seen:
            self._longest_seen = m.longest_prefill
            if _compile_watch().armed:
                _report_compiles(m.longest_prefill)
        return output

    def _estimate(self, layer, query, kv_cache, m: PBSAttentionMetadata):
        """(work, graphs): the prefill runs' masks, by replaying the step's estimation
        graph where the step has one (graphs then set), else launched eagerly."""
        graphs = self._step_graphs(m, query)
        work = self._estimate_graphed(graphs, query, kv_cache, m) if graphs else None
        if work is not None:
            return work, graphs
        return (self._plan_prefills(layer, query, kv_cache, m) if m.prefill_runs else []), None

    def _attend(self, layer, query, kv_cache, m, work, graphs, output) -> None:
        """Attend every prefill run into its rows of `output`: by graph replay where the
        step has graphs, else (or if the attention capture failed) eagerly."""
        if graphs is not None:
            if self._attend_graphed(graphs, work, m, output):
                return
            work = self._plan_prefills(layer, query, kv_cache, m)  # capture failed: re-estimate
        for run, q, kv, mask in work:
            self.attend(q, kv, mask, self.scale, output[run.rows])

    def _step_graphs(self, m: PBSAttentionMetadata, query: torch.Tensor) -> StepGraphs | None:
        """The step's CUDA graphs (created by its first layer), or None: the step is not
        eligible (see the builder), graphs are off or failed, or FA3 is not attending."""
        if not m.graphs_eligible or not _GRAPHS["ok"] or self.attend.kernel != "fa3":
            return None
        if m.graphs is None:
            rows = m.prefill_rows
            m.graphs = StepGraphs(
                rows.stop - rows.start, self.num_heads, self.head_size, query.dtype, query.device
            )
            m.graphs.owner = (self.scale, self.params)
        # a layer whose launches differ from the captured ones (another scale) runs eagerly
        return m.graphs if m.graphs.owner == (self.scale, self.params) else None

    def _estimate_graphed(self, graphs: StepGraphs, query, kv_cache, m) -> list[tuple] | None:
        """Estimation by graph replay (captured at the step's first layer); None where this
        layer's cache cannot stand in for the captured one, or the capture failed."""
        rows = m.prefill_rows
        cache = paged_kv(kv_cache, m.block_table, None)
        if not graphs.bind(query[rows], cache.key_cache, cache.value_cache):
            return None
        if not graphs.captured("estimate"):

            def estimate() -> list[tuple]:
                work = []
                for run in m.prefill_runs:
                    kv = PagedKV(
                        graphs.key_cache,
                        graphs.value_cache,
                        m.block_table[run.reqs],
                        graphs.offset,
                    )
                    q = graphs.q[run.rows.start - rows.start : run.rows.stop - rows.start]
                    mask = prefill_mask(q, kv, run.batch, self.params, self.scale, plan=run.plan)
                    work.append((run, q, kv, mask))
                return work

            try:
                graphs.capture("estimate", estimate)
            except GraphCaptureError as e:
                _graphs_failed(m, e)
                return None
        return graphs.replay("estimate")

    def _attend_graphed(self, graphs: StepGraphs, work, m, output) -> bool:
        """Attention by graph replay into the static output, copied to `output`'s prefill
        rows; False (nothing written) if the capture failed."""
        rows = m.prefill_rows
        if not graphs.captured("attend"):

            def attend() -> None:
                for run, q, kv, mask in work:
                    out = graphs.out[run.rows.start - rows.start : run.rows.stop - rows.start]
                    self.attend(q, kv, mask, self.scale, out)

            try:
                graphs.capture("attend", attend)
            except GraphCaptureError as e:
                _graphs_failed(m, e)
                return False
        graphs.replay("attend")
        output[rows].copy_(graphs.out)
        return True

    def _plan_prefills(self, layer, query, kv_cache, m: PBSAttentionMetadata) -> list[tuple]:
        """(run, q [T_run, Hq, D], PagedKV, mask) of every prefill run: estimation only."""
        cache = paged_kv(kv_cache, m.block_table, self._cpu_isa(layer) if self._on_cpu else None)
        work = []
        for run in m.prefill_runs:
            kv = PagedKV(cache.key_cache, cache.value_cache, m.block_table[run.reqs])
            q = query[run.rows]
            mask = prefill_mask(
                q, kv, run.batch, self.params, self.scale, dense=run.dense, plan=run.plan
            )
            work.append((run, q, kv, mask))
        return work

    def _cpu_isa(self, layer) -> str | None:
        """CPU_ATTN's cache layout: set on the layer by its builder (vLLM >= 0.32), on the
        stock impl before that."""
        return getattr(layer, "isa", None) or getattr(self.stock, "isa", None)

    def _read_densities(self, work: list[tuple], step: StepView, name) -> None:
        """Send the densities of the step's sparse masks to the host without a sync: to
        routing (`self._reading`, folded in at the layer's next call) where the step could
        switch, and to the stats while a sample is due (with each mask's per-KV-head
        densities when the layer has a name, `PBSStats.defer_sample`)."""
        sparse = [mask for run, _, _, mask in work if not run.dense]
        if not sparse:
            return
        needed, due = self.routing.needs_densities(step), STATS.density_due()
        if not needed and not due:
            return
        values = torch.stack([mask.density_tensor() for mask in sparse])
        if needed:
            self._reading = (step, *to_host_async(values))
        if due:
            heads = [mask.num_kv_heads for mask in sparse] if name is not None else []
            if heads:
                values = torch.cat([values, *(m.density_per_head_tensor() for m in sparse)])
            STATS.defer_sample(values, len(sparse), heads, name)

    def _fold_reading(self) -> None:
        """Hand the layer's pending density reading to routing (`LayerRouting.observe`).
        Its copy was queued a step ago, so waiting for it waits for nothing in practice."""
        if self._reading is None:
            return
        step, host, done = self._reading
        self._reading = None
        if done is not None:
            done.synchronize()
        self.routing.observe(step, host.tolist())

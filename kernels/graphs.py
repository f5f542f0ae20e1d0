"""Plan once per step, replay per layer: a prefill step's PBS work as CUDA graphs.

Every attention layer of a step launches the same PBS kernels on the same shapes (the
step's batch fixes them); per layer only three inputs change: the query rows, the output
rows and the layer's KV cache. Launching ~15 kernels plus their Python per layer costs
about as much host time as a small model's whole layer on the GPU, so on such models the
GPU waits on the host. `StepGraphs` captures the work once, at the step's first layer,
over static query / output buffers and that layer's cache, and replays it for every layer:

  bind(query rows, key cache, value cache)   copy the rows into `q`, point `offset` at
                                             this layer's cache (2 small copies)
  capture(name, fn) at the first layer       fn's launches become graph `name`
  replay(name)                               one launch per graph
  out                                        the attention output, copied out by the caller

Kernels read another layer's cache through `PagedKV.cache_offset` (= `offset`): element
distances from the captured cache to this layer's, which requires the same dtype, shape
and strides (vLLM allocates every layer's cache alike). What the work derives from the
batch alone is planned before the capture (`pbs_vllm.kernels.plan.PrefillPlan`, which
the captured calls take); an upload inside a capture raises (`paged.upload`), so a graph
never replays a stale host copy.
No vLLM here; CUDA only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pbs_vllm.kernels.paged import upload

_STREAMS: dict[int, torch.cuda.Stream] = {}
_OFFSETS: dict[tuple, torch.Tensor] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            # cuBLAS creates its handle and this stream's workspace on first use, which a
            # capture cannot do: one small matmul here, outside any capture.
            x = torch.ones(1, 8, 8, device=device)
            torch.bmm(x, x)
        torch.cuda.current_stream(device).wait_stream(stream)
        _STREAMS[index] = stream
    return _STREAMS[index]


class GraphCaptureError(RuntimeError):
    """A step's PBS work could not be captured (the caller runs it eagerly)."""


def _layout(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.stride(), t.device)


class StepGraphs:
    """The captured PBS work of one prefill step (see the module docstring).

    q / out: [tokens, Hq, D] static buffers (the step's prefill rows); offset: int64 [2]
    device tensor, the `PagedKV.cache_offset` of the captured work; key_cache /
    value_cache: the captured layer's cache views (None before `bind`); outputs: what each
    captured function returned (its tensors are rewritten by every replay).
    """

    def __init__(self, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device):
        self.device = torch.device(device)
        self.q = torch.empty(tokens, heads, head_dim, dtype=dtype, device=self.device)
        self.out = torch.empty_like(self.q)
        self.offset = torch.zeros(2, dtype=torch.int64, device=self.device)
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None
        self.outputs: dict[str, Any] = {}
        self.owner: Any = None  # what the caller's captured launches depend on, for its checks
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def __repr__(self) -> str:
        return (
            f"StepGraphs(tokens={self.q.shape[0]}, heads={self.q.shape[1]}, "
            f"head_dim={self.q.shape[2]}, captured={sorted(self._graphs)})"
        )

    def bind(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
        """Load one layer: its query rows [tokens, Hq, D] into `q` and its cache's distance
        from the captured one into `offset`. False (nothing copied) if this cache cannot
        stand in for the captured one (other dtype, shape or strides, or an address
        distance that is not a whole number of elements)."""
        if query.shape != self.q.shape or query.dtype != self.q.dtype:
            return False
        if self.key_cache is None:
            self.key_cache, self.value_cache = key_cache, value_cache
        elif _layout(key_cache) != _layout(self.key_cache) or _layout(value_cache) != _layout(
            self.value_cache
        ):
            return False
        offset = self._offset_of(key_cache, value_cache)
        if offset is None:
            return False
        self.q.copy_(query)
        self.offset.copy_(offset, non_blocking=True)
        return True

    def _offset_of(self, key_cache: torch.Tensor, value_cache: torch.Tensor):
        base = (self.key_cache.data_ptr(), self.value_cache.data_ptr())
        key = (*base, key_cache.data_ptr(), value_cache.data_ptr())
        if key not in _OFFSETS:
            size = key_cache.element_size()
            dk, dv = key[2] - base[0], key[3] - base[1]
            if dk % size or dv % size:
                return None
            _OFFSETS[key] = upload(torch.tensor([dk // size, dv // size]), self.device)
        return _OFFSETS[key]

    def captured(self, name: str) -> bool:
        return name in self._graphs

    def capture(self, name: str, fn: Callable[[], Any]) -> Any:
        """Capture fn's launches as graph `name` (nothing runs until `replay`); returns and
        keeps fn's result. Raises GraphCaptureError (the capture abandoned) if fn fails or
        does something a graph cannot hold."""
        if torch.cuda.is_current_stream_capturing():
            raise GraphCaptureError("a CUDA graph is already being captured on this stream")
        stream = _capture_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    result = fn()
                finally:
                    graph.capture_end()
        except Exception as e:
            raise GraphCaptureError(f"{type(e).__name__}: {e}") from e
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graphs[name] = graph
        self._pool = graph.pool()  # the step's later graphs share this one's memory pool
        self.outputs[name] = result
        return result

    def replay(self, name: str) -> Any:
        """Run graph `name` on the current stream; returns its captured function's result."""
        self._graphs[name].replay()
        return self.outputs[name]


def capture_prefill(graphs: StepGraphs, block_table, plan, params, scale: float, attend):
    """Capture one prefill run's estimation ("estimate": its mask) and attention ("attend":
    into `graphs.out`) over `graphs.q` and the bound cache; returns the captured mask.
    plan: the run's PrefillPlan (`plan_prefill` with attention='fa3' and this block
    table, built before the capture); attend(q, kv, mask, scale, out) is the prefill
    attention (FA3 route)."""
    from pbs_vllm.kernels.paged import PagedKV
    from pbs_vllm.kernels.prefill import prefill_mask

    view = PagedKV(graphs.key_cache, graphs.value_cache, block_table, graphs.offset)
    mask = graphs.capture(
        "estimate",
        lambda: prefill_mask(graphs.q, view, plan.batch, params, scale, plan=plan),
    )
    graphs.capture("attend", lambda: attend(graphs.q, view, mask, scale, graphs.out))
    return mask


def check_step_graphs(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    params,
    page_size: int,
    attend: Callable,
    route: str = "fa3",
) -> str | None:
    """Capture one small step over a synthetic layer and replay it over a second one:
    None if the replay equals the eager calls on the second layer, else why not.

    Run at start-up (the warm-up): it creates the capture stream, the graph pool and the
    side stream's cuBLAS workspace before serving, and a model whose launches cannot be
    captured is found then, not at its first long request. attend(q, kv, mask, scale,
    out) is the server's prefill attention.
    """
    from pbs_vllm.kernels.attention import tile_shape
    from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
    from pbs_vllm.kernels.plan import plan_prefill
    from pbs_vllm.kernels.prefill import prefill_mask

    device = torch.device(device)
    n = 4 * params.segment_size + params.block_size // 2 + 3  # permuted region, off-block end
    q_len = params.block_size + 5
    batch = ChunkBatch([q_len], [n - q_len])
    scale = head_dim**-0.5
    gen = torch.Generator(device=device).manual_seed(0)
    n_pages = -(-n // page_size)
    table = torch.randperm(n_pages, device=device, generator=gen).to(torch.int32)[None]
    layers = []
    for _ in range(2):
        q = torch.randn(q_len, num_q_heads, head_dim, device=device, generator=gen).to(dtype)
        kc, vc = (
            torch.randn(
                n_pages, page_size, num_kv_heads, head_dim, device=device, generator=gen
            ).to(dtype)
            for _ in range(2)
        )
        layers.append((q, PagedKV(kc, vc, table)))
    tiles = tile_shape(num_q_heads, num_kv_heads, head_dim, dtype, params.block_size)
    plan = plan_prefill(
        batch,
        params,
        device,
        num_kv_heads,
        route,
        tiles=tiles,
        block_table=table,
        page_size=page_size,
    )
    graphs = StepGraphs(q_len, num_q_heads, head_dim, dtype, device)
    try:
        for i, (q, kv) in enumerate(layers):
            if not graphs.bind(q, kv.key_cache, kv.value_cache):
                return "a second layer's cache cannot stand in for the first's"
            if i == 0:
                capture_prefill(graphs, table, plan, params, scale, attend)
            graphs.replay("estimate")
            graphs.replay("attend")
        q, kv = layers[1]
        want = torch.empty_like(q)
        attend(q, kv, prefill_mask(q, kv, batch, params, scale, plan=plan), scale, want)
        if not torch.equal(graphs.out, want):
            err = (graphs.out.float() - want.float()).abs().max().item()
            return f"replayed output differs from the eager one (max abs diff {err:.3g})"
    except GraphCaptureError as e:
        return str(e)
    finally:
        torch.cuda.synchronize(device)
    return None

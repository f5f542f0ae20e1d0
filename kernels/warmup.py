"""Compile and tune every PBS kernel variant a model's shape needs before the first request.

Triton compiles a kernel the first time it meets a new set of compile-time constants and
tunes the attention kernel on its first call. Most constants are fixed by the model and
the settings (head dim, GQA group, block and segment sizes); what varies with the prompt
is the selection kernel's candidate bucket (the next power of two of a sequence's
permuted key blocks) and the key-importance split length. Without a warm-up the first
request at each new length bucket pays those compiles (measured on an H200, Qwen2.5-0.5B
shape: the first 64K request took 8-30 s, the next 0.35-0.44 s).

`warm_up` runs one realistic chunk (which also tunes the attention kernel on real sizes),
then one query block per candidate bucket up to `max_len`, on a synthetic paged cache, and
frees everything. `warmup_lengths` is the plan, a pure function.
"""

from __future__ import annotations

import time

import torch
import triton

from pbs_vllm.kernels.attention import pbs_attention
from pbs_vllm.kernels.importance import _SPLITS, key_importance
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams
from pbs_vllm.kernels.prefill import prefill_mask

# Longest synthetic sequence: buckets past it compile on first use instead (a 256K-key
# cache of 8 KV heads at head dim 128 in bf16 is 1 GiB).
MAX_WARMUP_KEYS = 256 * 1024


def warmup_lengths(max_len: int, params: SparsityParams) -> list[int]:
    """Sequence lengths whose last query block reaches each candidate bucket of the
    selection kernel (max(16, next power of two of the permuted key blocks)) that a
    sequence of at most `max_len` (capped at MAX_WARMUP_KEYS) tokens can reach."""
    bs, ss = params.block_size, params.segment_size
    longest = min(max_len, MAX_WARMUP_KEYS)
    per_segment = ss // bs  # candidates come in whole segments
    out, bucket = [], 16
    while bucket == 16 or (bucket // 2) * bs < longest:
        # the most candidates in this bucket that a sequence of `longest` tokens has
        c = min(bucket, (longest - 1) // bs) // per_segment * per_segment
        if c and (bucket == 16 or c > bucket // 2):
            out.append(c * bs + 1)  # permuted region (n - 1) // ss * ss = c * bs keys
        bucket *= 2
    return out


def _triton_attend(q, kv, mask, scale, out) -> None:
    """The default `attend` of the start-up routines: the portable Triton kernel."""
    pbs_attention(q, kv, mask, scale, out=out)


def _synthetic_cache(
    n_keys: int, page_size: int, num_kv_heads: int, head_dim: int, dtype, device, gen
) -> PagedKV:
    """One sequence of `n_keys` random keys and values in pages 0.. of a fresh cache."""
    n_pages = triton.cdiv(n_keys, page_size)
    shape = (n_pages, page_size, num_kv_heads, head_dim)
    kc = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    vc = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    return PagedKV(kc, vc, torch.arange(n_pages, dtype=torch.int32, device=device)[None])


def warm_up(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    params: SparsityParams,
    page_size: int,
    max_len: int,
    attend=None,
) -> float:
    """Run the PBS kernels once per compile-time variant for this shape; returns seconds.

    attend(q, kv, mask, scale, out): the attention the server uses (default
    `pbs_attention`, the Triton kernel).

    Uses a synthetic cache of up to `MAX_WARMUP_KEYS` keys (random bf16/fp16), returned to
    the allocator's pool and emptied from the cache when done.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    scale = head_dim**-0.5
    lengths = warmup_lengths(max_len, params)
    n_keys = max(lengths + [min(max_len, 16384)])
    gen = torch.Generator(device=device).manual_seed(0)
    kv = _synthetic_cache(n_keys, page_size, num_kv_heads, head_dim, dtype, device, gen)

    def query(n: int) -> torch.Tensor:
        return torch.randn(n, num_q_heads, head_dim, dtype=dtype, device=device, generator=gen)

    attend = _triton_attend if attend is None else attend

    def prefill(q_len: int, n: int, cache: PagedKV = kv) -> None:
        q = query(q_len)
        mask = prefill_mask(q, cache, ChunkBatch([q_len], [n - q_len]), params, scale)
        attend(q, cache, mask, scale, torch.empty_like(q))

    # A realistic chunk first: the attention kernel is tuned on its first call.
    chunk = min(4096, n_keys // 2)
    prefill(chunk, n_keys)
    for n in lengths:
        prefill(min(params.block_size, n), n)
    if params.permute:
        q_last = query(params.block_size)
        for split in _SPLITS:
            q_pos = n_keys - params.block_size
            key_importance(q_last, kv, 0, q_pos, n_keys // 2, scale, split_len=split)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del prefill, kv
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def working_set_bytes(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    params: SparsityParams,
    page_size: int,
    q_len: int,
    n_keys: int,
    attend=None,
) -> int:
    """Peak bytes that PBS allocates for one prefill chunk of `q_len` queries ending at
    key `n_keys` (estimation and attention), beyond the query, output and KV cache it is
    given: memory a serving process needs besides vLLM's KV cache. CUDA only.

    Measured on a synthetic cache of random keys (`n_keys` capped at MAX_WARMUP_KEYS), on
    which tau keeps most blocks: close to the largest selection, so an upper estimate.
    Resets the device's peak-memory statistics.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"working_set_bytes measures CUDA memory, got device {device}")
    n_keys = min(n_keys, MAX_WARMUP_KEYS)
    q_len = max(1, min(q_len, n_keys))
    attend = _triton_attend if attend is None else attend
    gen = torch.Generator(device=device).manual_seed(1)
    kv = _synthetic_cache(n_keys, page_size, num_kv_heads, head_dim, dtype, device, gen)
    q = torch.randn(q_len, num_q_heads, head_dim, dtype=dtype, device=device, generator=gen)
    out = torch.empty_like(q)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    mask = prefill_mask(q, kv, ChunkBatch([q_len], [n_keys - q_len]), params, head_dim**-0.5)
    attend(q, kv, mask, head_dim**-0.5, out)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del mask, q, out, kv
    torch.cuda.empty_cache()
    return max(0, peak)


def reserve_in_profile(nbytes: int, device: torch.device | str) -> bool:
    """Allocate and free `nbytes` on `device`, so that a memory profile taken around this
    call (vLLM's, which sizes the KV cache from the peak of a forward pass whose attention
    does nothing) counts them. True if the allocation succeeded."""
    if nbytes <= 0:
        return True
    try:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        return False
    del block
    return True


_KERNEL_MODULES = ("attention", "importance", "block_pool", "permute", "selection", "varlen")


def compiled_variants() -> dict[str, int]:
    """Compiled variants per PBS Triton kernel in this process, by kernel name (kernels
    not compiled yet, and everything under the Triton interpreter, are left out)."""
    import importlib

    out: dict[str, int] = {}
    for mod_name in _KERNEL_MODULES:
        mod = importlib.import_module(f"pbs_vllm.kernels.{mod_name}")
        for name, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if name.startswith("_") and name.endswith("_kernel") and isinstance(caches, dict):
                n = sum(len(c[0]) for c in caches.values() if c and isinstance(c[0], dict))
                if n:
                    out[name] = n
    return out


class CompileWatch:
    """Notices PBS kernels compiling while serving, after the start-up warm-up: each such
    compile made a request wait (seconds, on a GPU). `arm()` takes the post-warm-up
    snapshot; `check()` returns the kernels with new variants since the last check
    (empty when unarmed or nothing changed). `counts` is injectable for tests."""

    def __init__(self, counts=compiled_variants) -> None:
        self._counts = counts
        self._last: dict[str, int] | None = None

    def arm(self) -> None:
        self._last = self._counts()

    @property
    def armed(self) -> bool:
        return self._last is not None

    def check(self) -> dict[str, int]:
        if self._last is None:
            return {}
        now = self._counts()
        grown = {k: n for k, n in now.items() if n > self._last.get(k, 0)}
        self._last = now
        return grown

"""Inputs of the prefill kernels: a varlen batch of chunks and a paged K/V cache.

Shapes (T = total query tokens of the batch, Hq / Hkv query / KV heads, D head dim):
  q            [T, Hq, D]
  key_cache    logical [num_pages, page_size, Hkv, D], any strides (vLLM's views are
               non-contiguous; the CPU layout stores K transposed per page, which is
               just another stride pattern of the same logical view)
  value_cache  logical [num_pages, page_size, Hkv, D], any strides
  block_table  [batch, max_pages_per_seq] int32, page ids in any order
Sequence b owns query rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) at absolute positions
[ctx_lens[b], ctx_lens[b] + q_lens[b]) and attends causally to keys [0, seq_lens[b]),
seq_lens = ctx_lens + q_lens, all of them already written to the paged cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    """A paged K/V cache plus the block table that maps each sequence to its pages.

    cache_offset: None, or an int64 [2] tensor on the cache's device holding element
    offsets that the kernels reading the cache (key importance, key pooling, the FA3
    route's gather) add to the key_cache / value_cache pointers. A CUDA graph captured
    over one layer's cache replays over another layer's cache of the same shape and
    strides by changing these two numbers on the device (`pbs_vllm.kernels.graphs`).
    Kernels that cannot honour it (the Triton attention kernel, the dense FA3 call, the
    CPU path) refuse a PagedKV that has one.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_table: torch.Tensor
    cache_offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.key_cache.dim() != 4 or self.key_cache.shape != self.value_cache.shape:
            raise ValueError(
                "key_cache/value_cache must both be [num_pages, page_size, kv_heads, head_dim], "
                f"got {tuple(self.key_cache.shape)} and {tuple(self.value_cache.shape)}"
            )
        if self.block_table.dim() != 2 or self.block_table.dtype != torch.int32:
            raise ValueError(
                "block_table must be a 2-D int32 tensor, got "
                f"{self.block_table.dtype} of shape {tuple(self.block_table.shape)}"
            )

        off = self.cache_offset
        if off is not None and (
            off.dtype != torch.int64 or off.shape != (2,) or off.device != self.key_cache.device
        ):
            raise ValueError(
                "cache_offset must be an int64 tensor of shape (2,) on the cache's device, got "
                f"{off.dtype} {tuple(off.shape)} on {off.device}"
            )

    @property
    def page_size(self) -> int:
        return self.key_cache.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.key_cache.shape[3]

    @classmethod
    def from_contiguous(
        cls, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], page_size: int = 16
    ) -> PagedKV:
        """Wrap contiguous varlen K/V ([sum(seq_lens), Hkv, D]) as a paged cache.

        Pages are copied into a fresh pool (one per `page_size` keys of a sequence), so
        Hugging Face style callers can use the same kernels.
        """
        if k.shape != v.shape or k.dim() != 3 or k.shape[0] != sum(seq_lens):
            raise ValueError(
                f"k/v must be [sum(seq_lens)={sum(seq_lens)}, kv_heads, head_dim], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        pages_per_seq = [-(-n // page_size) for n in seq_lens]
        num_pages = max(sum(pages_per_seq), 1)
        kc = k.new_zeros(num_pages, page_size, *k.shape[1:])
        vc = v.new_zeros(num_pages, page_size, *v.shape[1:])
        table = torch.zeros(len(seq_lens), max(pages_per_seq + [1]), dtype=torch.int32)
        page, start = 0, 0
        for b, (n, p) in enumerate(zip(seq_lens, pages_per_seq)):
            for i in range(p):
                lo, hi = start + i * page_size, min(start + (i + 1) * page_size, start + n)
                kc[page, : hi - lo] = k[lo:hi]
                vc[page, : hi - lo] = v[lo:hi]
                table[b, i] = page
                page += 1
            start += n
        return cls(kc, vc, table.to(k.device))


@dataclass
class ChunkBatch:
    """Host-side description of a varlen batch of prefill chunks (no device sync needed).

    q_lens[b] query tokens at absolute positions [ctx_lens[b], ctx_lens[b] + q_lens[b]).
    What the kernels derive from a batch alone (query blocks, tile tables, ... on the host
    and the device) is its `pbs_vllm.kernels.plan.PrefillPlan`, built once per step.
    Treat a batch as immutable.
    """

    q_lens: list[int]
    ctx_lens: list[int]

    def __post_init__(self) -> None:
        if len(self.q_lens) != len(self.ctx_lens):
            raise ValueError(
                f"q_lens ({len(self.q_lens)}) and ctx_lens ({len(self.ctx_lens)}) differ in length"
            )
        if any(n < 1 for n in self.q_lens) or any(c < 0 for c in self.ctx_lens):
            raise ValueError(
                f"q_lens must be >= 1 and ctx_lens >= 0, got {self.q_lens} / {self.ctx_lens}"
            )

    @property
    def seq_lens(self) -> list[int]:
        return [c + n for c, n in zip(self.ctx_lens, self.q_lens)]

    @property
    def cu_seqlens_q(self) -> list[int]:
        out = [0]
        for n in self.q_lens:
            out.append(out[-1] + n)
        return out

    def __len__(self) -> int:
        return len(self.q_lens)


_ZERO_OFFSETS: dict[str, torch.Tensor] = {}


def cache_offsets(kv: PagedKV) -> torch.Tensor:
    """kv.cache_offset, or a shared int64 [2] zero tensor on the cache's device."""
    if kv.cache_offset is not None:
        return kv.cache_offset
    dev = kv.key_cache.device
    key = str(dev)
    if key not in _ZERO_OFFSETS:
        _ZERO_OFFSETS[key] = torch.zeros(2, dtype=torch.int64, device=dev)
    return _ZERO_OFFSETS[key]


def refuse_cache_offset(kv: PagedKV, what: str) -> None:
    """Raise if `kv` carries a cache offset that the kernel `what` cannot apply."""
    if kv.cache_offset is not None:
        raise ValueError(f"{what} reads the cache directly and takes no cache_offset")


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a small host tensor to `device` without synchronising a CUDA stream.

    A plain `.to("cuda")` of pageable memory waits for the stream to drain, which stalls
    the host once per call; through pinned memory the copy is queued like a kernel.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        # A graph would replay the copy from a pinned buffer that is reused afterwards:
        # everything a step uploads is planned before its graphs are captured.
        raise RuntimeError("upload() during CUDA graph capture: plan the step first")
    return host.pin_memory().to(device, non_blocking=True)


# Triton specialises a pointer argument on 16-byte alignment: a row of a packed upload
# that starts off that boundary would compile a second variant of every kernel reading it
# (seen on the GPU as compiles at the first request of each new prompt length).
_ALIGN_BYTES = 16


def upload_rows(host: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """`upload` a 2-D host tensor in one copy and return its rows, each starting on a
    16-byte boundary (the row length is padded on the device, the padding never read),
    so no kernel variant depends on the row length."""
    if host.dim() != 2:
        raise ValueError(f"upload_rows takes a 2-D tensor, got shape {tuple(host.shape)}")
    n = host.shape[1]
    per = max(1, _ALIGN_BYTES // host.element_size())
    width = -(-n // per) * per
    if width != n:
        host = torch.cat([host, host.new_zeros(host.shape[0], width - n)], dim=1)
    return tuple(row[:n] for row in upload(host, device).unbind(0))

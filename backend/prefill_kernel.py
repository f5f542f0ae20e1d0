"""Which kernel attends the PBS prefill masks: chosen once per process, logged in one line.

  fa3     `pbs_vllm.kernels.varlen` over vLLM's bundled FlashAttention-3 (Hopper, sm90):
          a block-ordered scratch copy of the selected keys per KV head, then FA3 itself,
          so every computed block runs at FA3's rate
  triton  the portable Triton kernel (`pbs_vllm.kernels.attention`): every other GPU, the
          CPU, and the fallback

`attention_kernel = "auto"` takes fa3 where it can run and triton elsewhere; "fa3" where it
cannot run is a start-up error naming why. A call that FA3 refuses at run time (an input
check) logs one line and moves the process to triton for good.
"""

from __future__ import annotations

import functools

import torch

from pbs_vllm.backend.log import get_logger
from pbs_vllm.kernels import PagedKV, PBSBlockMask, pbs_attention
from pbs_vllm.kernels.varlen import pbs_attention_varlen

logger = get_logger(__name__)

KERNELS = ("auto", "fa3", "triton")


def fa3_unavailable_reason() -> str | None:
    """Why vLLM's FA3 cannot attend PBS masks in this process (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"compute capability {major}.{minor} (FA3 needs 9.x, Hopper)"
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except ImportError as e:
        return f"vllm.vllm_flash_attn is not importable ({e})"
    if not is_fa_version_supported(3):
        return "this vLLM build has no FA3 kernels"
    return None


class PrefillAttention:
    """attend(q, kv, mask, scale, out): one PBS mask's attention on the chosen kernel."""

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self._varlen = None
        if kernel == "fa3":
            from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

            self._varlen = functools.partial(flash_attn_varlen_func, fa_version=3)

    def __call__(
        self, q: torch.Tensor, kv: PagedKV, mask: PBSBlockMask, scale: float, out: torch.Tensor
    ) -> torch.Tensor:
        if self._varlen is not None:
            try:
                return pbs_attention_varlen(q, kv, mask, scale, self._varlen, out=out)
            except RuntimeError as e:  # FA3's input checks raise before any launch
                logger.warning(
                    f"PBS prefill: FA3 refused a mask ({e}); the Triton kernel attends from now on"
                )
                self.kernel, self._varlen = "triton", None
        return pbs_attention(q, kv, mask, scale, out=out)


@functools.cache
def prefill_attention(choice: str) -> PrefillAttention:
    """The process-wide prefill kernel for `attention_kernel = choice` (one log line)."""
    if choice not in KERNELS:
        raise ValueError(f"attention_kernel={choice!r}: must be one of {KERNELS}")
    reason = fa3_unavailable_reason() if choice in ("auto", "fa3") else "attention_kernel=triton"
    if choice == "fa3" and reason is not None:
        raise ValueError(f"attention_kernel='fa3' cannot run here: {reason}")
    kernel = "fa3" if reason is None else "triton"
    why = "vLLM's FlashAttention-3 over a block-ordered scratch copy" if kernel == "fa3" else reason
    logger.info(f"PBS prefill attention kernel: {kernel} ({why})")
    return PrefillAttention(kernel)

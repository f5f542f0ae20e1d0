"""Session-wide settings, applied before any test module imports vLLM or Triton.

Without CUDA, vLLM must run on the PBS CPU platform (`PBS_VLLM_CPU_PLATFORM=1`) and Triton
kernels in the interpreter (`TRITON_INTERPRET=1`); vLLM resolves its platform once per
process, so this cannot wait for a module-level conftest.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

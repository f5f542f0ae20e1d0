"""Engine-level tests: real `vllm.LLM` engines and `vllm serve` on the embedded tiny model.

Without CUDA, vLLM must resolve to PBSCpuPlatform and Triton must run in the interpreter,
so both variables are set before anything imports vllm or triton. VLLM_TARGET_DEVICE must
stay unset: `cpu` there makes vLLM skip platform plugins.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine

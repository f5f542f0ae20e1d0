"""Backend-level harness: real VllmConfig, real Attention layers, our builder and impl.

vLLM must resolve its platform to PBSCpuPlatform, and Triton must run in the interpreter
(no GPU here), so both variables are set before anything imports vllm or triton.
"""

from __future__ import annotations

import os
import zlib

import torch

os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from backend_harness import BackendHarness  # noqa: E402


@pytest.fixture
def gen(request) -> torch.Generator:
    """CPU generator seeded from the test id: fresh per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def harness_factory(gen):
    """make(pbs_settings, **layer_kwargs) -> BackendHarness; closes them after the test."""
    made: list[BackendHarness] = []

    def make(pbs: dict, **layer_kwargs) -> BackendHarness:
        h = BackendHarness(pbs, gen, **layer_kwargs)
        made.append(h)
        return h

    yield make
    for h in reversed(made):
        h.close()

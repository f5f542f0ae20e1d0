"""Accuracy tests import the repository's `training` package (not installed): put the
repository root on sys.path, and make vLLM use the PBS CPU platform with Triton interpreted."""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen(request) -> torch.Generator:
    """CPU generator seeded from the test id: fresh per test, reproducible per test."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))

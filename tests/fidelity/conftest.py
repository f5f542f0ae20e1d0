"""Per-test seeds for the fidelity tests."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test's id: fresh per test, reproducible per test."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)

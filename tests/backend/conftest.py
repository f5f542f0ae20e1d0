"""Backend-level harness: real VllmConfig, real Attention layers, our builder and impl.

tests/conftest.py makes vLLM resolve its platform to PBSCpuPlatform and Triton run in the
interpreter (no GPU here), and gives the seeded `gen` fixture.
"""

from __future__ import annotations

import pytest
from backend_harness import BackendHarness


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

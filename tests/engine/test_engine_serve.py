"""The OpenAI-compatible HTTP server with `--attention-backend pbs` on 127.0.0.1."""

from __future__ import annotations

import httpx
import pytest
from engine_util import PBS_SPARSE
from server_util import free_port, start_server, stop, wait_healthy

from pbs_vllm.models import tiny_llama_path

pytestmark = pytest.mark.engine


def test_server_answers_completions_on_the_pbs_backend(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server(port, PBS_SPARSE, log)
    try:
        assert wait_healthy(proc, port), log.read_text()[-3000:]
        prompt = " ".join(["the paged cache keeps keys and values in pages"] * 12)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={
                "model": tiny_llama_path(),
                "prompt": prompt,
                "max_tokens": 4,
                "temperature": 0.0,
            },
            timeout=300,
        )
    finally:
        stop(proc)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["prompt_tokens"] > 64  # spans several 64-token chunks
    assert isinstance(body["choices"][0]["text"], str)
    assert "PBS prefill:" in log.read_text()


def test_bad_pbs_config_stops_the_server_naming_the_field(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server(port, {"tau": 2}, log)
    try:
        assert not wait_healthy(proc, port)
    finally:
        stop(proc)
    assert proc.returncode != 0
    text = log.read_text()
    assert "PBSConfigError" in text and "pbs.tau = 2" in text

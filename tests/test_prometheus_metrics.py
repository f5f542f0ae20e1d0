"""pbs:* Prometheus metrics, in process and across processes as vLLM's /metrics reads them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pbs_vllm.metrics import record_fallback, record_step

RECORD = """
from pbs_vllm.metrics import record_fallback, record_step
record_step({sparse}, {dense}, {density})
record_fallback("short_prompt", 2)
"""


def _value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_record_step_in_process():
    before = {p: _value("pbs:prefill_tokens_total", path=p) for p in ("sparse", "dense")}
    fb = _value("pbs:fallback_total", reason="too_short")
    record_step(300, 17, 0.375)
    record_step(0, 5)
    record_fallback("too_short")
    assert _value("pbs:prefill_tokens_total", path="sparse") == before["sparse"] + 300
    assert _value("pbs:prefill_tokens_total", path="dense") == before["dense"] + 22
    assert _value("pbs:prefill_density") == 0.375  # unchanged by a step without a sample
    assert _value("pbs:fallback_total", reason="too_short") == fb + 1


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="sparse_tokens=-1"):
        record_step(-1, 0)
    with pytest.raises(ValueError, match=r"density=1.5: must be in \[0, 1\]"):
        record_step(1, 0, 1.5)
    with pytest.raises(ValueError, match="reason=''"):
        record_fallback("")


def test_engine_processes_reach_vllms_metrics_registry(tmp_path, monkeypatch):
    """Two 'engine' processes record with PROMETHEUS_MULTIPROC_DIR set; the registry vLLM's
    API server serves on /metrics sums their counters and shows the latest density."""
    env_dir = str(tmp_path)
    for sparse, dense, density in ((1000, 24, 0.25), (500, 0, 0.5)):
        code = RECORD.format(sparse=sparse, dense=dense, density=density)
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            timeout=120,
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": env_dir},
        )
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", env_dir)
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    text = generate_latest(get_prometheus_registry()).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples["pbs:prefill_tokens_total", (("path", "sparse"),)] == 1500
    assert samples["pbs:prefill_tokens_total", (("path", "dense"),)] == 24
    assert samples["pbs:fallback_total", (("reason", "short_prompt"),)] == 4
    assert samples["pbs:prefill_density", ()] == 0.5

"""Reliability tests: a module-scoped vLLM server on 127.0.0.1 (`start_server` of
`pbs_vllm.evals.soak`, which gives it TRITON_INTERPRET), whose log tail is attached to the
report of any test of that module that fails.
"""

from __future__ import annotations

import pytest

from pbs_vllm.evals.soak import Server, start_server

LOG_TAIL_CHARS = 6000


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    """One server per test module; the module may set SERVER_OPTIONS (start_server kwargs)."""
    options = getattr(request.module, "SERVER_OPTIONS", {})
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(log, **options)
    request.module._server_log = log
    yield srv
    srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    log = getattr(item.module, "_server_log", None)
    if report.failed and log is not None and log.exists():
        report.sections.append(
            ("vllm server log (tail)", log.read_text(errors="replace")[-LOG_TAIL_CHARS:])
        )

"""Plugin registration: entry points, `pbs`/`CUSTOM` resolution, idempotence, spawn."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from importlib.metadata import entry_points

import pytest

vllm = pytest.importorskip("vllm")

from pbs_vllm import plugin  # noqa: E402


def _resolve(name: str) -> str:
    from vllm.config import AttentionConfig

    return AttentionConfig(backend=name).backend.get_path()


def test_entry_points_are_discoverable():
    general = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    platform = {e.name: e.value for e in entry_points(group="vllm.platform_plugins")}
    assert general.get("pbs") == "pbs_vllm.plugin:register"
    assert platform.get("pbs") == "pbs_vllm.plugin:platform_plugin"
    assert entry_points(group="vllm.general_plugins")["pbs"].load() is plugin.register


def test_pbs_and_custom_resolve_to_our_backend():
    plugin.register()
    assert _resolve("pbs") == plugin.BACKEND_CLASS_PATH
    assert _resolve("PBS") == plugin.BACKEND_CLASS_PATH
    assert _resolve("custom") == plugin.BACKEND_CLASS_PATH


def test_registration_is_idempotent():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    for _ in range(3):
        plugin.register()
    assert E["PBS"] is E.CUSTOM
    assert [m.name for m in E].count("CUSTOM") == 1
    assert "PBS" not in [m.name for m in E]  # an alias, not a second member
    assert E.CUSTOM.get_path() == plugin.BACKEND_CLASS_PATH


def test_pickles_as_custom():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    plugin.register()
    assert pickle.loads(pickle.dumps(E["PBS"])) is E.CUSTOM


def test_platform_plugin_only_acts_on_request(monkeypatch):
    monkeypatch.delenv(plugin.CPU_PLATFORM_ENV, raising=False)
    assert plugin.platform_plugin() is None
    monkeypatch.setenv(plugin.CPU_PLATFORM_ENV, "1")
    assert plugin.platform_plugin() == plugin.CPU_PLATFORM_PATH


def _child(conn) -> None:
    # Nothing registers explicitly here: vLLM's own plugin loading must do it.
    conn.send(_resolve("pbs"))


def _child_unpickle(conn, payload: bytes) -> None:
    # As a vLLM worker does: load plugins at start-up, then receive the pickled config.
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    conn.send(pickle.loads(payload).get_path())


def test_spawned_process_resolves_pbs():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child,))
    p.start()
    assert parent.poll(120), "spawned child did not answer"
    assert parent.recv() == plugin.BACKEND_CLASS_PATH
    p.join(30)
    assert p.exitcode == 0


def test_config_pickled_into_spawned_process():
    """What a worker receives (a pickled AttentionConfig) unpickles to our backend."""
    from vllm.config import AttentionConfig

    plugin.register()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    cfg = AttentionConfig(backend="pbs")
    p = ctx.Process(target=_child_unpickle, args=(child, pickle.dumps(cfg.backend)))
    p.start()
    assert parent.poll(120), "spawned child did not answer"
    assert parent.recv() == plugin.BACKEND_CLASS_PATH
    p.join(30)
    assert p.exitcode == 0

"""PBSConfig: defaults, every field's bad values, additional_config and env sources."""

from __future__ import annotations

import logging

import pytest

from pbs_vllm import config as config_module
from pbs_vllm.config import PBSConfig, PBSConfigError, get_pbs_config
from pbs_vllm.kernels.params import SparsityParams


def load(section=None, **env):
    return PBSConfig.load({"pbs": section} if section is not None else None, env=env)


def test_defaults():
    """The paper's, except a 512-token segment, the exact last-block selection and tau
    0.99 (docs/method.md, deviations)."""
    cfg = load()
    assert (cfg.block_size, cfg.segment_size, cfg.tau, cfg.max_kept_fraction) == (
        128,
        512,
        0.99,
        None,
    )
    assert cfg.scoring == "mean" and cfg.permute and cfg.keep_sink and cfg.exact_last_block


def test_additional_config_and_env_override():
    cfg = load({"tau": 0.8, "block_size": 64, "segment_size": 128}, PBS_TAU="0.95")
    assert cfg.tau == 0.95 and cfg.block_size == 64 and cfg.segment_size == 128
    assert load({"max_kept_fraction": 0.1}, PBS_MAX_KEPT_FRACTION="none").max_kept_fraction is None
    assert load(PBS_PERMUTE="false").permute is False
    assert load(PBS_SCORING="antidiagonal").scoring == "antidiagonal"


def test_non_field_env_is_ignored():
    # Our own switch, and a PBS batch scheduler's variables, are not settings.
    assert load(PBS_VLLM_CPU_PLATFORM="1", PBS_JOBID="42.server", PBS_O_HOME="/x") == load()


@pytest.mark.parametrize(
    "field, value, expect",
    [
        ("block_size", 48, "power of two"),
        ("block_size", 8, "power of two"),
        ("block_size", 512, "power of two"),
        ("block_size", 64.0, "valid integer"),
        ("block_size", True, "valid integer"),
        ("block_size", "128", "valid integer"),
        ("segment_size", 200, "multiple of block_size=128"),
        ("segment_size", 64, "multiple of block_size=128"),
        ("segment_size", None, "valid integer"),
        ("tau", 0, "greater than 0"),
        ("tau", -0.5, "greater than 0"),
        ("tau", 1.01, "less than or equal to 1"),
        ("tau", "high", "valid number"),
        ("max_kept_fraction", 0.0, "greater than 0"),
        ("max_kept_fraction", 1.5, "less than or equal to 1"),
        ("max_kept_fraction", "0.5", "valid number"),
        ("dense_fallback_len", -1, "greater than or equal to 0"),
        ("dense_fallback_len", 1.5, "valid integer"),
        ("scoring", "max", "'mean' or 'antidiagonal'"),
        ("scoring", 1, "'mean' or 'antidiagonal'"),
        ("antidiagonal_stride", 0, "greater than or equal to 1"),
        ("antidiagonal_stride", 3, "must divide block_size=128"),
        ("permute", "yes", "valid boolean"),
        ("keep_sink", 1, "valid boolean"),
        ("stats_log_interval_s", -1, "greater than or equal to 0"),
        ("stats_log_interval_s", "often", "valid number"),
    ],
)
def test_every_bad_value_names_field_value_and_rule(field, value, expect):
    with pytest.raises(PBSConfigError) as err:
        load({field: value})
    msg = str(err.value)
    assert f"pbs.{field} = {value!r}" in msg
    assert expect in msg
    assert "allowed:" in msg


def test_tau_excludes_sink_needs_the_sink():
    assert load({"tau_excludes_sink": True}).sparsity_params().tau_excludes_sink
    with pytest.raises(PBSConfigError) as err:
        load({"tau_excludes_sink": True, "keep_sink": False})
    assert "pbs.tau_excludes_sink = True" in str(err.value)
    assert "needs keep_sink=true" in str(err.value)


def test_bad_env_value_names_the_variable():
    with pytest.raises(PBSConfigError, match=r"PBS_TAU = 'abc'.*valid number"):
        load(PBS_TAU="abc")


def test_unknown_key_lists_allowed_settings():
    with pytest.raises(
        PBSConfigError, match=r"pbs.taus = 0.9: unknown setting.*tau, max_kept_fraction"
    ):
        load({"taus": 0.9})
    with pytest.raises(PBSConfigError, match=r"PBS_BLOCKSIZE = 64: unknown setting"):
        load(PBS_BLOCKSIZE="64")


def test_section_must_be_an_object():
    with pytest.raises(PBSConfigError, match="must be a JSON object"):
        PBSConfig.load({"pbs": [1, 2]}, env={})


def test_several_errors_reported_together():
    with pytest.raises(PBSConfigError) as err:
        load({"tau": 2, "scoring": "x"})
    assert "pbs.tau" in str(err.value) and "pbs.scoring" in str(err.value)


def test_frozen():
    with pytest.raises(Exception, match="frozen"):
        load().tau = 0.5


def test_sparsity_params_round_trip():
    cfg = load({"block_size": 32, "segment_size": 64, "tau": 0.5, "max_kept_fraction": 0.25})
    p = cfg.sparsity_params()
    assert isinstance(p, SparsityParams)
    assert (p.block_size, p.segment_size, p.tau, p.max_kept_fraction) == (32, 64, 0.5, 0.25)


def test_get_pbs_config_reads_additional_config(monkeypatch):
    class FakeVllmConfig:  # only the attribute get_pbs_config reads
        additional_config = {"pbs": {"tau": 0.7}, "other_plugin": {"x": 1}}

    for name in [n for n in __import__("os").environ if n.startswith("PBS_")]:
        monkeypatch.delenv(name)
    assert get_pbs_config(FakeVllmConfig()).tau == 0.7
    assert get_pbs_config(None).tau == 0.99


@pytest.fixture
def config_log(monkeypatch, caplog):
    """The config module's log records, with its once-per-process memory cleared."""
    monkeypatch.setattr(config_module, "_warned", set())
    caplog.set_level(logging.WARNING, logger=config_module.logger.name)
    # Captured here once, whether or not vLLM's logging config stops "vllm" at its handler.
    monkeypatch.setattr(config_module.logger, "propagate", False)
    config_module.logger.addHandler(caplog.handler)
    yield caplog
    config_module.logger.removeHandler(caplog.handler)


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_deprecated_max_density_key_is_mapped_with_one_warning(config_log):
    cfg = load({"max_density": 0.25})
    assert cfg.max_kept_fraction == 0.25 and cfg == load({"max_kept_fraction": 0.25})
    assert cfg.sparsity_params().max_kept_fraction == 0.25
    assert load({"max_density": None}).max_kept_fraction is None
    for _ in range(3):  # e.g. one load per attention layer: still one line
        load({"max_density": 0.25})
    (line,) = _deprecations(config_log)
    assert "pbs.max_density is deprecated, use pbs.max_kept_fraction" in line
    assert config_log.records[0].levelno == logging.WARNING


def test_deprecated_max_density_env_is_mapped_with_one_warning(config_log):
    assert load(PBS_MAX_DENSITY="0.1").max_kept_fraction == 0.1
    assert load(PBS_MAX_DENSITY="none").max_kept_fraction is None
    # The environment still overrides additional_config, whichever name either uses.
    assert load({"max_kept_fraction": 0.5}, PBS_MAX_DENSITY="0.1").max_kept_fraction == 0.1
    assert load({"max_density": 0.5}, PBS_MAX_KEPT_FRACTION="0.1").max_kept_fraction == 0.1
    lines = _deprecations(config_log)
    assert sum("PBS_MAX_DENSITY is deprecated, use PBS_MAX_KEPT_FRACTION" in m for m in lines) == 1
    assert sum("pbs.max_density is deprecated" in m for m in lines) == 1
    config_log.clear()
    assert load({"tau": 0.5}).max_kept_fraction is None and not _deprecations(config_log)


def test_deprecated_name_with_a_bad_value_names_the_old_name(config_log):
    with pytest.raises(PBSConfigError, match=r"pbs.max_density = 1.5: .*less than or equal"):
        load({"max_density": 1.5})
    with pytest.raises(PBSConfigError, match=r"PBS_MAX_DENSITY = 'high': .*valid number"):
        load(PBS_MAX_DENSITY="high")


@pytest.mark.parametrize(
    "section, env, names",
    [
        (
            {"max_density": 0.2, "max_kept_fraction": 0.2},
            {},
            ("pbs.max_density", "pbs.max_kept_fraction"),
        ),
        (
            None,
            {"PBS_MAX_DENSITY": "0.2", "PBS_MAX_KEPT_FRACTION": "0.3"},
            ("PBS_MAX_DENSITY", "PBS_MAX_KEPT_FRACTION"),
        ),
    ],
)
def test_old_and_new_name_together_is_an_error_naming_both(section, env, names):
    with pytest.raises(PBSConfigError) as err:
        load(section, **env)
    msg = str(err.value)
    assert all(name in msg for name in names), msg
    assert "deprecated name of max_kept_fraction" in msg

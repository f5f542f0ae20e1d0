"""Property-based fuzzing of PBSConfig: any input either validates into a consistent
config or fails with one PBSConfigError naming the setting — never another exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pbs_vllm.config import PBSConfig, PBSConfigError
from pbs_vllm.kernels.params import SparsityParams

FIELDS = list(PBSConfig.model_fields)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), json_scalars, max_size=2),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=12))


def _check(cfg_or_err, names):
    if isinstance(cfg_or_err, PBSConfigError):
        msg = str(cfg_or_err)
        assert msg.startswith("invalid PBS configuration") or "must be a JSON object" in msg
        assert any(n in msg for n in names), (msg, names)
        return
    cfg = cfg_or_err
    assert cfg.segment_size % cfg.block_size == 0 and cfg.block_size & (cfg.block_size - 1) == 0
    assert 0 < cfg.tau <= 1
    # A valid config always yields valid kernel parameters.
    assert isinstance(cfg.sparsity_params(), SparsityParams)


def _load(section, env):
    try:
        return PBSConfig.load({"pbs": section}, env=env)
    except PBSConfigError as e:
        return e


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, values, max_size=4))
def test_additional_config_section(section):
    _check(_load(section, {}), [f"pbs.{k}" for k in section] + ["pbs"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=10), max_size=3))
def test_env_overrides(raw_env):
    env = {f"PBS_{k.upper()}": v for k, v in raw_env.items()}
    _check(_load({}, env), list(env))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([8, 16, 24, 32, 64, 96, 128, 256, 512]),
    st.integers(0, 1100),
    st.floats(-1, 2, allow_nan=False),
)
def test_block_geometry(block, segment, tau):
    res = _load({"block_size": block, "segment_size": segment, "tau": tau}, {})
    valid = block in (16, 32, 64, 128, 256) and segment >= block and segment % block == 0
    valid = valid and 0 < tau <= 1
    assert isinstance(res, PBSConfig) == valid, (block, segment, tau, res)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), json_scalars, max_size=4))
def test_json_round_trip(section):
    """What a user writes in --additional-config (JSON text) behaves like the dict."""
    direct = _load(section, {})
    via_json = _load(json.loads(json.dumps(section)), {})
    assert type(direct) is type(via_json)

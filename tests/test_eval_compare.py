"""Settings and comparison helpers of the RULER suite (`pbs_vllm.evals.compare`) and the
engine arguments of its runner (`pbs_vllm.evals.engine`): pure Python, no engine."""

from __future__ import annotations

import json
import math

import pytest

from pbs_vllm.config import PBSConfig
from pbs_vllm.evals import compare, engine
from pbs_vllm.evals.compare import SETTINGS, MissingDensityError

REQUIRED = (
    "flash",
    "pbs-default",
    "pbs-sparse",
    "pbs-tau0.8",
    "pbs-tau0.95",
    "pbs-pooled256",
    "pbs-plus",
    "unpermuted-matched",
)
NEVER_DENSE = {"dense_fallback_len": 0, "dense_above": None}


def test_required_settings_exist():
    assert set(REQUIRED) <= set(SETTINGS)
    assert SETTINGS["flash"].backend == "stock"
    assert all(SETTINGS[n].backend == "pbs" for n in REQUIRED[1:])
    with pytest.raises(TypeError):
        SETTINGS["pbs-sparse"].pbs["tau"] = 0.5  # read-only overrides
    for name in SETTINGS:  # every setting is a valid configuration
        cfg = compare.setting_config(name, 8192, {(SETTINGS[name].match_density_of, 8192): 0.3})
        if cfg is not None:
            PBSConfig.load({"pbs": cfg}, env={})
    hash(SETTINGS["pbs-sparse"])  # frozen and hashable


def test_parse_settings_orders_dependencies():
    assert compare.parse_settings("flash,pbs-sparse") == ["flash", "pbs-sparse"]
    assert compare.parse_settings(" unpermuted-matched , flash,pbs-sparse") == [
        "pbs-sparse",
        "unpermuted-matched",
        "flash",
    ]
    assert compare.parse_settings("flash,flash") == ["flash"]
    # A missing dependency is added before the setting that needs it.
    assert compare.parse_settings("unpermuted-matched") == ["pbs-sparse", "unpermuted-matched"]
    suite = [name for name, s in SETTINGS.items() if s.suite]
    assert compare.parse_settings("all") == suite
    # the TTFT benchmark's speed configurations are not part of the suite, but run by name
    assert "pbs-d10" not in suite and "pbs-routed" not in suite and "pbs-tau0.99" in suite
    assert compare.parse_settings("pbs-d10") == ["pbs-d10"]
    assert SETTINGS["pbs-d10"].pbs["max_kept_fraction"] == 0.1
    ordered = compare.parse_settings("all")
    assert ordered.index("pbs-sparse") < ordered.index("unpermuted-matched")


def test_parse_settings_errors():
    with pytest.raises(ValueError, match=r"'pbs-bogus'.*allowed: all, flash, pbs-default"):
        compare.parse_settings("flash,pbs-bogus")
    with pytest.raises(ValueError, match=r"'a', 'b'"):
        compare.parse_settings("a,b")
    with pytest.raises(ValueError, match="no settings"):
        compare.parse_settings(" , ")
    with pytest.raises(ValueError, match="needs 'pbs-sparse'"):
        compare.order_settings(["unpermuted-matched"], add_dependencies=False)


def test_setting_config_each_setting():
    cfg = {n: compare.setting_config(n, 8192, {("pbs-sparse", 8192): 0.2}) for n in REQUIRED}
    assert cfg["flash"] is None
    assert cfg["pbs-default"] == {}
    assert cfg["pbs-sparse"] == {"tau": 0.9, **NEVER_DENSE}
    assert cfg["pbs-tau0.8"] == {"tau": 0.8, **NEVER_DENSE}
    assert cfg["pbs-tau0.95"] == {"tau": 0.95, **NEVER_DENSE}
    assert cfg["pbs-pooled256"] == {
        "tau": 0.9,
        "exact_last_block": False,
        "segment_size": 256,
        **NEVER_DENSE,
    }
    assert cfg["pbs-plus"] == {"tau": 0.9, "scoring": "antidiagonal", **NEVER_DENSE}
    assert cfg["unpermuted-matched"] == {
        "tau": 1.0,
        "permute": False,
        "max_kept_fraction": 0.2,
        **NEVER_DENSE,
    }
    for c in cfg.values():
        if c is not None:
            PBSConfig.load({"pbs": c}, env={})  # every config is valid
    # The returned dict is a copy: changing it leaves the setting alone.
    cfg["pbs-sparse"]["tau"] = 0.1
    assert SETTINGS["pbs-sparse"].pbs["tau"] == 0.9


def test_dense_last_settings_match_their_own_density():
    cfg = compare.setting_config(
        "unpermuted-last1k-matched", 8192, {("pbs-last1k", 8192): 0.4, ("pbs-sparse", 8192): 0.2}
    )
    assert cfg == {
        "tau": 1.0,
        "permute": False,
        "dense_last_tokens": 1024,
        "max_kept_fraction": 0.4,
        **NEVER_DENSE,
    }
    assert compare.parse_settings("unpermuted-last1k-matched") == [
        "pbs-last1k",
        "unpermuted-last1k-matched",
    ]
    assert compare.setting_config("pbs-last128", 8192) == {
        "tau": 0.9,
        "dense_last_tokens": 128,
        **NEVER_DENSE,
    }


def test_setting_config_matched_density():
    s = SETTINGS["unpermuted-matched"]
    dens = {("pbs-sparse", 8192): 0.31, ("pbs-sparse", 16384): 0.12}
    assert compare.setting_config(s, 8192, dens)["max_kept_fraction"] == 0.31
    assert compare.setting_config(s, 16384, dens)["max_kept_fraction"] == 0.12
    with pytest.raises(MissingDensityError, match=r"'unpermuted-matched' at length 32768.*"):
        compare.setting_config(s, 32768, dens)
    with pytest.raises(MissingDensityError, match="run 'pbs-sparse' at length 4096 first"):
        compare.setting_config(s, 4096)
    with pytest.raises(MissingDensityError, match="measured no density"):
        compare.setting_config(s, 8192, {("pbs-sparse", 8192): None})
    with pytest.raises(MissingDensityError, match="not in"):
        compare.setting_config(s, 8192, {("pbs-sparse", 8192): 0.0})
    # Other settings need no densities.
    assert compare.setting_config("pbs-sparse", 4096) == {"tau": 0.9, **NEVER_DENSE}


def test_first_token_agreement():
    assert compare.first_token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert compare.first_token_agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert compare.first_token_agreement([None, 2], [None, 2]) == 0.5  # None never agrees
    assert compare.first_token_agreement([], []) is None
    with pytest.raises(ValueError, match="differ in length"):
        compare.first_token_agreement([1], [1, 2])


def test_topk_kl():
    ref = {1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.05)}
    assert compare.topk_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # Renormalised over the reference's top-k: a constant shift changes nothing.
    shifted = {t: v - 2.0 for t, v in ref.items()}
    assert compare.topk_kl(ref, shifted) == pytest.approx(0.0, abs=1e-12)
    other = {1: math.log(0.3), 2: math.log(0.6), 3: math.log(0.05)}
    kl = compare.topk_kl(ref, other)
    p = [0.6 / 0.95, 0.3 / 0.95, 0.05 / 0.95]
    q = [0.3 / 0.95, 0.6 / 0.95, 0.05 / 0.95]
    assert kl == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)))
    assert kl > 0
    # Token 3 is missing from other's top-k: it gets other's smallest logprob (0.01).
    missing = {1: math.log(0.6), 2: math.log(0.3), 9: math.log(0.01)}
    got = compare.topk_kl(ref, missing)
    q3 = [0.6, 0.3, 0.01]
    q3 = [x / sum(q3) for x in q3]
    assert got == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q3)))
    assert got > 0
    # String keys (as read back from JSON) work like ints.
    as_json = json.loads(json.dumps(ref))
    assert compare.topk_kl(as_json, ref) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="reference has no logprobs"):
        compare.topk_kl({}, ref)
    with pytest.raises(ValueError, match="no logprobs"):
        compare.topk_kl(ref, {})


def test_mean_topk_kl():
    a = {1: -0.1, 2: -2.5}
    b = {1: -2.5, 2: -0.1}
    k = compare.topk_kl(a, b)
    assert compare.mean_topk_kl([a, a], [a, b]) == pytest.approx(k / 2)
    assert compare.mean_topk_kl([a, None], [b, b]) == pytest.approx(k)  # pair skipped
    assert compare.mean_topk_kl([None], [a]) is None
    with pytest.raises(ValueError, match="differ in length"):
        compare.mean_topk_kl([a], [])


def _records():
    lp = {"5": -0.2, "6": -1.9}
    out = []
    for setting, first, lps, scores in (
        ("flash", [5, 5, 5], [lp, lp, lp], [1.0, 0.5, 0.0]),
        ("pbs-sparse", [5, 6, 5], [lp, {"6": -0.2, "5": -1.9}, lp], [1.0, 0.0, 0.0]),
    ):
        for i, (task, idx) in enumerate((("vt", 0), ("vt", 1), ("cwe", 0))):
            out.append(
                {
                    "setting": setting,
                    "length": 8192,
                    "task": task,
                    "key": f"{task}/8192/{idx}",
                    "score": scores[i],
                    "first_token": first[i],
                    "top_logprobs": lps[i],
                }
            )
    return out


def test_summarize_and_markdown_table():
    records = _records()
    errors = {("unpermuted-matched", 8192): "MissingDensityError: no density | x"}
    res = compare.summarize(records, {("pbs-sparse", 8192): 0.25}, errors)
    by = {r["setting"]: r for r in res}
    assert set(by) == {"flash", "pbs-sparse", "unpermuted-matched"}
    flash, pbs = by["flash"], by["pbs-sparse"]
    # Mean over tasks of the task means: (vt 0.75 + cwe 0.0) / 2.
    assert flash["score"] == pytest.approx(0.375)
    assert flash["per_task"] == {"vt": 0.75, "cwe": 0.0}
    assert flash["agreement"] is None and flash["topk_kl"] is None
    assert pbs["score"] == pytest.approx(0.25)
    assert pbs["agreement"] == pytest.approx(2 / 3)
    kl = compare.topk_kl(records[1]["top_logprobs"], records[4]["top_logprobs"])
    assert pbs["topk_kl"] == pytest.approx(kl / 3)
    assert by["unpermuted-matched"]["samples"] == 0
    assert by["unpermuted-matched"]["error"].startswith("MissingDensityError")

    assert [r["setting"] for r in res] == ["flash", "pbs-sparse", "unpermuted-matched"]
    reordered = compare.summarize(records, errors=errors, order=["unpermuted-matched", "flash"])
    assert [r["setting"] for r in reordered] == ["unpermuted-matched", "flash", "pbs-sparse"]

    table = compare.markdown_table(res)
    lines = table.splitlines()
    assert lines[0].startswith("| setting | length | mean | vt | cwe | density | agree vs flash")
    assert len(lines) == 2 + 3
    assert "| flash | 8K | 37.5 | 75.0 | 0.0 | - | - | - |" in table
    assert f"| pbs-sparse | 8K | 25.0 | 50.0 | 0.0 | 0.250 | 66.7 | {kl / 3:.4f} |" in table
    row = next(line for line in lines if line.startswith("| unpermuted-matched"))
    assert "failed: MissingDensityError" in row and "no density / x" in row  # pipe escaped
    assert row.count("|") == lines[0].count("|")


def test_markdown_table_dense_pbs():
    res = [
        {
            "setting": "pbs-default",
            "length": 1500,
            "samples": 4,
            "score": 0.5,
            "per_task": {"vt": 0.5},
            "density": None,
        }
    ]
    table = compare.markdown_table(res)
    assert "| pbs-default | 1500 | 50.0 | 50.0 | dense | - | - |" in table


def test_engine_kwargs(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"max_position_embeddings": 32768, "rope_theta": 1e6})
    )
    stock = engine.engine_kwargs(tmp_path, "stock", None, on_gpu=True, max_model_len=9000)
    assert stock["attention_backend"] == "FLASH_ATTN" and "additional_config" not in stock
    assert stock["enable_prefix_caching"] is False and stock["enforce_eager"] is True
    cpu = engine.engine_kwargs(tmp_path, "stock", None, on_gpu=False, max_model_len=9000)
    assert cpu["attention_backend"] == "CPU_ATTN" and cpu["dtype"] == "float32"
    assert "kv_cache_memory_bytes" not in stock
    fixed = dict(on_gpu=True, max_model_len=9000, kv_cache_bytes=2**30)
    assert engine.engine_kwargs(tmp_path, "stock", None, **fixed)["kv_cache_memory_bytes"] == 2**30
    fixed["on_gpu"] = False  # the CPU engine sizes its cache by its own setting
    assert "kv_cache_memory_bytes" not in engine.engine_kwargs(tmp_path, "stock", None, **fixed)
    pbs = engine.engine_kwargs(
        tmp_path,
        "pbs",
        {"tau": 0.8},
        on_gpu=True,
        max_model_len=65536,
        yarn=2.0,
        gpu_memory_utilization=0.8,
        max_num_batched_tokens=16384,
    )
    assert pbs["attention_backend"] == "PBS"
    assert pbs["additional_config"] == {
        "pbs": {"tau": 0.8, "stats_log_interval_s": engine.EVERY_CALL_S}
    }
    assert pbs["hf_overrides"] == {
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 32768,
            "rope_theta": 1e6,
        },
        "max_position_embeddings": 65536,
    }
    # rope_theta from transformers-5 style rope_parameters; absent when unknown.
    (tmp_path / "config.json").write_text(
        json.dumps({"max_position_embeddings": 4096, "rope_parameters": {"rope_theta": 5e5}})
    )
    assert engine.yarn_rope_scaling(tmp_path, 4.0)["rope_theta"] == 5e5
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert "rope_theta" not in engine.yarn_rope_scaling(tmp_path, 4.0)
    assert pbs["gpu_memory_utilization"] == 0.8 and pbs["max_num_batched_tokens"] == 16384
    with pytest.raises(ValueError, match="no PBS settings"):
        engine.engine_kwargs(tmp_path, "stock", {}, on_gpu=True, max_model_len=1)
    with pytest.raises(ValueError, match="'xformers'"):
        engine.engine_kwargs(tmp_path, "xformers", None, on_gpu=True, max_model_len=1)

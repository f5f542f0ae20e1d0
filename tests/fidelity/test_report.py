"""The fidelity claim: at equal (or larger) budget, permuted selection covers more mass."""

from __future__ import annotations

import csv

import pytest

from pbs_vllm.fidelity.report import (
    METHODS,
    PromptAttention,
    fidelity_report,
    format_table,
    write_csv,
)
from pbs_vllm.fidelity.synthetic import SyntheticSpec, make_synthetic_qkv

TAUS = (0.8, 0.9, 0.95)


@pytest.fixture
def prompt(seed) -> PromptAttention:
    s = make_synthetic_qkv(SyntheticSpec(seq_len=1024, num_q_heads=4, num_kv_heads=2, seed=seed))
    return PromptAttention(s.q, s.k, s.v)


def test_pbs_beats_unpermuted_at_matched_budget(prompt, tmp_path):
    rows = fidelity_report(prompt, TAUS, block_size=32, segment_size=128)
    by = {(r.tau, r.method): r for r in rows}
    assert len(rows) == len(TAUS) * len(METHODS)
    for tau in TAUS:
        pbs, matched, oracle = by[tau, "pbs"], by[tau, "unpermuted-matched"], by[tau, "oracle"]
        assert 0.3 < pbs.pair_fraction < 0.95  # really sparse, not everything kept
        # the unpermuted side never gets less compute
        assert matched.pair_fraction >= pbs.pair_fraction
        assert pbs.recall > matched.recall
        assert oracle.pair_fraction == pytest.approx(pbs.pair_fraction)
    # a higher tau keeps more, covers more
    assert (
        by[0.8, "pbs"].pair_fraction < by[0.9, "pbs"].pair_fraction < by[0.95, "pbs"].pair_fraction
    )
    assert by[0.8, "pbs"].recall < by[0.95, "pbs"].recall

    table = format_table(rows)
    assert table.count("\n") == len(rows) and "unpermuted-matched" in table
    path = tmp_path / "fidelity.csv"
    write_csv(rows, path)
    with open(path) as f:
        back = list(csv.DictReader(f))
    assert [(float(r["tau"]), r["method"]) for r in back] == [(r.tau, r.method) for r in rows]
    assert list(back[0]) == ["tau", "method", "pair_fraction", "recall", "rel_error"]
    assert float(back[0]["pair_fraction"]) == pytest.approx(rows[0].pair_fraction)
    assert float(back[0]["recall"]) == pytest.approx(rows[0].recall)


def test_tau_one_is_dense(seed):
    s = make_synthetic_qkv(SyntheticSpec(seq_len=256, seed=seed))
    (row, *_) = fidelity_report(PromptAttention(s.q, s.k, s.v), [1.0], 32, 64)
    assert row.method == "pbs"
    assert row.pair_fraction == pytest.approx(1.0)
    assert row.recall == pytest.approx(1.0)
    assert row.rel_error < 1e-6


def test_prompt_too_short_for_sparsity(seed):
    s = make_synthetic_qkv(SyntheticSpec(seq_len=128, seed=seed))
    with pytest.raises(ValueError, match="more than one segment"):
        fidelity_report(PromptAttention(s.q, s.k, s.v), [0.9], 32, 128)


def test_mismatched_qkv_is_rejected(seed):
    s = make_synthetic_qkv(SyntheticSpec(seq_len=128, seed=seed))
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        PromptAttention(s.q[:, :3], s.k, s.v)

"""Retrieval accuracy regression on the CPU engine with the shipped trained model.

The stock CPU attention answers a set of 2K-token multi-needle prompts; on the prompts it
gets right, PBS (tau 0.9, block 32 / segment 64, no dense fallback) must give the same
answer while really skipping blocks. A PBS change that drops the needles' blocks, or
corrupts attention, fails here. Interpreted Triton costs about a CPU-minute per layer and
2K-token prompt at these sizes, so PBS runs only on the first prompts dense answers right.
"""

from __future__ import annotations

import pytest

from pbs_vllm.evals.retrieval import Setting, make_llm, run_prompts
from training.evaluate import CI_SEED, split_seed
from training.retrieval_data import eval_prompts

pytestmark = pytest.mark.engine
pytest.importorskip("vllm")

LENGTH = 2048
NEEDLES = 4  # the model answers ~70% of such prompts at 2K (dense, measured on 24)
CANDIDATES = 8  # prompts tried with dense attention (cheap: stock CPU attention)
CHECKED = 2  # dense-correct prompts that PBS must also answer
BLOCK, SEGMENT = 32, 64


def test_pbs_keeps_the_answers_dense_gets_right():
    prompts, answers = eval_prompts(CANDIDATES, LENGTH, NEEDLES, split_seed(CI_SEED, LENGTH))
    llm = make_llm(Setting("dense"), LENGTH + 8, BLOCK, SEGMENT, on_gpu=False)
    right = [i for i, p in enumerate(prompts) if run_prompts(llm, [p], [answers[i]])[0] == 1.0]
    del llm
    assert len(right) >= CANDIDATES // 2, f"dense answered only {len(right)}/{CANDIDATES}"

    keep = right[:CHECKED]
    llm = make_llm(Setting("pbs-0.9", {"tau": 0.9}), LENGTH + 8, BLOCK, SEGMENT, on_gpu=False)
    accuracy, density = run_prompts(llm, [prompts[i] for i in keep], [answers[i] for i in keep])
    assert density is not None and 0.0 < density < 0.95, f"PBS density {density}: not sparse"
    assert accuracy == 1.0, f"PBS lost {round((1 - accuracy) * CHECKED)}/{CHECKED} answers"

"""Dense (torch SDPA) exact-match retrieval accuracy of a `RetrievalLlama`."""

from __future__ import annotations

import contextlib

import torch

from training.model import RetrievalLlama
from training.retrieval_data import eval_batch

# Seeds of the held-out prompt sets, one per use, so none is ever trained or selected on
# (training draws from its own generator on the training device).
VALID_SEED = 1_000_003  # checkpoint selection during training
TEST_SEED = 2_000_003  # the final table of `training.train`
BENCH_SEED = 3_000_017  # benchmarks/bench_accuracy.py
CI_SEED = 4_000_037  # tests/accuracy


def split_seed(base: int, length: int) -> int:
    """The seed of one prompt set: a split's base seed and the prompt length."""
    return base + 7919 * length


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def dense_accuracy(
    model: RetrievalLlama,
    length: int,
    num_prompts: int,
    num_needles: int,
    seed: int,
    tokens_per_batch: int = 1 << 17,
) -> float:
    """Fraction of held-out prompts whose greedy next token is the answer."""
    device = next(model.parameters()).device
    batch = eval_batch(num_prompts, length, num_needles, seed)
    tokens, answers = batch.tokens.to(device), batch.answers[:, -1].to(device)
    step = max(1, tokens_per_batch // length)
    was_training = model.training
    model.eval()
    correct = 0
    with autocast(device):
        for i in range(0, num_prompts, step):
            rows = tokens[i : i + step]
            last = torch.full((rows.shape[0], 1), length - 1, device=device)
            pred = model.logits_at(rows, last)[:, 0].argmax(-1)
            correct += int((pred == answers[i : i + step]).sum())
    model.train(was_training)
    return correct / num_prompts

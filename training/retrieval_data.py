"""Synthetic multi-needle key-value recall prompts, generated in batches with torch.

A sequence of `length` tokens (plus its final answer) is

    <s> [context: filler words with needles "K : V" scattered uniformly]
        <q> K_a : V_a  <q> K_b : V_b  ...  <q> K_z : V_z

with distinct keys, random values, and every needle queried once in random order. Training
predicts every `V` of the query section; an evaluation prompt stops before the last `V`
(the sequence ends with `:`), and the answer is that one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.vocab import NUM_FILLER, NUM_KEYS, NUM_VALUES, VOCAB

NEEDLE_LEN = 3  # K : V
QUERY_LEN = 4  # <q> K : V


@dataclass
class RetrievalBatch:
    """tokens [B, length] int64 (ending with the last query's `:`); query_pos [B, Q]: the
    positions whose next token is an answer; answers [B, Q]: those answer ids. The last
    column is the evaluation target (query_pos[:, -1] == length - 1)."""

    tokens: torch.Tensor
    query_pos: torch.Tensor
    answers: torch.Tensor


def min_length(num_needles: int) -> int:
    """Shortest `length` that holds `num_needles` needles and their queries."""
    return NEEDLE_LEN * num_needles + QUERY_LEN * num_needles


def sample_batch(
    batch: int,
    length: int,
    num_needles: int,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> RetrievalBatch:
    """`batch` random sequences of `length` tokens with `num_needles` needles each.

    `gen` must live on `device`; the same generator state gives the same batch.
    """
    if num_needles < 1 or num_needles > NUM_KEYS:
        raise ValueError(f"num_needles={num_needles}: must be in [1, {NUM_KEYS}]")
    if length < min_length(num_needles):
        raise ValueError(
            f"length={length}: too short for {num_needles} needles "
            f"(needs >= {min_length(num_needles)})"
        )
    n = num_needles
    ctx = length - QUERY_LEN * n  # context tokens after <s>; +1 (<s>) -1 (held-out answer)
    rows = torch.arange(batch, device=device)[:, None]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, device=device)

    context = torch.randint(
        VOCAB.filler0, VOCAB.filler0 + NUM_FILLER, (batch, ctx), generator=gen, device=device
    )
    # n sorted distinct slots in [0, ctx - 2n), spread by 2 per earlier needle: uniform,
    # non-overlapping starts of 3-token needles in [0, ctx - 3].
    slots = uniform(batch, ctx - (NEEDLE_LEN - 1) * n).topk(n, dim=1).indices.sort(dim=1).values
    starts = slots + (NEEDLE_LEN - 1) * torch.arange(n, device=device)
    keys = VOCAB.key0 + uniform(batch, NUM_KEYS).argsort(dim=1)[:, :n]
    values = torch.randint(
        VOCAB.value0, VOCAB.value0 + NUM_VALUES, (batch, n), generator=gen, device=device
    )
    context[rows, starts] = keys
    context[rows, starts + 1] = VOCAB.sep
    context[rows, starts + 2] = values

    order = uniform(batch, n).argsort(dim=1)
    q_keys, q_values = keys.gather(1, order), values.gather(1, order)
    marker = torch.full_like(q_keys, VOCAB.query)
    sep = torch.full_like(q_keys, VOCAB.sep)
    queries = torch.stack([marker, q_keys, sep, q_values], dim=2).reshape(batch, QUERY_LEN * n)
    bos = torch.full((batch, 1), VOCAB.bos, dtype=torch.long, device=device)
    tokens = torch.cat([bos, context, queries[:, :-1]], dim=1)
    query_pos = 1 + ctx + QUERY_LEN * torch.arange(n, device=device) + 2
    return RetrievalBatch(tokens, query_pos.expand(batch, n), q_values)


def eval_batch(num_prompts: int, length: int, num_needles: int, seed: int) -> RetrievalBatch:
    """Held-out prompts, generated on the CPU so a seed gives the same ones on every machine."""
    return sample_batch(num_prompts, length, num_needles, torch.Generator().manual_seed(seed))


def eval_prompts(
    num_prompts: int, length: int, num_needles: int, seed: int
) -> tuple[list[list[int]], list[int]]:
    """`eval_batch` as token-id lists (each `length` long, `<s>` first) and answer ids."""
    b = eval_batch(num_prompts, length, num_needles, seed)
    return b.tokens.tolist(), b.answers[:, -1].tolist()

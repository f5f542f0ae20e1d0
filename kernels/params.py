"""Sparsity parameters shared by the mask estimator and the attention kernel.

Plain dataclass so that `pbs_vllm.kernels` works without vLLM or pydantic; the
validated user-facing configuration lives in `pbs_vllm.config.PBSConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scoring = Literal["mean", "antidiagonal"]


@dataclass(frozen=True)
class SparsityParams:
    """How PBS selects key blocks (method: shared/spec/PBS.md, section 2).

    block_size: B, tokens per query block and per key block.
    segment_size: S, keys are permuted only inside segments of S (a multiple of B).
    tau: keep the smallest prefix of candidate blocks whose probability mass reaches tau;
        tau >= 1.0 keeps every candidate (equals dense causal attention).
    max_kept_fraction: optional cap on the kept fraction of candidate blocks per query block.
    permute: False gives the unpermuted mean-pooling ablation (identity permutation).
    scoring: "mean" pools blocks by their mean; "antidiagonal" is PBS+ (XAttention-style).
    antidiagonal_stride: stride of the antidiagonal sampling for scoring="antidiagonal".
    keep_sink: always keep the permuted key block holding original token 0.
    tau_excludes_sink: tau counts the mass of the candidates besides that sink block (kept
        anyway), so the sink's share no longer fills the tau budget; needs keep_sink.
    exact_last_block: the query block holding a chunk's last query selects by its queries'
        exact attention mass per permuted key block (the key importance the permutation is
        built from) instead of pooled scores; needs permute.
    dense_last_tokens: the query blocks holding any of a chunk's last this many queries keep
        every candidate block (whatever tau and max_kept_fraction say), so the end of a
        prompt, where the question and the first answer token sit, attends exactly; 0 = off
        (`dense_from` says which blocks).
    """

    block_size: int = 128
    segment_size: int = 512
    tau: float = 0.9
    max_kept_fraction: float | None = None
    permute: bool = True
    scoring: Scoring = "mean"
    antidiagonal_stride: int = 8
    keep_sink: bool = True
    tau_excludes_sink: bool = False
    exact_last_block: bool = True
    dense_last_tokens: int = 0

    def dense_from(self, ctx_len: int, seq_len: int) -> int:
        """Among the query blocks of a chunk of queries [ctx_len, seq_len) (blocks at
        multiples of block_size, the first and last ones possibly partial), the index of
        the first block that holds one of its last dense_last_tokens queries: it and every
        later block keep all candidates. The number of blocks when dense_last_tokens is 0."""
        b = self.block_size
        if not self.dense_last_tokens:
            return (seq_len - 1) // b - ctx_len // b + 1
        return max(0, (seq_len - self.dense_last_tokens) // b - ctx_len // b)

    def __post_init__(self) -> None:
        b, s = self.block_size, self.segment_size
        if b < 16 or b & (b - 1):
            raise ValueError(f"block_size={b}: must be a power of two >= 16")
        if s < b or s % b:
            raise ValueError(f"segment_size={s}: must be a positive multiple of block_size={b}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau={self.tau}: must be in (0, 1]")
        if self.max_kept_fraction is not None and not 0.0 < self.max_kept_fraction <= 1.0:
            raise ValueError(
                f"max_kept_fraction={self.max_kept_fraction}: must be in (0, 1] or None"
            )
        if self.scoring not in ("mean", "antidiagonal"):
            raise ValueError(f"scoring={self.scoring!r}: must be 'mean' or 'antidiagonal'")
        if self.tau_excludes_sink and not self.keep_sink:
            raise ValueError("tau_excludes_sink=True needs keep_sink=True (the sink is kept)")
        if self.dense_last_tokens < 0:
            raise ValueError(f"dense_last_tokens={self.dense_last_tokens}: must be >= 0")
        st = self.antidiagonal_stride
        if st < 1 or b % st:
            raise ValueError(f"antidiagonal_stride={st}: must divide block_size={b}")

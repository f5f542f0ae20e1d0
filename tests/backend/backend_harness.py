"""A real VllmConfig with one Attention layer on the PBS backend, and a paged KV cache.

`BackendHarness.step(reqs)` plays one scheduler step the way vLLM's model runner does:
earlier tokens are already in the cache, this step's K/V go in through the impl's
`do_kv_cache_update`, metadata comes from our builder, then the impl's forward runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from vllm.config import (
    AttentionConfig,
    CacheConfig,
    ModelConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import CommonAttentionMetadata

from pbs_vllm.backend.metadata import PBSAttentionMetadataBuilder
from pbs_vllm.models import tiny_llama_path
from pbs_vllm.plugin import register

PAGE_SIZE = 32  # CPU_ATTN needs a multiple of 32
NULL_PAGE = 0  # vLLM's null block: block-table padding points here


@dataclass(frozen=True)
class Req:
    """One request of a step: `ctx` tokens already cached, `q` new tokens."""

    ctx: int
    q: int

    @property
    def seq(self) -> int:
        return self.ctx + self.q


@dataclass
class Step:
    """What one step fed the impl, and what it produced."""

    reqs: list[Req]
    query: torch.Tensor  # [T, Hq, D]
    keys: list[torch.Tensor]  # per request [seq, Hkv, D], original order
    values: list[torch.Tensor]
    output: torch.Tensor  # [T, Hq, D]
    metadata: object
    block_table: torch.Tensor  # [num_reqs, max_pages] int32
    slot_mapping: torch.Tensor  # [T] int64, this step's tokens


class BackendHarness:
    def __init__(
        self,
        pbs: dict,
        gen: torch.Generator,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        head_size: int = 64,
        num_pages: int = 24,
        **layer_kwargs,
    ) -> None:
        register()
        self.gen = gen
        self.num_pages = num_pages
        self.config = VllmConfig(
            model_config=ModelConfig(
                model=tiny_llama_path(), dtype=torch.float32, max_model_len=1024
            ),
            cache_config=CacheConfig(block_size=PAGE_SIZE),
            attention_config=AttentionConfig(backend="CUSTOM"),
            additional_config={"pbs": pbs},
        )
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(set_current_vllm_config(self.config))
        self.scale = head_size**-0.5
        self.layer = Attention(
            num_heads,
            head_size,
            self.scale,
            num_kv_heads=num_kv_heads,
            prefix="model.layers.0.self_attn.attn",
            cache_config=self.config.cache_config,
            **layer_kwargs,
        )
        self.impl = self.layer.impl
        self.spec = self.layer.get_kv_cache_spec(self.config)
        self._builder = None
        # Stock logical layout [pages, Hkv, page_size, 2 * D]; unwritten slots hold finite
        # garbage, as stale pages do in a real run.
        self.kv_cache = (
            torch.randn(num_pages, num_kv_heads, PAGE_SIZE, 2 * head_size, generator=gen) * 1e3
        )

    @property
    def builder(self) -> PBSAttentionMetadataBuilder:
        if self._builder is None:
            self._builder = PBSAttentionMetadataBuilder(
                self.spec, [self.layer.layer_name], self.config, torch.device("cpu")
            )
        return self._builder

    def close(self) -> None:
        self._stack.close()

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def step(self, reqs: list[Req], write_impl=None) -> Step:
        """Run one step; `write_impl` (default: ours) writes this step's K/V to the cache."""
        builder = self.builder  # sets layer.isa, as vLLM does before any forward
        hkv, d = self.spec.num_kv_heads, self.spec.head_size
        pages_needed = [math.ceil(r.seq / PAGE_SIZE) for r in reqs]
        free = (torch.randperm(self.num_pages - 1, generator=self.gen) + 1).tolist()
        assert sum(pages_needed) <= len(free), "harness: too few pages"
        table = torch.full((len(reqs), max(pages_needed) + 1), NULL_PAGE, dtype=torch.int32)
        for i, n in enumerate(pages_needed):
            table[i, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)

        def slots(i: int, positions: range) -> torch.Tensor:
            pos = torch.tensor(list(positions), dtype=torch.int64)
            return table[i, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE

        keys = [self.randn(r.seq, hkv, d) for r in reqs]
        values = [self.randn(r.seq, hkv, d) for r in reqs]
        writer = write_impl or self.impl
        for i, r in enumerate(reqs):  # earlier steps' tokens
            if r.ctx:
                writer.do_kv_cache_update(
                    self.layer,
                    keys[i][: r.ctx],
                    values[i][: r.ctx],
                    self.kv_cache,
                    slots(i, range(r.ctx)),
                )
        slot_mapping = torch.cat([slots(i, range(r.ctx, r.seq)) for i, r in enumerate(reqs)])
        k_step = torch.cat([k[r.ctx :] for k, r in zip(keys, reqs)])
        v_step = torch.cat([v[r.ctx :] for v, r in zip(values, reqs)])
        writer.do_kv_cache_update(self.layer, k_step, v_step, self.kv_cache, slot_mapping)

        q_lens = torch.tensor([r.q for r in reqs], dtype=torch.int32)
        qsl = torch.zeros(len(reqs) + 1, dtype=torch.int32)
        qsl[1:] = q_lens.cumsum(0)
        seq_lens = torch.tensor([r.seq for r in reqs], dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_start_loc_cpu=qsl.clone(),
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=seq_lens.clone(),
            num_reqs=len(reqs),
            num_actual_tokens=int(qsl[-1]),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=table,
            slot_mapping=slot_mapping,
        )
        metadata = builder.build(0, common)
        query = self.randn(int(qsl[-1]), self.layer.num_heads, d)
        output = torch.full_like(query, float("nan"))
        self.impl.forward(self.layer, query, k_step, v_step, self.kv_cache, metadata, output)
        return Step(reqs, query, keys, values, output, metadata, table, slot_mapping)


def causal_reference(step: Step, scale: float) -> torch.Tensor:
    """Dense causal attention of every query row over its request's keys (float64)."""
    out = torch.empty_like(step.query, dtype=torch.float64)
    row = 0
    for r, k, v in zip(step.reqs, step.keys, step.values):
        q = step.query[row : row + r.q].double()
        group = q.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)
        v = v.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos_q = torch.arange(r.ctx, r.seq)[:, None]
        scores = scores.masked_fill(torch.arange(r.seq)[None, :] > pos_q, float("-inf"))
        out[row : row + r.q] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        row += r.q
    return out

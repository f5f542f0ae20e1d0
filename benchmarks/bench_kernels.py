"""Benchmark the PBS attention kernel against dense attention (GPU only).

Single-sequence prefill, bf16, 32 query / 8 KV heads, head dim 128, page size 16, block 128,
segment 256. For each context length: our kernel at fixed selection fractions of the
candidate blocks (random permuted blocks, random within-segment permutations), our kernel
on the dense mask, torch SDPA (cuDNN and flash backends), FlexAttention with the same block
selection on unpermuted blocks, and the mask estimator alone. Also one chunked case: a 16K
chunk over a 128K prefix. Times are medians of triton.testing.do_bench; TFLOP/s count the
(query, key) pairs actually attended; speedups are against dense cuDNN of the same case.

    python benchmarks/bench_kernels.py [--sizes 8192 131072] [--csv out.csv]
Results go to --csv, or to $OUT/bench_kernels.csv when $OUT is set.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from pbs_vllm.kernels import attention as attention_mod
from pbs_vllm.kernels.attention import pbs_attention
from pbs_vllm.kernels.attention_ref import pbs_attention_ref
from pbs_vllm.kernels.block_mask import PBSBlockMask, dense_block_mask, random_block_mask
from pbs_vllm.kernels.paged import ChunkBatch, PagedKV
from pbs_vllm.kernels.params import SparsityParams

HQ, HKV, D, PAGE, BLOCK, SEGMENT = 32, 8, 128, 16, 128, 256
DTYPE = torch.bfloat16
FIELDS = [
    "case",
    "ctx",
    "q_len",
    "method",
    "density",
    "ms",
    "tflops",
    "speedup_vs_cudnn",
    "speedup_vs_dense_pbs",
    "peak_extra_mib",
]


@dataclass
class Case:
    name: str
    ctx: int
    q_len: int

    @property
    def batch(self) -> ChunkBatch:
        return ChunkBatch(q_lens=[self.q_len], ctx_lens=[self.ctx])


@dataclass
class Inputs:
    q: torch.Tensor  # [q_len, HQ, D]
    k: torch.Tensor  # [seq_len, HKV, D]
    v: torch.Tensor
    kv: PagedKV


def make_inputs(case: Case, seed: int) -> Inputs:
    """Random q/k/v; the paged cache holds the keys in shuffled pages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = case.ctx + case.q_len
    q = torch.randn(case.q_len, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    k, v = (torch.randn(n, HKV, D, device="cuda", dtype=DTYPE, generator=gen) for _ in "kv")
    pages = -(-n // PAGE)
    order = torch.randperm(pages, device="cuda", generator=gen)
    caches = []
    for x in (k, v):
        cache = torch.empty(pages, PAGE, HKV, D, device="cuda", dtype=DTYPE)
        padded = torch.cat([x, x.new_zeros(pages * PAGE - n, HKV, D)])
        cache[order] = padded.view(pages, PAGE, HKV, D)
        caches.append(cache)
    table = order.to(torch.int32)[None]
    return Inputs(q, k, v, PagedKV(caches[0], caches[1], table))


def attended_pairs(mask: PBSBlockMask) -> int:
    """(query, key) pairs one KV head group computes, summed over KV heads."""
    qb = mask.qblocks
    length, pos = qb.length.long(), qb.pos.long()
    own = length * (pos - mask.own_start.long() + 1) + length * (length - 1) // 2
    selected = mask.kv_num_blocks.long() * mask.block_size * length
    return int(selected.sum().item() + own.sum().item() * mask.num_kv_heads)


def expanded(x: torch.Tensor) -> torch.Tensor:
    """[n, HKV, D] -> [1, HQ, n, D] contiguous, for the dense baselines."""
    return x.repeat_interleave(HQ // HKV, dim=1).transpose(0, 1).contiguous()[None]


def sdpa_fn(inp: Inputs, case: Case, backend: SDPBackend):
    q, k, v = inp.q.transpose(0, 1)[None].contiguous(), expanded(inp.k), expanded(inp.v)
    if case.ctx:
        from torch.nn.attention.bias import causal_lower_right

        kwargs = dict(attn_mask=causal_lower_right(case.q_len, case.ctx + case.q_len))
    else:
        kwargs = dict(is_causal=True)

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, **kwargs)

    return run


def flex_fn(inp: Inputs, mask: PBSBlockMask, case: Case):
    """FlexAttention over the same selected block ids, read as unpermuted key blocks."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    n = case.ctx + case.q_len
    diag = (mask.qblocks.pos.long() // BLOCK)[None, :].expand(HKV, -1)  # [HKV, Tq]
    own_block = mask.own_start.long()[None, :] // BLOCK
    n_sel = mask.kv_num_blocks.long()
    has_own = (diag > own_block).long()  # own-segment blocks strictly before the diagonal
    n_kv_blocks = -(-n // BLOCK)  # Flex wants index rows as wide as the key blocks
    full = torch.zeros(*n_sel.shape, n_kv_blocks, dtype=torch.long, device=n_sel.device)
    full[..., : mask.kv_indices.shape[-1]] = mask.kv_indices.long().clamp(max=n_kv_blocks - 1)
    full.scatter_(2, n_sel[..., None], own_block.expand_as(n_sel)[..., None])
    partial = torch.zeros_like(full)
    partial[..., 0] = diag
    g = HQ // HKV
    rep = lambda x: x.repeat_interleave(g, dim=0)[None].to(torch.int32).contiguous()

    kv_num, kv_idx = rep(torch.ones_like(n_sel)), rep(partial)
    full_num, full_idx = rep(n_sel + has_own), rep(full)
    # mask_mod must state the same sparsity (eager Flex applies only mask_mod; compiled
    # Flex evaluates it on the partial diagonal blocks alone).
    hits = torch.zeros(HQ, len(diag[0]), n_kv_blocks, dtype=torch.int32, device=full.device)
    for num, idx in ((kv_num, kv_idx), (full_num, full_idx)):
        valid = torch.arange(n_kv_blocks, device=full.device) < num[0, ..., None]
        hits.scatter_add_(2, idx[0].long(), valid.int())
    kept = hits > 0

    def pbs_mask(b, h, q_idx, kv_idx):
        return kept[h, q_idx // BLOCK, kv_idx // BLOCK] & (q_idx + case.ctx >= kv_idx)

    block_mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=BLOCK,
        mask_mod=pbs_mask,
        seq_lengths=(case.q_len, n),
    )
    q = inp.q.transpose(0, 1)[None].contiguous()
    k, v = (x.transpose(0, 1)[None].contiguous() for x in (inp.k, inp.v))
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask, scale=D**-0.5, enable_gqa=True)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check_correctness(seed: int) -> None:
    """At 8K: dense kernel vs SDPA, and a 10% mask vs the PyTorch reference."""
    case = Case("check", 0, 8192)
    inp = make_inputs(case, seed)
    dense = dense_block_mask(case.batch, BLOCK, HKV, "cuda")
    ours = pbs_attention(inp.q, inp.kv, dense, D**-0.5)
    sdpa = sdpa_fn(inp, case, SDPBackend.FLASH_ATTENTION)()[0].transpose(0, 1)
    err_dense = rel_err(ours, sdpa)
    mask = random_block_mask(case.batch, BLOCK, SEGMENT, HKV, 0.1, "cuda", seed=seed)
    err_sparse = rel_err(
        pbs_attention(inp.q, inp.kv, mask, D**-0.5), pbs_attention_ref(inp.q, inp.kv, mask, D**-0.5)
    )
    print(
        f"correctness at 8K: dense vs SDPA rel err {err_dense:.2e}, "
        f"10% mask vs reference {err_sparse:.2e}"
    )
    if not (err_dense < 1e-2 and err_sparse < 1e-2):
        sys.exit("correctness check failed; not timing")


def print_compiled_kernels() -> None:
    """Registers, spills and shared memory of every compiled variant of our kernel."""
    best = getattr(attention_mod._pbs_fwd_tuned, "best_config", None)
    print(f"autotuned config: {best}")
    try:  # Triton internals: the per-device cache of compiled variants
        for cache in attention_mod._pbs_fwd_kernel.device_caches.values():
            for kernel in cache[0].values():
                meta = kernel.metadata
                print(
                    f"  variant warps={meta.num_warps} stages={meta.num_stages} "
                    f"regs={kernel.n_regs} spills={kernel.n_spills} shared={meta.shared}"
                )
    except (AttributeError, IndexError, TypeError) as e:
        print(f"  compiled variants not readable on this Triton: {e!r}")


def run_case(case: Case, fractions, flex_fractions, seed: int, rows: list[dict]) -> None:
    """Time every method on one case; flex_fractions empty skips FlexAttention."""
    inp = make_inputs(case, seed)
    dense = dense_block_mask(case.batch, BLOCK, HKV, "cuda")
    dense_flops = 4 * D * (HQ // HKV) * attended_pairs(dense)

    def record(method, ms, density, flops):
        rows.append(
            dict(
                case=case.name,
                ctx=case.ctx,
                q_len=case.q_len,
                method=method,
                density=round(density, 4),
                ms=ms,
                tflops=flops / ms / 1e9 if ms else None,
            )
        )

    for name, backend in (
        ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        if name == "sdpa_efficient" and not case.ctx:
            continue  # only where the lower-right causal mask rules the others out
        try:
            record(name, bench(sdpa_fn(inp, case, backend)), 1.0, dense_flops)
        except RuntimeError as e:
            print(f"{case.name} {name}: not run ({str(e).splitlines()[0][:100]})")
    record(
        "pbs_dense_mask",
        bench(lambda: pbs_attention(inp.q, inp.kv, dense, D**-0.5)),
        1.0,
        dense_flops,
    )
    for frac in fractions:
        mask = random_block_mask(case.batch, BLOCK, SEGMENT, HKV, frac, "cuda", seed=seed)
        flops = 4 * D * (HQ // HKV) * attended_pairs(mask)
        ms = bench(lambda m=mask: pbs_attention(inp.q, inp.kv, m, D**-0.5))
        record(f"pbs_{frac:g}", ms, mask.density(), flops)
        if frac in flex_fractions:
            try:
                record(f"flex_{frac:g}", bench(flex_fn(inp, mask, case)), mask.density(), flops)
            except Exception as e:  # FlexAttention compiles through inductor: report, go on
                print(f"{case.name} flex: not run ({type(e).__name__}: {str(e)[:200]})")
    run_estimator(case, inp, rows)


def run_estimator(case: Case, inp: Inputs, rows: list[dict]) -> None:
    try:
        from pbs_vllm.kernels.estimate import build_block_mask
    except ImportError as e:
        print(f"{case.name} estimator: skipped ({e})")
        return
    params = SparsityParams()
    fn = lambda: build_block_mask(inp.q, inp.kv, case.batch, params, D**-0.5)
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask = fn()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = bench(fn)
    rows.append(
        dict(
            case=case.name,
            ctx=case.ctx,
            q_len=case.q_len,
            method="estimate",
            density=round(mask.density(), 4),
            ms=ms,
            tflops=None,
            peak_extra_mib=round(peak_mib, 1),
        )
    )


def add_speedups(rows: list[dict]) -> None:
    for base_method, column in (
        ("sdpa_cudnn", "speedup_vs_cudnn"),
        ("pbs_dense_mask", "speedup_vs_dense_pbs"),
    ):
        base = {r["case"]: r["ms"] for r in rows if r["method"] == base_method}
        for r in rows:
            ms = base.get(r["case"])
            r[column] = round(ms / r["ms"], 3) if ms and r["method"] != "estimate" else None


def print_table(rows: list[dict]) -> None:
    print(
        f"{'case':>9} {'method':>15} {'density':>7} {'ms':>9} {'TFLOP/s':>7} "
        f"{'x cuDNN':>7} {'x dense':>7}"
    )
    fmt = lambda x, spec: format(x, spec) if x else "-"
    for r in rows:
        extra = f"  peak extra {r['peak_extra_mib']} MiB" if "peak_extra_mib" in r else ""
        print(
            f"{r['case']:>9} {r['method']:>15} {r['density']:>7.4f} {r['ms']:>9.3f} "
            f"{fmt(r['tflops'], '.0f'):>7} {fmt(r['speedup_vs_cudnn'], '.2f'):>7} "
            f"{fmt(r['speedup_vs_dense_pbs'], '.2f'):>7}{extra}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.05, 0.1, 0.25, 0.5, 1.0],
        help="fractions of candidate blocks kept (achieved density is reported)",
    )
    parser.add_argument("--flex-fractions", type=float, nargs="*", default=[0.1])
    parser.add_argument(
        "--flex-sizes",
        type=int,
        nargs="*",
        default=[32768, 131072],
        help="single-sequence sizes that also time FlexAttention (compiles per size)",
    )
    parser.add_argument("--no-chunk", action="store_true", help="skip the 16K-over-128K case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}"
    )
    check_correctness(args.seed)
    print_compiled_kernels()
    cases = [Case(f"{n // 1024}K", 0, n) for n in args.sizes]
    if not args.no_chunk:
        cases.append(Case("16K@128K", 131072, 16384))
    rows: list[dict] = []
    for case in cases:
        flex = set(args.flex_fractions) if case.q_len in args.flex_sizes and not case.ctx else set()
        run_case(case, args.fractions, flex, args.seed, rows)
        torch.cuda.empty_cache()
    add_speedups(rows)
    print_table(rows)
    path = args.csv or (
        os.path.join(os.environ["OUT"], "bench_kernels.csv") if os.environ.get("OUT") else None
    )
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

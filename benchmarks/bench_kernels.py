"""Benchmark the PBS attention kernel against dense attention (GPU only).

Single-sequence prefill, bf16, 32 query / 8 KV heads, head dim 128, page size 16, block 128,
segment 256. For each context length: our kernel at fixed selection fractions of the
candidate blocks (random permuted blocks, random within-segment permutations), our kernel
on the dense mask, torch SDPA (cuDNN and flash backends), FlexAttention with the same block
selection on unpermuted blocks, and the mask estimator alone. Also one chunked case: a 16K
chunk over a 128K prefix. Times are medians of triton.testing.do_bench; TFLOP/s count the
(query, key) pairs actually attended; speedups are against dense cuDNN of the same case.
The kernel is autotuned once, on a 32K dense call, before the 8K correctness check.

    python benchmarks/bench_kernels.py [--quick] [--shape llama|qwen] [--sizes 8192 131072] [--out DIR]
--quick: 32K and 128K; cuDNN, Flex at 0.1, ours dense and at 0.05/0.1/0.25/1.0, estimate.
--shape qwen: 14 query / 2 KV heads, head dim 64 (Qwen2.5-0.5B) instead of Llama-3.1-8B's.
With vLLM's FA3 importable (Hopper) it also times `fa3_dense` (FA3 itself on the paged
cache: the FLASH_ATTN kernel) and `pbsfa_<f>` (PBS through FA3,
`pbs_vllm.kernels.varlen`, scratch copy and page tables included), and reports every
method's throughput per computed block against fa3_dense (`x FA3 rate`).
Results (bench_kernels.csv, bench_kernels.md) go to --out, or to $OUT when it is set.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass, replace

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
from pbs_vllm.kernels.plan import plan_for

HQ, HKV, D, PAGE, BLOCK, SEGMENT = 32, 8, 128, 16, 128, 256
SHAPES = {"llama": (32, 8, 128), "qwen": (14, 2, 64)}  # (HQ, HKV, D)
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
    "speedup_vs_flex",
    "rate_vs_fa3",
    "peak_extra_mib",
]


def fa3_varlen():
    """vLLM's FA3 varlen function (fa_version=3), or None where it cannot run."""
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import (
            flash_attn_varlen_func,
            is_fa_version_supported,
        )
    except ImportError:
        return None
    if not is_fa_version_supported(3):
        return None
    return lambda *a, **kw: flash_attn_varlen_func(*a, **kw, fa_version=3)


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


def make_inputs(case: Case, seed: int, structured: bool = False) -> Inputs:
    """Random q/k/v (or `pbs_vllm.testing.structured_qkv`: sink, local window, scattered
    heavy keys); the paged cache holds the keys in shuffled pages."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = case.ctx + case.q_len
    if structured:
        from pbs_vllm.testing import structured_qkv

        q, k, v = structured_qkv(n, HQ, HKV, D, generator=gen, device="cuda", dtype=DTYPE)
        q = q[case.ctx :].contiguous()
    else:
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


def result_row(case: Case, method: str, density: float, ms: float, flops: int | None) -> dict:
    """One results row: TFLOP/s from the attended (query, key) pairs' flops, if any."""
    return dict(
        case=case.name,
        ctx=case.ctx,
        q_len=case.q_len,
        method=method,
        density=round(density, 4),
        ms=ms,
        tflops=flops / ms / 1e9 if flops and ms else None,
    )


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def tune(seed: int) -> None:
    """Autotune at 32K (dense mask): the config then serves every size of this run."""
    case = Case("tune", 0, 32768)
    inp = make_inputs(case, seed)
    pbs_attention(inp.q, inp.kv, dense_block_mask(case.batch, BLOCK, HKV, "cuda"), D**-0.5)
    torch.cuda.synchronize()


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


SDPA_BACKENDS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def run_case(
    case: Case,
    fractions,
    flex_fractions,
    sdpa: list[str],
    seed: int,
    rows: list[dict],
    structured: bool = False,
) -> None:
    """Time every method on one case; flex_fractions empty skips FlexAttention."""
    inp = make_inputs(case, seed)
    # The step's plans, built once as the metadata builder does (tile tables planned).
    geometry = SparsityParams(block_size=BLOCK, segment_size=SEGMENT)
    dense = plan_for(inp.q, inp.kv, case.batch, geometry, dense=True).dense_mask()
    plan = plan_for(inp.q, inp.kv, case.batch, geometry)
    dense_flops = 4 * D * (HQ // HKV) * attended_pairs(dense)

    def record(method, ms, density, flops):
        rows.append(result_row(case, method, density, ms, flops))

    for name in sdpa:
        backend = SDPA_BACKENDS[name]
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
    fa3 = fa3_varlen()
    if fa3 is not None:
        from pbs_vllm.kernels.varlen import pbs_attention_varlen

        # The dense mask through the varlen route is one FA3 call on the paged cache.
        dense_fa = lambda: pbs_attention_varlen(inp.q, inp.kv, dense, D**-0.5, fa3)  # noqa: E731
        record("fa3_dense", bench(dense_fa), 1.0, dense_flops)
    for frac in fractions:
        mask = random_block_mask(
            case.batch, BLOCK, SEGMENT, HKV, frac, "cuda", seed=seed, plan=plan
        )
        # its row table composed once, as estimation's permutation kernel writes it
        mask = replace(mask, row_table=attention_mod.compose_row_table(mask, inp.kv))
        flops = 4 * D * (HQ // HKV) * attended_pairs(mask)
        ms = bench(lambda m=mask: pbs_attention(inp.q, inp.kv, m, D**-0.5))
        record(f"pbs_{frac:g}", ms, mask.density(), flops)
        if fa3 is not None:
            ms = bench(lambda m=mask: pbs_attention_varlen(inp.q, inp.kv, m, D**-0.5, fa3))
            record(f"pbsfa_{frac:g}", ms, mask.density(), flops)
        if frac in flex_fractions:
            try:
                record(f"flex_{frac:g}", bench(flex_fn(inp, mask, case)), mask.density(), flops)
            except Exception as e:  # FlexAttention compiles through inductor: report, go on
                print(f"{case.name} flex: not run ({type(e).__name__}: {str(e)[:200]})")
    # Per layer in serving (each layer has its own mask): perm composed with the block
    # table, which the timings above reuse from the mask.
    if fractions:
        build_rows = lambda: attention_mod.compose_row_table(mask, inp.kv)  # noqa: E731
        record("row_table", bench(build_rows), mask.density(), None)
    run_estimator(case, inp, rows)
    if structured and fa3 is not None:
        run_structured(case, seed, fa3, rows)


def run_structured(case: Case, seed: int, fa3, rows: list[dict]) -> None:
    """Estimation + attention through FA3 at the default settings (tau 0.9) on structured
    attention (`structured_qkv`), against fa3_dense on the same inputs."""
    from pbs_vllm.kernels.estimate import build_block_mask
    from pbs_vllm.kernels.varlen import pbs_attention_varlen

    inp = make_inputs(case, seed, structured=True)
    params, scale = SparsityParams(segment_size=SEGMENT), D**-0.5
    dense = plan_for(inp.q, inp.kv, case.batch, params, dense=True).dense_mask()
    dense_flops = 4 * D * (HQ // HKV) * attended_pairs(dense)
    plan = plan_for(inp.q, inp.kv, case.batch, params)  # once per step

    def total():
        mask = build_block_mask(inp.q, inp.kv, case.batch, params, scale, plan)
        return pbs_attention_varlen(inp.q, inp.kv, mask, scale, fa3)

    mask = build_block_mask(inp.q, inp.kv, case.batch, params, scale, plan)
    flops = 4 * D * (HQ // HKV) * attended_pairs(mask)
    dense_fa = lambda: pbs_attention_varlen(inp.q, inp.kv, dense, scale, fa3)  # noqa: E731
    estimate = lambda: build_block_mask(inp.q, inp.kv, case.batch, params, scale, plan)  # noqa: E731
    density = mask.density()
    for method, fn, d, fl in (
        ("structured_fa3_dense", dense_fa, 1.0, dense_flops),
        ("structured_estimate", estimate, density, None),
        ("structured_pbsfa_total", total, density, flops),
    ):
        rows.append(result_row(case, method, d, bench(fn), fl))


def run_estimator(case: Case, inp: Inputs, rows: list[dict]) -> None:
    try:
        from pbs_vllm.kernels.estimate import build_block_mask
    except ImportError as e:
        print(f"{case.name} estimator: skipped ({e})")
        return
    params = SparsityParams()
    plan = plan_for(inp.q, inp.kv, case.batch, params)  # once per step
    fn = lambda: build_block_mask(inp.q, inp.kv, case.batch, params, D**-0.5, plan)
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mask = fn()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    row = result_row(case, "estimate", mask.density(), bench(fn), None)
    rows.append({**row, "peak_extra_mib": round(peak_mib, 1)})


def add_speedups(rows: list[dict]) -> None:
    """Speedups against cuDNN and our dense mask (same case), and against Flex at the
    same selection fraction (pbs_<f> vs flex_<f>)."""
    for base_method, column in (
        ("sdpa_cudnn", "speedup_vs_cudnn"),
        ("pbs_dense_mask", "speedup_vs_dense_pbs"),
    ):
        base = {r["case"]: r["ms"] for r in rows if r["method"] == base_method}
        for r in rows:
            ms = base.get(r["case"])
            r[column] = round(ms / r["ms"], 3) if ms and r["tflops"] else None
    fa3 = {r["case"]: r["tflops"] for r in rows if r["method"] == "fa3_dense"}
    for r in rows:
        rate = fa3.get(r["case"])
        r["rate_vs_fa3"] = round(r["tflops"] / rate, 3) if rate and r["tflops"] else None
    flex = {(r["case"], r["method"][5:]): r["ms"] for r in rows if r["method"].startswith("flex_")}
    for r in rows:
        ms = flex.get((r["case"], r["method"][4:])) if r["method"].startswith("pbs_") else None
        r["speedup_vs_flex"] = round(ms / r["ms"], 3) if ms else None


def _cell(x, spec: str) -> str:
    return format(x, spec) if x else "-"


def markdown(rows: list[dict], header: str) -> str:
    """The rows as a markdown table, then the issue's targets per case where measured."""
    lines = [
        header,
        "",
        "| case | method | density | ms | TFLOP/s | x cuDNN | x dense (ours) | x Flex | x FA3 rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        method = r["method"]
        if "peak_extra_mib" in r:
            method += f" (peak extra {r['peak_extra_mib']} MiB)"
        lines.append(
            f"| {r['case']} | {method} | {r['density']:.3f} | {r['ms']:.2f} | "
            f"{_cell(r['tflops'], '.0f')} | {_cell(r['speedup_vs_cudnn'], '.2f')} | "
            f"{_cell(r['speedup_vs_dense_pbs'], '.2f')} | {_cell(r['speedup_vs_flex'], '.2f')} | "
            f"{_cell(r['rate_vs_fa3'], '.2f')} |"
        )
    by = {(r["case"], r["method"]): r for r in rows}
    lines += ["", "| case | target | measured |", "|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        cudnn = by.get((case, "sdpa_cudnn"))
        for method in ("pbs_dense_mask", "pbs_1"):
            r = by.get((case, method))
            if cudnn and r:
                lines.append(
                    f"| {case} | {method} throughput >= 90% of cuDNN | "
                    f"{r['tflops'] / cudnn['tflops']:.0%} ({r['tflops']:.0f} vs "
                    f"{cudnn['tflops']:.0f} TFLOP/s) |"
                )
        for method in ("pbsfa_1", "pbsfa_0.1"):
            r = by.get((case, method))
            if r and r["rate_vs_fa3"]:
                lines.append(
                    f"| {case} | {method} per computed block >= 90% of FA3 | {r['rate_vs_fa3']:.0%} |"
                )
        r = by.get((case, "pbsfa_0.1"))
        if r and r["speedup_vs_cudnn"]:
            lines.append(f"| {case} | pbsfa_0.1 >= 10x cuDNN | {r['speedup_vs_cudnn']:.2f}x |")
        r = by.get((case, "structured_pbsfa_total"))
        if r and r["speedup_vs_cudnn"]:
            lines.append(
                f"| {case} | structured, estimation + attention >= 1.15x (32K) / 1.25x (64K) "
                f"cuDNN | {r['speedup_vs_cudnn']:.2f}x at density {r['density']:.2f} |"
            )
        r = by.get((case, "pbs_0.1"))
        if r and r["speedup_vs_cudnn"]:
            lines.append(f"| {case} | pbs_0.1 >= 7x cuDNN | {r['speedup_vs_cudnn']:.2f}x |")
        if r and r["speedup_vs_flex"]:
            lines.append(f"| {case} | pbs_0.1 >= 1.3x Flex | {r['speedup_vs_flex']:.2f}x |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict]) -> None:
    print(
        f"{'case':>9} {'method':>15} {'density':>7} {'ms':>9} {'TFLOP/s':>7} "
        f"{'x cuDNN':>7} {'x dense':>7} {'x Flex':>7}"
    )
    for r in rows:
        extra = f"  peak extra {r['peak_extra_mib']} MiB" if "peak_extra_mib" in r else ""
        print(
            f"{r['case']:>9} {r['method']:>15} {r['density']:>7.4f} {r['ms']:>9.3f} "
            f"{_cell(r['tflops'], '.0f'):>7} {_cell(r['speedup_vs_cudnn'], '.2f'):>7} "
            f"{_cell(r['speedup_vs_dense_pbs'], '.2f'):>7} "
            f"{_cell(r['speedup_vs_flex'], '.2f'):>7}{extra}"
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
    parser.add_argument(
        "--sdpa", nargs="*", choices=list(SDPA_BACKENDS), default=list(SDPA_BACKENDS)
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="32K and 128K only: cuDNN, Flex at 0.1, ours dense and at 0.05/0.1/0.25/1.0, "
        "estimate (overrides --sizes/--fractions/--flex-*/--sdpa, implies --no-chunk)",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama")
    parser.add_argument(
        "--structured",
        action="store_true",
        help="also time estimation + FA3 attention at tau 0.9 on structured attention "
        "(pbs_vllm.testing.structured_qkv) against FA3 on the same inputs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory (default $OUT)")
    args = parser.parse_args()
    global HQ, HKV, D
    HQ, HKV, D = SHAPES[args.shape]
    if args.quick:
        args.sizes, args.fractions, args.no_chunk = [32768, 131072], [0.05, 0.1, 0.25, 1.0], True
        args.flex_fractions, args.flex_sizes, args.sdpa = [0.1], [32768, 131072], ["sdpa_cudnn"]
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    header = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{HQ} q / {HKV} KV heads, head dim {D}"
    )
    print(f"device: {header}")
    tune(args.seed)
    check_correctness(args.seed)
    print_compiled_kernels()
    cases = [Case(f"{n // 1024}K", 0, n) for n in args.sizes]
    if not args.no_chunk:
        cases.append(Case("16K@128K", 131072, 16384))
    rows: list[dict] = []
    for case in cases:
        flex = set(args.flex_fractions) if case.q_len in args.flex_sizes and not case.ctx else set()
        run_case(case, args.fractions, flex, args.sdpa, args.seed, rows, args.structured)
        torch.cuda.empty_cache()
    add_speedups(rows)
    print_table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"bench_kernels-{args.shape}.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        best = getattr(attention_mod._pbs_fwd_tuned, "best_config", None)
        with open(os.path.join(args.out, f"bench_kernels-{args.shape}.md"), "w") as f:
            f.write(markdown(rows, f"{header}; autotuned config: {best}"))
        print(f"wrote {path} and its .md")


if __name__ == "__main__":
    main()

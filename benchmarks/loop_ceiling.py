"""Ceiling of the PBS phase-1 loop in Triton on this card: pointer loads vs TMA (GPU only).

A stripped-down phase 1 (no paging, no own region): 16K queries in 128-row tiles of
(token, group head) pairs, 32 / 8 heads, d 128, bf16, each tile attending 100 random
128-key blocks of 128K keys, with K/V read three ways:
  MODE 0  pointer loads of contiguous blocks;
  MODE 1  pointer loads through a row table (random order inside 256-key segments), as
          the PBS kernel reads permuted blocks;
  MODE 2  TMA descriptor loads of contiguous blocks (needs K/V copied into block order).
It tells how much a permuted K/V copy plus TMA could gain over gathering in place
(docs/kernel-notes.md). Outputs are poisoned before each run; MODE 0 and 2 must agree.

    python benchmarks/loop_ceiling.py
"""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _probe(
    q_ptr,
    k_ptr,
    v_ptr,
    kd,
    vd,
    rows_ptr,
    idx_ptr,
    out_ptr,
    n_sel,
    N,
    qk_scale,
    MODE: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HQ: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    tok = tile * (BLOCK_M // GROUP) + offs_m // GROUP
    head = h * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + (tok[:, None].to(tl.int64) * HQ + head[:, None]) * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    idx_row = idx_ptr + (h * tl.num_programs(0) + tile).to(tl.int64) * n_sel
    for it in range(0, n_sel):
        blk = tl.load(idx_row + it)
        if MODE == 0:  # contiguous rows, pointer loads
            r = (h * N + blk * BLOCK_N + offs_n).to(tl.int64)
            k = tl.load(k_ptr + r[:, None] * D + offs_d[None, :])
            v = tl.load(v_ptr + r[:, None] * D + offs_d[None, :])
        elif MODE == 1:  # gathered rows through a row table, pointer loads
            r = tl.load(rows_ptr + h * N + blk * BLOCK_N + offs_n).to(tl.int64)
            k = tl.load(k_ptr + r[:, None] * D + offs_d[None, :])
            v = tl.load(v_ptr + r[:, None] * D + offs_d[None, :])
        else:  # TMA
            k = kd.load([h * N + blk * BLOCK_N, 0])
            v = vd.load([h * N + blk * BLOCK_N, 0])
        qk = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + (tok[:, None].to(tl.int64) * HQ + head[:, None]) * D + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
    )


def main():
    T, HQ, HKV, D, N, NSEL, BM, BN = 16384, 32, 8, 128, 131072, 100, 128, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(HKV * N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(HKV * N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    tiles = T * (HQ // HKV) // BM
    idx = torch.rand(HKV, tiles, N // BN, device="cuda", generator=g).argsort(-1)[..., :NSEL]
    idx = idx.sort(-1).values.int().contiguous()
    # row table: within each 256-key segment a random permutation, rows offset per head
    seg = torch.rand(HKV, N // 256, 256, device="cuda", generator=g).argsort(-1)
    rows = (seg + torch.arange(0, N, 256, device="cuda").view(1, -1, 1)).view(HKV, N)
    rows = (rows + torch.arange(HKV, device="cuda").view(-1, 1) * N).int().contiguous()
    kd = TensorDescriptor.from_tensor(k, [BN, D])
    vd = TensorDescriptor.from_tensor(v, [BN, D])
    flops = 4 * D * BM * BN * NSEL * tiles * HKV
    ref = None
    for mode, name in ((0, "pointer contiguous"), (1, "pointer gathered"), (2, "TMA contiguous")):
        for w, s in ((8, 2), (8, 3), (8, 4)):
            out = torch.full_like(q, float("nan"))

            def run(out=out, mode=mode, w=w, s=s):
                _probe[(tiles, HKV)](
                    q,
                    k,
                    v,
                    kd,
                    vd,
                    rows,
                    idx,
                    out,
                    NSEL,
                    N,
                    D**-0.5 * 1.4427,
                    MODE=mode,
                    GROUP=HQ // HKV,
                    D=D,
                    BLOCK_M=BM,
                    BLOCK_N=BN,
                    HQ=HQ,
                    num_warps=w,
                    num_stages=s,
                )

            try:
                run()
                ms = do_bench(run)
            except Exception as e:
                print(name, w, s, "failed", str(e).splitlines()[0][:100])
                continue
            ok = torch.isfinite(out).all().item()
            if mode != 1:
                if ref is None:
                    ref = out.clone()
                err = ((out.float() - ref.float()).abs().max()).item()
            else:
                err = float("nan")
            print(
                f"{name:20s} w{w} s{s}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                f"finite={ok} maxdiff_vs_first={err:.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()

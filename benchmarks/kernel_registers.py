"""Registers and spills of the attention kernel's tuned configs, compiled offline (no GPU).

Triton compiles for an sm_90a target on any machine; the bundled ptxas reports registers
and spill bytes per config, which on a GPU show up only after a launch. The launch-time
specialisation is mimicked: unit strides along D, 16-divisible pointers and large strides.
Triton versions differ (the GPU image may run an older one), so compare configs and
revisions with each other, not with absolute numbers from another Triton.

    python benchmarks/kernel_registers.py [--head-dim 128] [--group 4] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pbs_vllm.kernels import attention

UNIT_STRIDES = ("stride_qd", "stride_od", "stride_kd", "stride_vd")
DIVISIBLE_STRIDES = (
    "stride_qt",
    "stride_qh",
    "stride_ot",
    "stride_oh",
    "stride_kp",
    "stride_ks",
    "stride_kh",
    "stride_vp",
    "stride_vs",
    "stride_vh",
)


def compile_config(const: dict, dtype: str, config: triton.Config):
    """The compiled kernel for one config, specialised as a launch would be."""
    fn, const = attention._pbs_fwd_kernel, {**const, **config.kwargs}
    const.update(dict.fromkeys(UNIT_STRIDES, 1))
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            sig[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name == "lse_ptr" else "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name.endswith("_ptr") or name in DIVISIBLE_STRIDES
    }
    return triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )


def ptxas_report(ptx: str) -> str:
    """'regs R, spill stores S bytes' from ptxas -v on the kernel's PTX."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # The newest bundled ptxas accepts the PTX version this Triton emits.
    ptxas = next(p for p in ("ptxas-blackwell", "ptxas") if os.path.exists(f"{bin_dir}/{p}"))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [f"{bin_dir}/{ptxas}", "-v", "--gpu-name=sm_90a", src, "-o", f"{tmp}/k.cubin"],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    if not (regs and spills):
        return f"ptxas failed: {res.stderr.strip()[:200]}"
    return f"regs {regs.group(1)}, spill stores {spills.group(1)} bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--shared-kv-strides", type=int, choices=[0, 1], default=1)
    args = parser.parse_args()
    const = dict(
        HEAD_DIM=args.head_dim,
        GROUP=args.group,
        BLOCK_B=128,
        PAGE_SIZE=16,
        SHARED_KV_STRIDES=bool(args.shared_kv_strides),
        STORE_LSE=False,
        DOT_PRECISION="tf32",
        BLOCK_M=128 if args.head_dim <= 128 else 64,
    )
    for config in attention._prune_configs(attention._TUNED_CONFIGS, const):
        kernel = compile_config(const, args.dtype, config)
        print(f"{config}: shared {kernel.metadata.shared} B, {ptxas_report(kernel.asm['ptx'])}")


if __name__ == "__main__":
    main()

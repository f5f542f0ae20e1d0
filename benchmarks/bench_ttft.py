"""Time to first token in real vLLM: `--attention-backend pbs` against FLASH_ATTN.

One run of this script times every configuration on the same GPU. Each configuration runs
in its own child process (a fresh `vllm.LLM`, engine in-process so the PBS stats object is
readable), in sequence; the parent prints one table and writes CSV / JSON / markdown.

    python benchmarks/bench_ttft.py --model /tmp/llama8b --lengths 8k,16k,32k,64k,128k \
        --configs flash,pbs-d5,pbs-d10,pbs-d25,pbs-tau --out results/

TTFT is the wall time of `LLM.generate` for one prompt with `max_tokens=1` (prefill of all
chunks + one sampled token), warmed up, median of `--reps`. Prompts are random token ids
(the dummy-weight model has no use for text), or with `--prompts code` windows of real
source code (for real weights). Decode throughput: a batch of short
prompts generating `--decode-tokens` tokens each, output tokens per second.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pbs_vllm.evals.compare import SETTINGS
from pbs_vllm.evals.engine import yarn_hf_overrides

# name -> (attention backend, PBS settings or None): the engine settings of
# `pbs_vllm.evals.compare.SETTINGS` (one table for the suite and this benchmark; `flash`
# is FLASH_ATTN), less the density-matched ones, which need a measurement first.
CONFIGS: dict[str, tuple[str, dict | None]] = {
    name: ("FLASH_ATTN", None) if s.backend == "stock" else ("pbs", dict(s.pbs))
    for name, s in SETTINGS.items()
    if s.match_density_of is None
}


def parse_length(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def code_token_ids(tokenizer, min_tokens: int = 600_000) -> list[int]:
    """Token ids of the running interpreter's standard-library sources, in sorted file
    order, until `min_tokens`: real text for a real model's attention (a coder model's
    own domain), no download."""
    import sysconfig

    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        ids += tokenizer.encode(f"# {path.name}\n{text}\n", add_special_tokens=False)
        if len(ids) >= min_tokens:
            break
    return ids


def run_worker(args: argparse.Namespace) -> None:
    """Child process: one engine, every length, one JSON line per measurement on stdout."""
    from vllm import LLM, SamplingParams

    backend, pbs = CONFIGS[args.config]
    kwargs = dict(
        model=args.model,
        load_format="auto" if args.real_weights else "dummy",
        attention_backend=backend,
        max_model_len=max(args.lengths + args.warmup_lengths + [args.profile]) + 64,
        gpu_memory_utilization=args.gpu_mem,
        enforce_eager=args.eager,
        enable_prefix_caching=False,  # every repetition must really prefill
        seed=0,
    )
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.yarn:
        kwargs["hf_overrides"] = yarn_hf_overrides(args.model, args.yarn)
    if pbs is not None:
        kwargs["additional_config"] = {"pbs": {**pbs, "stats_log_interval_s": 0}}
    llm = LLM(**kwargs)
    vocab = llm.get_tokenizer().vocab_size
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    import torch

    gen = torch.Generator().manual_seed(1234)

    text_ids = code_token_ids(llm.get_tokenizer()) if args.prompts == "code" else None

    def prompt(n: int) -> dict:
        if text_ids is None:
            ids = torch.randint(10, vocab - 10, (n,), generator=gen).tolist()
        else:  # a window of real source code at a random offset (every prompt differs)
            start = int(torch.randint(0, len(text_ids) - n, (1,), generator=gen))
            ids = text_ids[start : start + n]
        return {"prompt_token_ids": ids}

    def ttft(n: int) -> float:
        p = prompt(n)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        return time.perf_counter() - t0

    stats = _stats() if pbs is not None else None
    # Warm-up: kernel compilation and autotuning, a single-chunk and a two-chunk prompt.
    for n in args.warmup_lengths:
        first_request(lambda n=n: ttft(n), args, f"warmup-{n}")
    for n in args.lengths:
        # The first request at a length, apart from the timed ones (a stall shows here,
        # with its Python profile when it is slow).
        first = first_request(lambda n=n: ttft(n), args, str(n))
        times = [ttft(n) for _ in range(args.reps)]
        row = {
            "config": args.config,
            "length": n,
            "ttft_s": statistics.median(times),
            "ttft_all_s": times,
            "first_s": first,
        }
        if stats is not None:
            # One more, untimed prefill with a density sample at every layer and step
            # (sampling syncs the device, so the timed runs above take none).
            stats.reset()
            stats.configure(1e-9)
            ttft(n)
            stats.configure(0.0)
            snap = stats.snapshot()
            row["density"] = snap["mean_density"]
            row["density_per_layer"] = snap["density_per_layer"]
        print("RESULT " + json.dumps(row), flush=True)

    if args.profile:
        write_profile(lambda: ttft(args.profile), args.out / f"profile-{args.config}.txt")

    if args.decode_tokens:
        many = [prompt(args.decode_prompt_len) for _ in range(args.decode_batch)]

        def batch_s(max_tokens: int) -> float:
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(many, sp, use_tqdm=False)
            return time.perf_counter() - t0

        batch_s(2)  # warm-up
        # Decode only: the same batch with 1 and with N output tokens; the difference is
        # N - 1 decode steps of the whole batch (prefill and first sample cancel out).
        prefill = statistics.median(batch_s(1) for _ in range(args.reps))
        full = statistics.median(batch_s(args.decode_tokens) for _ in range(args.reps))
        row = {
            "config": args.config,
            "decode_tok_per_s": (args.decode_tokens - 1) * len(many) / (full - prefill),
            "decode_batch": args.decode_batch,
        }
        print("RESULT " + json.dumps(row), flush=True)


# A first request slower than this is a stall worth its Python profile.
STALL_S = 1.0


def first_request(run, args: argparse.Namespace, label: str) -> float:
    """Run `run()` (the first prefill at a length) under cProfile; returns its seconds.

    A run slower than STALL_S writes its 30 costliest functions (cumulative time) to
    first-<config>-<label>.txt in --out, so a stall names where it waited (a compile, a
    capture, an allocation)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    seconds = prof.runcall(run)
    if seconds > STALL_S and args.out is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"first-{args.config}-{label}.txt"
        path.write_text(f"first request {seconds:.3f} s\n{text.getvalue()}")
        print(f"stall: first request at {label} took {seconds:.2f} s -> {path}", flush=True)
    return seconds


def write_profile(run, path: Path) -> None:
    """Profile one `run()` (a prefill) with torch.profiler; write the op table to `path`.

    The table ranks ops by device time; "pbs_estimate" / "pbs_attention" are the PBS
    stages (torch.profiler ranges of pbs_vllm.kernels), "wall" is the host time of the run,
    so wall minus the summed kernel time is time the GPU sat idle.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = run()
    events = prof.key_averages()
    # Device events are kernels, memsets/copies and the "pbs_*" ranges (not kernels).
    kernels = [
        e for e in events if e.device_type == DeviceType.CUDA and not e.key.startswith("pbs_")
    ]
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
    # Host time of the PBS stages: the ranges' CPU time (launches, Python, any sync).
    ranges = {e.key: e for e in events if e.key in ("pbs_estimate", "pbs_attention")}
    host = ", ".join(
        f"{k} host {e.cpu_time_total / 1e3:.1f} ms over {e.count} calls "
        f"({e.cpu_time_total / 1e3 / max(e.count, 1):.3f} ms/call)"
        for k, e in sorted(ranges.items())
    )
    table = events.table(sort_by="device_time_total", row_limit=45, max_name_column_width=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"wall {wall:.3f} s, summed kernel time {kernel_s:.3f} s\n{host}\n\n{table}\n")
    print(f"profile: wall {wall:.3f} s, kernels {kernel_s:.3f} s; {host} -> {path}", flush=True)


def _stats():
    """The engine's PBS stats (readable here: the engine runs in this process)."""
    from pbs_vllm.backend.stats import STATS

    return STATS


def _worker_cmd(
    args: argparse.Namespace, name: str, lengths: list[int], reps: int, profile: bool = True
) -> list[str]:
    """The command line of one engine's worker process (config `name`)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--config",
        name,
        "--model",
        args.model,
        "--lengths",
        ",".join(map(str, lengths)),
        "--reps",
        str(reps),
        "--gpu-mem",
        str(args.gpu_mem),
        "--decode-tokens",
        str(args.decode_tokens),
        "--decode-batch",
        str(args.decode_batch),
        "--decode-prompt-len",
        str(args.decode_prompt_len),
    ]
    if args.eager:
        cmd.append("--eager")
    if args.real_weights:
        cmd.append("--real-weights")
    if args.yarn:
        cmd += ["--yarn", str(args.yarn)]
    cmd += ["--prompts", args.prompts]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.profile and profile:
        cmd += ["--profile", str(args.profile)]
    if args.profile or args.out:
        cmd += ["--out", str(args.out or ".")]
    cmd += ["--warmup-lengths", ",".join(map(str, args.warmup_lengths))]
    return cmd


def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if args.prime:
        # An untimed engine first: on a fresh GPU machine (or a model configuration new to
        # it: YaRN changes the compile cache key) the first engine ran 19-37% slower than
        # the same config in later engines (docs/benchmarks.md), whatever its config.
        first = args.configs[0]
        t0 = time.time()
        proc = subprocess.run(
            _worker_cmd(args, first, args.warmup_lengths[:1], 1, profile=False),
            env=env,
            capture_output=True,
            text=True,
        )
        print(f"[prime: {first}] exit {proc.returncode}, {time.time() - t0:.0f}s", flush=True)
    for name in args.configs:
        cmd = _worker_cmd(args, name, args.lengths, args.reps)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        got = [
            json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
        ]
        print(
            f"[{name}] exit {proc.returncode}, {len(got)} results, {time.time() - t0:.0f}s",
            flush=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-4000:], flush=True)
        if args.out:  # the engine's PBS lines (kernel choice, warm-up, fallbacks) and errors
            # (vLLM's logger writes to stdout, tracebacks go to stderr)
            lines = proc.stdout.splitlines() + proc.stderr.splitlines()
            keep = [ln for ln in lines if _ENGINE_LOG.search(ln) or ln.startswith("stall:")]
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"engine-{name}.log").write_text("\n".join(keep[-400:]) + "\n")
        rows += got
    return rows


_ENGINE_LOG = re.compile(r"PBS|pbs_vllm|Traceback|Error|error:")


def report(rows: list[dict], configs: list[str], out: Path | None) -> str:
    ttft = {(r["config"], r["length"]): r for r in rows if "length" in r}
    lengths = sorted({r["length"] for r in rows if "length" in r})
    base = "flash" if "flash" in configs else configs[0]
    head = "| config | " + " | ".join(f"{n // 1024}K" for n in lengths) + " | decode tok/s |"
    lines = [head, "|" + "---|" * (len(lengths) + 2)]
    decode = {r["config"]: r["decode_tok_per_s"] for r in rows if "decode_tok_per_s" in r}
    for c in configs:
        cells = []
        for n in lengths:
            r, b = ttft.get((c, n)), ttft.get((base, n))
            if r is None:
                cells.append("-")
                continue
            cell = f"{r['ttft_s'] * 1000:.0f} ms"
            if b and c != base:
                cell += f" ({b['ttft_s'] / r['ttft_s']:.2f}x)"
            if r.get("density") is not None:
                cell += f" d={r['density']:.3f}"
            cells.append(cell)
        dec = f"{decode[c]:.0f}" if c in decode else "-"
        if c in decode and base in decode and c != base:
            dec += f" ({decode[c] / decode[base] - 1:+.1%})"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {dec} |")
    table = "\n".join(lines)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ttft.json").write_text(json.dumps(rows, indent=1))
        (out / "ttft.md").write_text(table + "\n")
        with open(out / "ttft.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["config", "length", "ttft_s", "density"])
            for r in rows:
                if "length" in r:
                    w.writerow([r["config"], r["length"], r["ttft_s"], r.get("density")])
    return table


def plot_ttft(rows: list[dict], path: Path, title: str = "") -> bool:
    """TTFT against prompt length per config (log-log), with the speedup over `flash`
    beside it when flash ran; False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_config: dict[str, dict[int, float]] = {}
    for r in rows:
        if "length" in r:
            by_config.setdefault(r["config"], {})[r["length"]] = r["ttft_s"] * 1000
    base = by_config.get("flash")
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(11 if base else 6, 4), squeeze=False)
    for i, (name, points) in enumerate(by_config.items()):
        xs, style = sorted(points), dict(marker="o", color=f"C{i}", label=name)
        axes[0][0].plot([x / 1024 for x in xs], [points[x] for x in xs], **style)
        if base and name != "flash":
            common = [x for x in xs if x in base]
            speed = [base[x] / points[x] for x in common]
            axes[0][1].plot([x / 1024 for x in common], speed, **style)
    axes[0][0].set(xscale="log", yscale="log", xlabel="prompt (K tokens)", ylabel="TTFT (ms)")
    axes[0][0].legend(fontsize=8)
    if base:
        axes[0][1].axhline(1.0, color="grey", lw=0.8)
        axes[0][1].set(xscale="log", xlabel="prompt (K tokens)", ylabel="x FLASH_ATTN")
        axes[0][1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local model folder (config + tokenizer)")
    ap.add_argument("--lengths", default="8k,16k,32k,64k,128k")
    ap.add_argument("--configs", default="flash,pbs-d10,pbs-d5,pbs-d25,pbs-tau")
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-mem", type=float, default=0.90)
    ap.add_argument("--eager", action="store_true", help="skip torch.compile / CUDA graphs")
    ap.add_argument(
        "--real-weights", action="store_true", help="load the model's weights (default: dummy)"
    )
    ap.add_argument(
        "--prompts",
        choices=("random", "code"),
        default="random",
        help="prompt token ids: random (dummy weights) or windows of real source code",
    )
    ap.add_argument("--yarn", type=float, default=0, help="YaRN rope scaling factor (0 = off)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0, help="0 = vLLM's default")
    ap.add_argument("--decode-tokens", type=int, default=0, help="0 = skip decode timing")
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-prompt-len", type=int, default=1024)
    ap.add_argument(
        "--warmup-lengths",
        default="8k,20k",
        help="untimed prompts first (one chunk, two chunks): compilation and autotuning",
    )
    ap.add_argument(
        "--profile",
        type=parse_length,
        default=0,
        help="profile one prefill of this length per config (profile-<config>.txt in --out)",
    )
    ap.add_argument(
        "--prime",
        action="store_true",
        help="start the first config's engine once, untimed, before the timed engines (the "
        "first engine on a fresh machine or for a new model configuration runs slower)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.lengths = [parse_length(x) for x in args.lengths.split(",")]
    args.warmup_lengths = [parse_length(x) for x in args.warmup_lengths.split(",")]
    if args.worker:
        run_worker(args)
        return
    args.configs = args.configs.split(",")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    rows = run_all(args)
    print(report(rows, args.configs, args.out))
    if args.out and plot_ttft(rows, args.out / "ttft.png"):
        print(f"wrote {args.out / 'ttft.png'}")


if __name__ == "__main__":
    main()

"""PBS mask density per layer and per KV head against prompt length, on a real model in vLLM.

    python benchmarks/bench_density.py --model /models/qwen2.5-coder-0.5b \
        --lengths 8k,16k,32k --prompts-per-length 4 --out results/density

One in-process engine (`attention_backend="PBS"`, the sparse path at every length and
density: `dense_fallback_len` 0, `dense_above` none, plus `--pbs` overrides). Prompts are
windows of real source code (`bench_ttft.code_token_ids`) at random offsets. Per length:
the backend's stats (`pbs_vllm.backend.stats.STATS`) are reset, a density sample is taken
at every layer-call (one mask per layer and prefill step), the prompts are prefilled with
one greedy token, and the per layer / per (layer, KV head) means are read. A density is
computed key blocks / causally visible key blocks (1.0 = dense causal attention); a
layer's value is the mean over its layer-calls (prefill steps), a layer's row in the
first table the mean over its KV heads.

Then one prompt of `--heatmap-length` is prefilled alone with the masks captured (by
wrapping `PBSAttentionImpl._plan_prefills`): the PBS mask of `--heatmap-layer` for the
prompt's last prefill chunk, beside the unpermuted mask the same layer estimates for the
same queries and cache (`permute` off, same tau), drawn by
`pbs_vllm.fidelity.heatmap.plot_selection_heatmap` for KV head `--heatmap-head`.

Writes to OUT, after every length: density.md (per layer x length, per layer x KV head x
length), density.json, density.png (density against layer, one line per length; per-KV-head
density of every layer at the longest length), and heatmap.png. A length that fails is
recorded with its error and the others still run. Prompts are capped one token below the
model's context (native, or times `--yarn`): 32k = 32767 tokens on a 32K model.
Without CUDA it runs on vLLM's CPU platform in float32, Triton in the interpreter.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

# The engine must run in this process so the backend's stats and impl are reachable here.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("PBS_VLLM_CPU_PLATFORM", "1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bench_ttft import code_token_ids, parse_length  # noqa: E402

from pbs_vllm.evals.engine import yarn_hf_overrides  # noqa: E402

# The backend's stats logger: with a sample at every layer-call it logs a line per step.
STATS_LOGGER = "vllm.pbs_vllm.backend.stats"
EVERY_CALL_S = 1e-9  # stats interval: a density sample at every layer-call


def log(msg: str) -> None:
    print(f"[density] {msg}", file=sys.stderr, flush=True)


def label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def natural_key(name: str) -> list:
    """Sort key: layer names by their numbers (layers.2 before layers.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def context_limit(model: str, yarn: float) -> int | None:
    """The model's context (config.json max_position_embeddings, times a YaRN factor)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    native = config.get("max_position_embeddings")
    if native is None:
        return None
    return int(native * yarn) if yarn else int(native)


def pbs_settings(args: argparse.Namespace) -> dict:
    return {
        "tau": args.tau,
        "dense_fallback_len": 0,
        "dense_above": None,
        "stats_log_interval_s": EVERY_CALL_S,
        **args.pbs,
    }


def make_llm(args: argparse.Namespace, max_model_len: int):
    from vllm import LLM

    kwargs = dict(
        model=args.model,
        attention_backend="PBS",
        additional_config={"pbs": pbs_settings(args)},
        max_model_len=max_model_len,
        enforce_eager=not args.compile,
        enable_prefix_caching=False,  # every prompt must really prefill
        seed=0,
        dtype=args.dtype or ("auto" if ON_GPU else "float32"),
    )
    if ON_GPU:
        kwargs["gpu_memory_utilization"] = args.gpu_mem
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.yarn:
        kwargs["hf_overrides"] = yarn_hf_overrides(args.model, args.yarn)
    return LLM(**kwargs)


class MaskCapture:
    """While `active`, keeps each layer's PBS mask of the latest prefill step (and the
    unpermuted mask estimated for the same queries and cache), by wrapping
    `PBSAttentionImpl._plan_prefills`, which receives the layer and returns the masks."""

    def __init__(self) -> None:
        self.active = False
        self.masks: dict[str, tuple] = {}  # layer name -> (PBS mask, unpermuted mask)
        self.chunks: dict[str, list] = {}  # layer name -> [(ctx_len, q_len)] per step
        self._original = None

    def install(self) -> None:
        from pbs_vllm.backend import impl as impl_module

        cls = impl_module.PBSAttentionImpl
        original = self._original = cls._plan_prefills
        capture = self

        def plan_prefills(impl, layer, query, kv_cache, m):
            work = original(impl, layer, query, kv_cache, m)
            name = getattr(layer, "layer_name", None)
            if capture.active and name is not None:
                capture.take(impl, name, work)
            return work

        cls._plan_prefills = plan_prefills

    def uninstall(self) -> None:
        if self._original is not None:
            from pbs_vllm.backend import impl as impl_module

            impl_module.PBSAttentionImpl._plan_prefills = self._original
            self._original = None

    def take(self, impl, name: str, work: list[tuple]) -> None:
        from pbs_vllm.backend import impl as impl_module

        sparse = [(run, q, kv, mask) for run, q, kv, mask in work if not run.dense]
        if not sparse:
            return
        run, q, kv, mask = sparse[-1]
        # The unpermuted ablation at the same settings, on the same queries and cache (its
        # estimation plan on the batch is the one PBS uses: it depends on geometry only).
        unpermuted = impl_module.prefill_mask(
            q, kv, run.batch, replace(impl.params, permute=False), impl.scale, plan=run.plan
        )
        self.masks[name] = (mask, unpermuted)
        self.chunks.setdefault(name, []).append([list(run.batch.ctx_lens), list(run.batch.q_lens)])


def mask_to_cpu(mask):
    """A host copy of a PBSBlockMask (its to_dense at 32K is large for device memory)."""
    from pbs_vllm.kernels.block_mask import PBSBlockMask

    return PBSBlockMask(
        plan=mask.plan.on("cpu"),
        segment_size=mask.segment_size,
        own_start=mask.own_start.cpu(),
        kv_num_blocks=mask.kv_num_blocks.cpu(),
        kv_indices=mask.kv_indices.cpu(),
        perm=mask.perm.cpu(),
        perm_offset=mask.perm_offset.cpu(),
    )


def resolve_layer(spec: str | None, names: list[str]) -> str:
    """--heatmap-layer: an index into the layers (sorted by number), a name, or a unique
    part of one; None = the middle layer."""
    if not names:
        raise ValueError("no PBS layer was seen")
    if spec is None:
        return names[len(names) // 2]
    if re.fullmatch(r"-?\d+", spec):
        return names[int(spec)]
    if spec in names:
        return spec
    hits = [n for n in names if spec in n]
    if len(hits) != 1:
        raise ValueError(f"--heatmap-layer {spec!r} matches {hits or 'no layer'} of {names}")
    return hits[0]


def measure_length(llm, stats, prompts: list[list[int]]) -> dict:
    """Prefill `prompts` (one greedy token each) with a density sample at every
    layer-call; the stats that come out of it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    stats.reset()
    stats.configure(EVERY_CALL_S)
    t0 = time.perf_counter()
    try:
        llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        stats.configure(0.0)
    seconds = time.perf_counter() - t0
    snap = stats.snapshot()
    per_layer = {
        k: snap["density_per_layer"][k] for k in sorted(snap["density_per_layer"], key=natural_key)
    }
    per_head = {
        k: snap["density_per_layer_head"][k]
        for k in sorted(snap["density_per_layer_head"], key=natural_key)
    }
    head_mean = {k: sum(v) / len(v) for k, v in per_head.items() if v}
    # Every head sees the same blocks: the mean over heads must equal the layer's density.
    gaps = [abs(head_mean[k] - per_layer[k]) for k in head_mean if k in per_layer]
    return {
        "seconds": seconds,
        "mean_density": snap["mean_density"],
        "density_samples": snap["density_samples"],
        "steps": snap["steps"],
        "sparse_prefill_tokens": snap["sparse_prefill_tokens"],
        "dense_prefill_tokens": snap["dense_prefill_tokens"],
        "density_per_layer": per_layer,
        "density_per_layer_head": per_head,
        "density_per_layer_head_mean": head_mean,
        "max_gap_head_mean_vs_layer": max(gaps) if gaps else None,
    }


def capture_heatmap(llm, capture: MaskCapture, prompt: list[int], args, out: Path) -> dict:
    """Prefill `prompt` alone with mask capture on; draw the chosen layer's last-chunk mask."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from pbs_vllm.fidelity.heatmap import plot_selection_heatmap

    capture.masks, capture.chunks = {}, {}
    capture.active = True
    try:
        llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)],
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
    finally:
        capture.active = False
    names = sorted(capture.masks, key=natural_key)
    layer = resolve_layer(args.heatmap_layer, names)
    mask, unpermuted = capture.masks[layer]
    capture.masks = {}  # release the other layers' masks
    mask, unpermuted = mask_to_cpu(mask), mask_to_cpu(unpermuted)
    if len(mask.batch) != 1:
        raise RuntimeError(f"the captured step holds {len(mask.batch)} sequences, not one")
    head = args.heatmap_head
    if not 0 <= head < mask.num_kv_heads:
        raise ValueError(f"--heatmap-head {head}: the model has {mask.num_kv_heads} KV heads")
    path = out / "heatmap.png"
    plot_selection_heatmap(unpermuted, mask, head, path)
    return {
        "layer": layer,
        "layer_index": names.index(layer),
        "head": head,
        "prompt_tokens": len(prompt),
        "ctx_len": mask.batch.ctx_lens[0],
        "q_len": mask.batch.q_lens[0],
        "chunks": capture.chunks.get(layer, []),
        "repr": repr(mask),
        "density": mask.density(),
        "density_per_head": mask.density_per_head_tensor().tolist(),
        "unpermuted_repr": repr(unpermuted),
        "unpermuted_density": unpermuted.density(),
        "unpermuted_density_per_head": unpermuted.density_per_head_tensor().tolist(),
        "path": str(path),
    }


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    ok = [r for r in results if r.get("error") is None]
    layers = sorted({k for r in ok for k in r["density_per_layer"]}, key=natural_key)
    lines = [
        f"# PBS mask density: {meta['model']}",
        "",
        f"PBS settings {json.dumps(meta['pbs'])}; {meta['prompts_per_length']} code prompts "
        f"per length; device {meta['device']}; max_num_batched_tokens "
        f"{meta['max_num_batched_tokens'] or 'default'}; yarn {meta['yarn'] or 'off'}.",
        "Density = computed key blocks / causally visible key blocks (1.0 = dense), mean "
        "over a layer's prefill steps; a layer's cell is the mean over its KV heads.",
        "",
    ]
    cols = results
    lines.append("| layer | " + " | ".join(label(r["length"]) for r in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for i, name in enumerate(layers):
        cells = [fmt(r.get("density_per_layer_head_mean", {}).get(name)) for r in cols]
        lines.append(f"| {i} `{name}` | " + " | ".join(cells) + " |")
    lines.append("| **overall** | " + " | ".join(fmt(r.get("mean_density")) for r in cols) + " |")
    lines.append("| prompt tokens | " + " | ".join(str(r["tokens"]) for r in cols) + " |")
    lines.append(
        "| prefill s | "
        + " | ".join("-" if r.get("seconds") is None else f"{r['seconds']:.1f}" for r in cols)
        + " |"
    )

    heads = max((len(v) for r in ok for v in r["density_per_layer_head"].values()), default=0)
    if heads:
        lines += ["", "Per layer and KV head:", ""]
        head_cols = [(r, h) for r in ok for h in range(heads)]
        lines.append(
            "| layer | " + " | ".join(f"{label(r['length'])} h{h}" for r, h in head_cols) + " |"
        )
        lines.append("|---|" + "---:|" * len(head_cols))
        for i, name in enumerate(layers):
            cells = []
            for r, h in head_cols:
                v = r["density_per_layer_head"].get(name, [])
                cells.append(fmt(v[h]) if h < len(v) else "-")
            lines.append(f"| {i} | " + " | ".join(cells) + " |")

    failed = [r for r in results if r.get("error") is not None]
    if failed:
        lines += ["", "Errors:", ""]
        lines += [f"- {label(r['length'])}: `{r['error']}`" for r in failed]

    hm = report.get("heatmap")
    if hm:
        lines += ["", "## Mask heatmap", ""]
        if hm.get("error"):
            lines.append(f"Failed: `{hm['error']}`")
        else:
            lines += [
                f"Layer {hm['layer_index']} `{hm['layer']}`, KV head {hm['head']}, one prompt "
                f"of {hm['prompt_tokens']} tokens, its last prefill chunk: queries "
                f"[{hm['ctx_len']}, {hm['ctx_len'] + hm['q_len']}) "
                f"({len(hm['chunks'])} chunk(s)). heatmap.png: the unpermuted mask this "
                "layer estimates for the same queries (tau as PBS), PBS in permuted key "
                "blocks, PBS at original key positions.",
                "",
                f"- PBS: `{hm['repr']}`, density {hm['density']:.4f}, per KV head "
                + ", ".join(f"{d:.4f}" for d in hm["density_per_head"]),
                f"- unpermuted: `{hm['unpermuted_repr']}`, density "
                f"{hm['unpermuted_density']:.4f}, per KV head "
                + ", ".join(f"{d:.4f}" for d in hm["unpermuted_density_per_head"]),
            ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ok = [r for r in report["results"] if r.get("error") is None and r["density_per_layer"]]
    if not ok:
        return
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(13, 5), constrained_layout=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    for r in ok:
        names = sorted(r["density_per_layer_head_mean"] or r["density_per_layer"], key=natural_key)
        values = [
            r["density_per_layer_head_mean"].get(n, r["density_per_layer"].get(n)) for n in names
        ]
        left.plot(range(len(names)), values, marker="o", label=f"{label(r['length'])}")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("layer index")
    left.set_ylabel("density (computed / visible key blocks)")
    left.set_ylim(bottom=0)
    left.set_title("PBS mask density per layer (mean over KV heads)")
    left.grid(alpha=0.3)
    left.legend(title="prompt length")

    longest = max(ok, key=lambda r: r["length"])
    names = sorted(longest["density_per_layer_head"], key=natural_key)
    if names:
        grid = torch.tensor([longest["density_per_layer_head"][n] for n in names]).numpy()
        image = right.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        right.set_xlabel("KV head")
        right.set_ylabel("layer index")
        right.set_xticks(range(grid.shape[1]))
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
        if grid.size <= 400:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    right.text(
                        j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w"
                    )
        fig.colorbar(image, ax=right, label="density")
    right.set_title(f"density per layer and KV head, {label(longest['length'])}")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "density.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out / "density.md").write_text(md)
    try:
        plot(report, out / "density.png")
    except Exception:  # a plot must not lose the tables
        log("plot failed:\n" + traceback.format_exc())
    return md


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local model folder (config, tokenizer)")
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument("--prompts-per-length", type=int, default=4)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--pbs", type=json.loads, default={}, help="JSON PBS setting overrides")
    ap.add_argument("--max-num-batched-tokens", type=int, default=0, help="0 = vLLM's default")
    ap.add_argument("--heatmap-layer", default=None, help="index or name (default: middle)")
    ap.add_argument("--heatmap-head", type=int, default=0, help="KV head of the heatmap")
    ap.add_argument("--heatmap-length", type=parse_length, default=None, help="default: longest")
    ap.add_argument("--yarn", type=float, default=0, help="YaRN rope scaling factor (0 = off)")
    ap.add_argument("--gpu-mem", type=float, default=0.85, help="gpu_memory_utilization")
    ap.add_argument("--dtype", default=None, help="default: auto on CUDA, float32 on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile / CUDA graphs on")
    ap.add_argument("--seed", type=int, default=0, help="prompt offsets")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not isinstance(args.pbs, dict):
        ap.error("--pbs must be a JSON object")
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    hm_length = args.heatmap_length or max(lengths)

    limit = context_limit(args.model, args.yarn)
    max_model_len = max(lengths + [hm_length]) + 8
    if limit is not None:
        max_model_len = min(max_model_len, limit)
    cap = max_model_len - 1  # a prompt plus its one output token must fit
    device = torch.cuda.get_device_name() if ON_GPU else "cpu"
    report: dict = {
        "meta": {
            "model": args.model,
            "pbs": pbs_settings(args),
            "prompts_per_length": args.prompts_per_length,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "yarn": args.yarn,
            "max_model_len": max_model_len,
            "device": device,
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "results": [],
    }
    logging.getLogger(STATS_LOGGER).setLevel(logging.WARNING)
    log(f"engine: max_model_len {max_model_len}, PBS {json.dumps(pbs_settings(args))}")
    llm = make_llm(args, max_model_len)
    logging.getLogger(STATS_LOGGER).setLevel(logging.WARNING)
    from pbs_vllm.backend.stats import STATS

    text = code_token_ids(llm.get_tokenizer())
    gen = torch.Generator().manual_seed(args.seed)

    def windows(n: int, k: int) -> list[list[int]]:
        if len(text) <= n:
            raise ValueError(f"only {len(text)} code tokens for a {n}-token prompt")
        starts = torch.randint(0, len(text) - n, (k,), generator=gen).tolist()
        return [text[s : s + n] for s in starts]

    capture = MaskCapture()
    capture.install()
    try:
        for n in lengths:
            tokens = min(n, cap)
            row = {"length": n, "tokens": tokens, "prompts": args.prompts_per_length}
            log(f"{label(n)}: {args.prompts_per_length} prompts of {tokens} tokens")
            try:
                row.update(measure_length(llm, STATS, windows(tokens, args.prompts_per_length)))
                row["error"] = None
                log(f"{label(n)}: mean density {fmt(row['mean_density'])}, {row['seconds']:.1f} s")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"{label(n)} failed:\n" + traceback.format_exc())
            report["results"].append(row)
            write(report, args.out)

        tokens = min(hm_length, cap)
        log(f"heatmap: one prompt of {tokens} tokens")
        try:
            report["heatmap"] = {"length": hm_length, "error": None}
            report["heatmap"].update(
                capture_heatmap(llm, capture, windows(tokens, 1)[0], args, args.out)
            )
        except Exception as e:
            report["heatmap"] = {"length": hm_length, "error": f"{type(e).__name__}: {e}"}
            log("heatmap failed:\n" + traceback.format_exc())
    finally:
        capture.uninstall()
    md = write(report, args.out)
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()

"""RULER-style long-context accuracy of PBS settings against the stock attention backend.

    python benchmarks/bench_ruler.py --model /models/llama8b --lengths 8k,16k,32k \
        --tasks all --num-prompts 50 --settings flash,pbs-default,pbs-sparse,unpermuted-matched \
        --out results/ruler

Prompts (`pbs_vllm.evals.ruler`) are built once per (task, length) with the model's
tokenizer, each prompt plus its answer budget fitting in the length, and cached as jsonl
under OUT/prompts. Each setting (`pbs_vllm.evals.compare.SETTINGS`) runs in its own
child process (GPU memory returns when it exits; `--in-process` keeps one process) with
one vLLM engine (in that process, so the backend's stats are readable), reused over the
lengths (a density-matched setting, whose `max_kept_fraction` depends on the length, gets
one per length); the prompts of a length go to one `LLM.generate` call, greedy, keeping the
first generated token's top-20 logprobs. The backend's density (computed fraction of the
causally visible key blocks, mean over sparse layer-calls) is reset before and read after
each length.

Writes, after every length: OUT/outputs.jsonl (per sample: setting, key, output text,
first token id, its top-20 logprobs, score), OUT/results.json and OUT/ruler.md (mean
score over tasks and per task, density, first-token agreement and mean top-k KL against
`flash`). A failing setting is logged and recorded; the others still run. Without CUDA it
runs on vLLM's CPU platform (stock backend CPU_ATTN; PBS through the Triton interpreter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pbs_vllm.evals import compare, engine, ruler  # noqa: E402

TOP_LOGPROBS = 20
# The PBS backend's density log (pbs_vllm.backend.log names it under vLLM's logger): with a
# density sample at every layer-call it writes a line per step.
STATS_LOGGER = "vllm.pbs_vllm.backend.stats"
# Backend stats kept per (setting, length), besides the mean density.
_STAT_KEYS = (
    "density_samples",
    "sparse_prefill_tokens",
    "dense_prefill_tokens",
    "steps",
    "density_per_layer",
)
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[ruler {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- prompts


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes with the tokenizer, its chat template, the prompt generator and the Python
    version (the code haystack is the interpreter's standard library)."""
    probe = "The special magic number for amber-anchor is: 1234567.\nVAR QWERT = 12345."
    blob = json.dumps(
        [
            list(tokenizer.encode(probe)),
            getattr(tokenizer, "chat_template", None) or "",
            ruler.PROMPT_VERSION,
            list(sys.version_info[:2]),
        ]
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load_prompts(
    tokenizer, tasks: list[str], lengths: list[int], n: int, seed: int, cache_dir: Path
) -> dict[int, list[ruler.Sample]]:
    """length -> the samples of every task (task order), from the cache or generated."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fp = tokenizer_fingerprint(tokenizer)
    out: dict[int, list[ruler.Sample]] = {}
    for length in lengths:
        out[length] = []
        for task in tasks:
            path = cache_dir / f"{task}-{length}-s{seed}-{fp}.jsonl"
            samples = ruler.read_jsonl(path) if path.exists() else []
            if len(samples) >= n:
                samples = samples[:n]  # prompts are deterministic per index
                how = "cached"
            else:
                t0 = time.perf_counter()
                samples = ruler.make_prompts(task, tokenizer, length, n, seed, reserve_output=True)
                ruler.write_jsonl(path, samples)
                how = f"built in {time.perf_counter() - t0:.1f}s"
            toks = [s.num_tokens for s in samples]
            log(f"prompts {task} @ {length}: {n} {how}, {min(toks)}-{max(toks)} tokens")
            out[length] += samples
    return out


# ---------------------------------------------------------------------------- engines


def run_length(llm, setting: compare.Setting, length: int, samples: list[ruler.Sample]):
    """(per-sample records, backend stats snapshot) of one generate call."""
    from vllm import SamplingParams

    from pbs_vllm.backend.stats import STATS

    params = [
        SamplingParams(max_tokens=s.max_new_tokens, temperature=0.0, logprobs=TOP_LOGPROBS)
        for s in samples
    ]
    STATS.reset()
    outs = llm.generate(
        [{"prompt_token_ids": s.prompt_token_ids} for s in samples], params, use_tqdm=False
    )
    snap = STATS.snapshot()
    records = []
    for s, o in zip(samples, outs, strict=True):
        c = o.outputs[0]
        first = c.token_ids[0] if c.token_ids else None
        top = None
        if c.logprobs:
            ranked = sorted(c.logprobs[0].items(), key=lambda kv: -kv[1].logprob)
            top = {str(t): float(lp.logprob) for t, lp in ranked[:TOP_LOGPROBS]}
        records.append(
            {
                "setting": setting.name,
                "length": length,
                "task": s.task,
                "key": s.key,
                "score": ruler.score(s, c.text),
                "output": c.text,
                "first_token": first,
                "top_logprobs": top,
                "answers": s.answers,
                "prompt_tokens": s.num_tokens,
                "output_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            }
        )
    return records, snap


class Run:
    """Everything measured so far, written out after every length (OUT/state.json holds it
    whole, so `--resume` can go on from it in a later process)."""

    def __init__(
        self, out: Path, meta: dict, resume: bool = False, merge_from: Sequence[Path] = ()
    ) -> None:
        self.out = out
        self.meta = meta
        self.records: list[dict] = []
        self.densities: dict[tuple[str, int], float | None] = {}
        self.errors: dict[tuple[str, int], str] = {}
        self.extra: dict[tuple[str, int], dict] = {}
        out.mkdir(parents=True, exist_ok=True)
        (out / "outputs.jsonl").write_text("")
        if resume and (out / "state.json").is_file():
            self.merge(json.loads((out / "state.json").read_text()))
        for other in merge_from:  # runs of other settings on the same prompts
            if (other / "state.json").is_file():
                self.merge(json.loads((other / "state.json").read_text()))
            else:
                log(f"--merge-from {other}: no state.json there (that run failed early)")

    def done(self, name: str, lengths: list[int]) -> bool:
        """Whether every length of setting `name` already has results (or an error)."""
        have = {(r["setting"], int(r["length"])) for r in self.records} | set(self.errors)
        return all((name, n) in have for n in lengths)

    def add(self, records: list[dict]) -> None:
        self.records += records
        with open(self.out / "outputs.jsonl", "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def state(self) -> dict:
        """What a child process hands back (JSON-safe)."""
        pairs = lambda d: [[k[0], k[1], v] for k, v in d.items()]
        return {
            "records": self.records,
            "densities": pairs(self.densities),
            "errors": pairs(self.errors),
            "extra": pairs(self.extra),
        }

    def merge(self, state: dict) -> None:
        self.add(state["records"])
        for name in ("densities", "errors", "extra"):
            getattr(self, name).update({(s, n): v for s, n, v in state[name]})

    def results(self) -> list[dict]:
        order = self.meta["args"]["settings"]
        rows = compare.summarize(self.records, self.densities, self.errors, order=order)
        for r in rows:
            r.update(self.extra.get((r["setting"], r["length"]), {}))
        return rows

    def table(self) -> str:
        return compare.markdown_table(self.results())

    def write(self) -> str:
        (self.out / "state.json").write_text(json.dumps(self.state()))
        table = self.table()
        title = self.meta["title"]
        (self.out / "ruler.md").write_text(f"{title}\n\n{table}\n")
        doc = {**self.meta, "results": self.results()}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        return table


def run_child(name: str, run: Run, argv: list[str] | None) -> None:
    """One setting in a child process (this script with --child): its engine's memory goes
    back to the GPU when the child exits, which an in-process `del llm` does not ensure."""
    import subprocess
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    known = [[s, n, d] for (s, n), d in run.densities.items()]
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.json"
        cmd = [sys.executable, __file__, *argv, "--settings", name, "--child", str(state)]
        cmd += ["--known-densities", json.dumps(known)]
        proc = subprocess.run(cmd)
        if not state.is_file():
            for n in run.meta["args"]["lengths"]:
                run.errors.setdefault((name, n), f"child process exited {proc.returncode}")
            return
        run.merge(json.loads(state.read_text()))


def run_setting(
    setting: compare.Setting,
    lengths: list[int],
    prompts: dict[int, list[ruler.Sample]],
    run: Run,
    args: argparse.Namespace,
    on_gpu: bool,
) -> None:
    """Every length of one setting; failures are recorded per length, never raised."""
    from vllm import LLM

    groups: dict[str, list[int]] = {}
    for n in lengths:
        try:
            config = compare.setting_config(setting, n, run.densities)
        except compare.MissingDensityError as e:
            log(f"{setting.name} @ {n}: skipped: {e}")
            run.errors[(setting.name, n)] = str(e)
            continue
        groups.setdefault(json.dumps(config, sort_keys=True), []).append(n)
    for key, group in groups.items():
        config = json.loads(key)
        kwargs = engine.engine_kwargs(
            args.model,
            setting.backend,
            config,
            on_gpu=on_gpu,
            max_model_len=args.max_model_len,
            enforce_eager=args.enforce_eager,
            seed=args.seed,
            dtype=args.dtype,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=args.max_num_batched_tokens,
            yarn=args.yarn,
            tokenizer=args.tokenizer,
            max_logprobs=TOP_LOGPROBS,
            kv_cache_bytes=int(args.kv_cache_gib * 2**30) if args.kv_cache_gib else None,
        )
        t0 = time.perf_counter()
        log(f"{setting.name}: starting engine ({setting.backend}, pbs {config})")
        try:
            llm = LLM(**kwargs)
        except Exception as e:
            log(f"{setting.name}: engine failed to start:\n{traceback.format_exc()}")
            for n in group:
                run.errors[(setting.name, n)] = f"engine start: {type(e).__name__}: {e}"
            engine.release_memory(on_gpu)
            run.write()
            continue
        log(f"{setting.name}: engine up in {time.perf_counter() - t0:.1f}s")
        if not args.backend_log:
            # After vLLM's logging setup, which resets its child loggers' levels.
            logging.getLogger(STATS_LOGGER).setLevel(logging.WARNING)
        try:
            for n in group:
                t1 = time.perf_counter()
                try:
                    records, snap = run_length(llm, setting, n, prompts[n])
                except Exception as e:
                    log(f"{setting.name} @ {n}: failed:\n{traceback.format_exc()}")
                    run.errors[(setting.name, n)] = f"{type(e).__name__}: {e}"
                    run.write()
                    continue
                seconds = time.perf_counter() - t1
                run.add(records)
                pbs = setting.backend == "pbs"
                density = snap["mean_density"] if pbs else None
                if pbs:
                    run.densities[(setting.name, n)] = density
                run.extra[(setting.name, n)] = {"seconds": round(seconds, 2), "pbs_config": config}
                if pbs:
                    run.extra[(setting.name, n)].update({k: snap.get(k) for k in _STAT_KEYS})
                run.write()
                mean = sum(r["score"] for r in records) / max(1, len(records))
                dens = "-" if density is None else f"{density:.3f}"
                log(
                    f"{setting.name} @ {n}: {len(records)} prompts in {seconds:.1f}s, "
                    f"mean score {100 * mean:.1f}%, density {dens}"
                )
        finally:
            del llm
            engine.release_memory(on_gpu)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="local HF causal LM folder (with tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --model)")
    p.add_argument("--lengths", default="8k,16k,32k", help="comma-separated, e.g. 8k,16384")
    p.add_argument("--tasks", default="all", help=f"all or some of {','.join(ruler.TASKS)}")
    p.add_argument("--num-prompts", type=int, default=50, help="per task and length")
    p.add_argument(
        "--settings",
        default="flash,pbs-default,pbs-sparse,unpermuted-matched",
        help=f"all or some of {','.join(compare.SETTINGS)}",
    )
    p.add_argument("--yarn", type=float, default=None, help="YaRN rope scaling factor")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the longest length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/ruler"))
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="no CUDA graphs / compilation (default: on; accuracy does not need them)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="a fixed KV cache of this many GiB per engine instead of vLLM's memory profile "
        "(needed when several engines start side by side on one GPU)",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None, help="default: auto on CUDA, float32 on the CPU")
    p.add_argument(
        "--backend-log",
        action="store_true",
        help="keep the PBS backend's density log lines (one per engine step)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every engine in this process (default: one child process per setting, "
        "so each engine's GPU memory is returned when it ends)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in OUT (its state.json) and run only the settings "
        "that have none at some length; the tables then hold both, agreement included",
    )
    p.add_argument(
        "--merge-from",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also take the results of another run's OUT (its state.json; same prompts: "
        "same tokenizer, lengths, --num-prompts and --seed), e.g. settings run in parallel "
        "processes; settings that have results there are not run again",
    )
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--known-densities", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.lengths = ruler.parse_lengths(args.lengths)
        args.tasks = ruler.parse_tasks(args.tasks)
        if args.child is None:
            args.settings = compare.parse_settings(args.settings)
        else:  # a child runs exactly the setting it is given (dependencies ran before)
            args.settings = [args.settings]
            if args.settings[0] not in compare.SETTINGS:
                raise ValueError(f"unknown setting {args.settings[0]!r}")
    except ValueError as e:
        p.error(str(e))
    if args.num_prompts < 1:
        p.error("--num-prompts must be at least 1")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there (a local HF model folder)")
    need = max(args.lengths)
    if args.max_model_len is None:
        args.max_model_len = need
    elif args.max_model_len < need:
        p.error(f"--max-model-len {args.max_model_len} is below the longest length {need}")
    return args


def _jsonable(value):
    """An argument value as JSON takes it: paths (also in lists, e.g. --merge-from) as text."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    on_gpu = engine.setup_environment()  # before vLLM is imported
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    tokenizer.model_max_length = max(args.max_model_len, 1 << 30)  # no over-length warnings
    prompts = None  # generated on first need: a merge of finished runs needs none

    def get_prompts():
        nonlocal prompts
        if prompts is None:
            prompts = load_prompts(
                tokenizer,
                args.tasks,
                args.lengths,
                args.num_prompts,
                args.seed,
                args.out / "prompts",
            )
        return prompts

    if on_gpu:
        import torch

        device = torch.cuda.get_device_name()
    else:
        device = "cpu"
    title = (
        f"RULER-style accuracy of {Path(args.model).name} ({args.num_prompts} prompts per task "
        f"and length, {device}): scores in %, density = mean computed fraction of the "
        f"causally visible key blocks, agreement / top-{TOP_LOGPROBS} KL (nats) of the first token vs "
        f"{compare.REFERENCE}"
    )
    meta = {
        "title": title,
        "device": device,
        "args": {k: _jsonable(v) for k, v in vars(args).items()},
        "settings": {
            n: {
                "backend": compare.SETTINGS[n].backend,
                "pbs": dict(compare.SETTINGS[n].pbs),
                "match_density_of": compare.SETTINGS[n].match_density_of,
            }
            for n in args.settings
        },
    }
    if args.child:
        run = Run(args.out / "child" / args.settings[0], meta)
    else:
        run = Run(args.out, meta, resume=args.resume, merge_from=args.merge_from)
    for name, n, d in json.loads(args.known_densities):
        run.densities[(name, n)] = d
    for name in args.settings:
        setting = compare.SETTINGS[name]
        if args.child is None and (args.resume or args.merge_from) and run.done(name, args.lengths):
            log(f"{name}: results already there (--resume / --merge-from), not run again")
            continue
        t0 = time.perf_counter()
        try:
            if args.child is None and not args.in_process:
                run_child(name, run, argv)
            else:
                run_setting(setting, args.lengths, get_prompts(), run, args, on_gpu)
        except Exception as e:  # anything run_setting did not catch itself
            log(f"{name}: failed:\n{traceback.format_exc()}")
            for n in args.lengths:
                run.errors.setdefault((name, n), f"{type(e).__name__}: {e}")
        if args.child is not None:
            args.child.write_text(json.dumps(run.state()))
            return []
        run.write()
        log(f"{name}: done in {time.perf_counter() - t0:.1f}s")
    table = run.write()
    print(f"\n{title}\n\n{table}", flush=True)
    log(f"wrote {args.out}/ruler.md, results.json, outputs.jsonl")
    return run.results()


if __name__ == "__main__":
    main()

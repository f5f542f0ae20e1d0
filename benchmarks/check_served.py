"""Serve a model with FLASH_ATTN and then with PBS (full mask) and compare greedy output.

Runs `vllm serve` as a real OpenAI-compatible server (any extra vLLM flags, e.g.
`--tensor-parallel-size 2 --distributed-executor-backend ray`), asks each for a greedy
completion of the same prompts, and reports whether the tokens are identical and how far
the top logprobs differ. Exit code 0 only if every completion matches.

    python benchmarks/check_served.py --model /tmp/llama-dummy -- \
        --load-format dummy --tensor-parallel-size 2 --distributed-executor-backend ray

`--retrieval-prompts N` replaces the text prompts by N held-out 2K-token prompts of the
retrieval task (token ids): with `--model pbs_vllm/models/retrieval-llama`, a model with
real weights, so greedy tokens are decided by clear margins, not by dummy-weight ties, and
the PBS estimation runs on a permuted region (block 16, segment 32, every block kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `training` folder

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "In a distant galaxy, the engineers of the starship decided to",
    "Permuted block-sparse attention speeds up long prefill by",
]
FULL_MASK = {
    "pbs": {
        "tau": 1.0,
        "dense_fallback_len": 0,
        "dense_above": None,  # every block kept, and still the PBS kernels
        "block_size": 16,
        "segment_size": 32,
    }
}


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def serve_and_complete(
    model: str,
    backend: str,
    extra: list[str],
    port: int,
    tokens: int,
    startup_s: int,
    prompts: list,
) -> list[dict]:
    cmd = [
        "vllm",
        "serve",
        model,
        "--port",
        str(port),
        "--attention-backend",
        backend,
        "--max-model-len",
        "4096",
        *extra,
    ]
    if backend == "pbs":
        cmd += ["--additional-config", json.dumps(FULL_MASK)]
    with open(f"/tmp/serve-{backend}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            return _wait_and_complete(proc, model, backend, port, tokens, startup_s, prompts)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_and_complete(
    proc, model: str, backend: str, port: int, tokens: int, startup_s: int, prompts: list
) -> list[dict]:
    deadline = time.time() + startup_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{backend} server exited with {proc.returncode}; see /tmp/serve-{backend}.log"
            )
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline:
                raise TimeoutError(f"{backend} server not healthy in {startup_s}s") from None
            time.sleep(2)
    out = []
    for p in prompts:
        r = _post(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": model, "prompt": p, "max_tokens": tokens, "temperature": 0, "logprobs": 1},
        )
        ch = r["choices"][0]
        out.append(
            {
                "text": ch["text"],
                "tokens": ch["logprobs"]["tokens"],
                "logprobs": ch["logprobs"]["token_logprobs"],
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--startup-s", type=int, default=420)
    ap.add_argument("--retrieval-prompts", type=int, default=0, help="use N 2K retrieval prompts")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="flags passed to vllm serve")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    prompts = PROMPTS
    if args.retrieval_prompts:
        from training.retrieval_data import eval_prompts

        prompts = eval_prompts(args.retrieval_prompts, 2048, 16, seed=7)[0]
    ref, pbs = (
        serve_and_complete(
            args.model, backend, extra, args.port, args.tokens, args.startup_s, prompts
        )
        for backend in ("FLASH_ATTN", "pbs")
    )
    ok = True
    for p, a, b in zip(prompts, ref, pbs):
        same = a["tokens"] == b["tokens"]
        ok &= same
        diffs = [
            abs(x - y)
            for x, y in zip(a["logprobs"], b["logprobs"])
            if x is not None and y is not None
        ]
        first = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        print(
            json.dumps(
                {
                    "prompt": p[:40] if isinstance(p, str) else f"{len(p)} token ids",
                    "identical": same,
                    "first_diff": first,
                    "max_logprob_diff": max(diffs) if diffs else None,
                    "flash": a["text"][:60],
                    "pbs": b["text"][:60],
                }
            )
        )
    print("IDENTICAL" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

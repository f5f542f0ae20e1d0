"""The `pbs-vllm` command line, run as a subprocess like a user would."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import zlib

import pytest
import torch

from pbs_vllm.fidelity.report import METHODS

SMALL = ["--seq-len", "256", "--block-size", "16", "--segment-size", "64"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pbs_vllm.cli args` with env (default: this process's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "pbs_vllm.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def table_rows(stdout: str) -> dict[tuple[str, str], list[float]]:
    """(tau, method) -> [pair_fraction, recall, rel_error] from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1] in METHODS:
            rows[parts[0], parts[1]] = [float(x) for x in parts[2:]]
    return rows


def test_inspect_synthetic_writes_table_and_png(tmp_path, request):
    png = tmp_path / "mask.png"
    seed = str(zlib.crc32(request.node.nodeid.encode()))
    res = run_cli(
        "inspect",
        "--synthetic",
        *SMALL,
        "--seed",
        seed,
        "--tau",
        "0.8",
        "--head",
        "1",
        "--png",
        str(png),
    )
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert {m for _, m in rows} == set(METHODS) and {t for t, _ in rows} == {"0.80"}
    assert res.stdout.split()[:5] == ["tau", "method", "pair_fraction", "recall", "rel_error"]
    pbs, oracle = rows["0.80", "pbs"], rows["0.80", "oracle"]
    assert 0.0 < pbs[0] < 1.0 and 0.0 < pbs[1] <= 1.0 and pbs[2] > 0.0
    assert oracle[0] == pbs[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_saved_tensors(tmp_path, request):
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    path = tmp_path / "qkv.pt"
    n, d = 192, 32
    torch.save(
        {
            "q": torch.randn(n, 2, d, generator=gen) * 2,
            "k": torch.randn(n, 1, d, generator=gen),
            "v": torch.randn(n, 1, d, generator=gen),
        },
        path,
    )
    res = run_cli("inspect", "--qkv", str(path), "--block-size", "16", "--segment-size", "32")
    assert res.returncode == 0, res.stderr
    assert len(table_rows(res.stdout)) == len(METHODS)

    torch.save({"q": torch.randn(n, 2, d, generator=gen)}, path)
    res = run_cli("inspect", "--qkv", str(path))
    assert res.returncode != 0 and "missing ['k', 'v']" in res.stderr


def test_fidelity_table_and_csv(tmp_path):
    out = tmp_path / "fid.csv"
    res = run_cli("fidelity", "--synthetic", *SMALL, "--taus", "0.8", "0.95", "--csv", str(out))
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert len(rows) == 2 * len(METHODS)
    assert rows["0.80", "pbs"][0] < rows["0.95", "pbs"][0]
    header = ["tau", "method", "pair_fraction", "recall", "rel_error"]
    assert header in [line.split() for line in res.stdout.splitlines()]
    with open(out) as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == header
    assert [(f"{float(r['tau']):.2f}", r["method"]) for r in back] == list(rows)
    assert "tau" in res.stderr  # the tqdm progress bar


def test_bad_parameters_fail_with_a_message():
    res = run_cli("inspect", "--synthetic", *SMALL, "--tau", "1.5")
    assert res.returncode == 2 and "tau=1.5: must be in (0, 1]" in res.stderr
    res = run_cli("fidelity", "--synthetic", *SMALL, "--bogus")
    assert res.returncode == 2 and "unrecognized arguments for fidelity: --bogus" in res.stderr


@pytest.mark.parametrize("preset_dir", [False, True])
def test_serve_tiny_dry_run(tmp_path, preset_dir):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if preset_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    res = run_cli("serve-tiny", "--dry-run", "--port", "8123", "--max-num-seqs", "2", env=env)
    assert res.returncode == 0, res.stderr
    words = shlex.split(res.stdout.replace('"$(mktemp -d)"', "FRESH"))
    assignments = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    cmd = [w for w in words if w not in {f"{k}={v}" for k, v in assignments.items()}]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    opt = lambda name: cmd[cmd.index(name) + 1]
    assert opt("--model").endswith("tiny-llama") and os.path.isdir(opt("--model"))
    assert opt("--attention-backend") == "pbs"
    assert opt("--served-model-name") == "tiny-llama"
    assert opt("--port") == "8123" and opt("--max-model-len") == "2048"
    assert json.loads(opt("--additional-config")) == {
        "pbs": {"block_size": 16, "segment_size": 32, "tau": 0.9, "dense_fallback_len": 64}
    }
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--max-num-seqs", "2"]
    # the multiprocess dir: the user's is kept, otherwise a fresh one per run
    assert ("PROMETHEUS_MULTIPROC_DIR" in assignments) != preset_dir
    if not preset_dir:
        assert assignments["PROMETHEUS_MULTIPROC_DIR"] == "FRESH"
    on_cpu = not torch.cuda.is_available()
    assert ("PBS_VLLM_CPU_PLATFORM" in assignments) == on_cpu
    assert (assignments.get("TRITON_INTERPRET") == "1") == on_cpu
    assert (opt("--dtype") == "float32") if on_cpu else "--dtype" not in cmd


def test_bench_forwards_args_to_the_kernel_benchmark():
    res = run_cli("bench", "--help")
    assert res.returncode == 0, res.stderr
    assert "--sizes" in res.stdout and "--fractions" in res.stdout


def test_serve_demo_dry_run_names_the_cached_model_without_fetching(tmp_path):
    env = {**os.environ, "PBS_VLLM_MODEL_CACHE": str(tmp_path)}
    res = run_cli("serve-demo", "--dry-run", "--port", "8124", "--max-num-seqs", "2", env=env)
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout.replace('"$(mktemp -d)"', "FRESH"))
    opt = lambda name: cmd[cmd.index(name) + 1]
    assert opt("--model") == str(tmp_path / "smollm2-135m-instruct" / "hf-bfloat16")
    assert not any(tmp_path.iterdir())  # nothing fetched
    assert opt("--served-model-name") == "smollm2-135m-instruct"
    assert opt("--attention-backend") == "pbs" and opt("--port") == "8124"
    assert json.loads(opt("--additional-config"))["pbs"]["dense_fallback_len"] == 2048
    assert cmd[-2:] == ["--max-num-seqs", "2"]


def test_routing_prints_the_cost_models_break_even_per_chunk(capsys):
    from pbs_vllm.cli import main

    args = ["routing", "--q-heads", "14", "--kv-heads", "2", "--head-dim", "64"]
    assert main([*args, "--lengths", "8k,30k"]) == 0
    rows = {
        line.split("|")[2].strip(): line.split("|")[-2].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(("| 8k", "| 30k"))
    }
    assert rows["8192 over 0"] == "no density wins: stock"  # host-bound at 8K
    assert 0 < float(rows["16384 over 0"]) < float(rows["14336 over 16384"]) < 1
    with pytest.raises(SystemExit) as e:
        main([*args, "--gpu", "A100"])
    assert e.value.code == 2
    assert "no rates for it (known: H200, H100)" in capsys.readouterr().err

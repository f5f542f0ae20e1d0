"""Which vLLM names the plugin touches, and whether a vLLM release still has them.

The plugin (backend/, pbs_vllm/) imports vLLM names, subclasses vLLM classes, overrides
their methods, calls vLLM functions and reads fields of vLLM objects. A vLLM release that
renamed or re-signed one of them breaks the plugin at import time or, worse, mid-request.
This tool finds those names statically and checks them against vLLM sources, without
importing vLLM (CUDA wheels that cannot run here are checked from their `.py` files).

    python tools/vllm_api.py manifest --version 0.33.0 [--version ...]   # download + record
    python tools/vllm_api.py manifest --src SITE_PACKAGES --out FILE.json  # unpacked vllm/
    python tools/vllm_api.py check [-v]                                    # table, exit 1 if bad

`used_names(repo)` finds, by `ast`:
* every `from vllm... import X` / `import vllm...` (also inside functions);
* every plugin class with a vLLM base: the methods it defines (overrides: compared with
  the base's signature), the class attributes it sets (must be ones the base declares),
  `super().m(...)` calls;
* calls of imported vLLM functions (`split_decodes_and_prefills(c, decode_threshold=1)`),
  attribute chains on imported names (`AttentionBackendEnum.CUSTOM.get_path()`), and
  attribute reads / method calls on variables annotated with a vLLM class (`common:
  CommonAttentionMetadata` -> `common.num_reqs`); `getattr(x, "a", default)` and
  `hasattr(x, "a")` make the use optional (the plugin has a fallback);
* the `STOCK_MEMBERS` tuple of backend/compat.py (forwarded only where the stock backend
  has them, so optional).
`EXPLICIT` below lists what the analysis cannot see (values of unannotated variables,
attributes of call results, the stock backend behind `stock_backend()`, what vLLM passes
to our overrides), each with the plugin line it stands for.

`api_manifest(src, api)` parses the needed modules of an unpacked `vllm/` package and
records, per used name, whether it exists and what it is (class, function with its
parameters, field, module, ...), the abstract members and dataclass fields of the classes
involved, and the call sites in vLLM that call our overrides. Names are keyed like
`vllm.v1.attention.backend:AttentionImpl.forward`; `stock:CPU_ATTN.impl` is the impl class
of the backend that `AttentionBackendEnum.CPU_ATTN` names in that release.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MANIFEST_DIR = REPO / "tests" / "data" / "vllm_api"
SCAN_DIRS = ("backend", "pbs_vllm")
# kernels/ imports no vLLM; evals/ holds benchmark and test helpers that drive vLLM's
# public offline API (LLM, SamplingParams), not the plugin's integration with vLLM.
SKIP_PARTS = {"kernels", "tests", "evals", "__pycache__"}
STOCK_NAMES = ("FLASH_ATTN", "CPU_ATTN")  # stock.stock_backend(): CUDA, CPU
REGISTRY = "vllm.v1.attention.backends.registry:AttentionBackendEnum"
ATTN = "vllm.v1.attention.backend"
LAYER = "vllm.model_executor.layers.attention:Attention"

# Imported names whose *instances* the plugin handles: member uses go to this class.
INSTANCE_OF = {
    # `vllm.platforms.current_platform` is the resolved Platform subclass (lazy module
    # __getattr__); `is_cpu()` etc. are Platform's interface.
    "vllm.platforms:current_platform": "vllm.platforms.interface:Platform",
    # AttentionLayer is a Protocol; the object vLLM passes to forward is the Attention layer.
    f"{ATTN}:AttentionLayer": LAYER,
}
# Plugin methods that vLLM base classes may lack: what happens then.
OPTIONAL_OVERRIDES = {
    "get_impl_variants": "AttentionImpl hook since vLLM 0.30 (builders find wrapped impls "
    "through it); before that nothing calls it (compat.py)",
    "do_kv_cache_update": "not an AttentionImpl member in every release; vLLM calls it on "
    "the impl (forward_includes_kv_cache_update = False); checked against vLLM's call "
    "sites and the stock impls",
}


@dataclass(frozen=True)
class Use:
    """One vLLM name the plugin touches.

    target: `module:Name` (or `stock:CPU_ATTN[.impl|.builder]`); member: attribute of it.
    kind: import | module | attr | assigned (set on instances) | call | override | value |
    returns (sig: the return annotation the plugin unpacks) |
    mirror (our params repeat theirs in order) | callsite (vLLM calls `member` in target's
    module; sig: the plugin function's params) | members (record the member names; sig:
    the base class below which they count) | sets_attr (target's code sets `.member`).
    sig: override/mirror/callsite: (decorator, *params); call: (npos[*], *keywords[, **]).
    optional: the plugin's fallback when the name is absent ('' = required).
    """

    target: str
    member: str = ""
    kind: str = "import"
    sig: tuple = ()
    optional: str = ""
    where: str = ""

    @property
    def key(self) -> str:
        if self.kind == "callsite":
            return f"{self.target}@{self.member}"
        return f"{self.target}.{self.member}" if self.member else self.target


@dataclass
class PluginAPI:
    uses: list[Use] = field(default_factory=list)
    # plugin class -> (vLLM base target, names it defines in its body)
    subclasses: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    stock_members: tuple[str, ...] = ()


def _stock_uses() -> list[Use]:
    """Uses of the stock backends (stock.stock_backend() on CUDA / CPU)."""
    out = []
    for s in STOCK_NAMES:
        b, impl, bld = f"stock:{s}", f"stock:{s}.impl", f"stock:{s}.builder"
        out += [
            Use(REGISTRY, s, "attr", where="backend/stock.py stock_backend"),
            Use(b, "", "import", where="backend/stock.py stock_backend"),
            Use(b, "supported_dtypes", "attr", where="backend/pbs_attn.py"),
            Use(b, "supported_kv_cache_dtypes", "attr", where="backend/pbs_attn.py"),
            Use(b, "get_name", "call", ("0",), where="backend/impl.py unsupported_reason"),
            Use(b, "get_impl_cls", "call", ("0",), where="backend/impl.py PBSAttentionImpl"),
            Use(b, "get_builder_cls", "call", ("0",), where="backend/metadata.py __init__"),
            Use(b, "", "members", (f"{ATTN}:AttentionBackend",), where="backend/compat.py"),
            Use(bld, "__init__", "call", ("4",), where="backend/metadata.py __init__"),
            Use(
                bld,
                "get_cudagraph_support",
                "call",
                ("2",),
                where="backend/metadata.py get_cudagraph_support",
            ),
            Use(bld, "build", "call", ("3",), where="backend/metadata.py build"),
            Use(
                bld,
                "build_for_cudagraph_capture",
                "call",
                ("1",),
                where="backend/metadata.py build_for_cudagraph_capture",
            ),
            Use(bld, "reorder_batch_threshold", "attr", where="backend/metadata.py __init__"),
            Use(
                bld,
                "",
                "members",
                (f"{ATTN}:AttentionMetadataBuilder",),
                where="backend/metadata.py",
            ),
            Use(impl, "forward", "call", ("9",), where="backend/impl.py forward (no PBS metadata)"),
            Use(impl, "forward", "call", ("7",), where="backend/impl.py forward"),
            Use(
                impl,
                "do_kv_cache_update",
                "call",
                ("5",),
                where="backend/impl.py do_kv_cache_update",
            ),
            Use(
                impl,
                "process_weights_after_loading",
                "call",
                ("1",),
                where="backend/impl.py process_weights_after_loading",
            ),
            Use(impl, "", "members", (f"{ATTN}:AttentionImpl",), where="backend/impl.py"),
        ]
        for attr in (
            "num_heads",
            "head_size",
            "scale",
            "num_kv_heads",
            "kv_cache_dtype",
            "attn_type",
            "kv_sharing_target_layer_name",
        ):
            out.append(Use(impl, attr, "assigned", where="backend/impl.py __init__ (copied)"))
    # impl._plan_prefills reads `layer.isa`, which the CPU builder sets on every layer.
    out.append(
        Use(
            "stock:CPU_ATTN.builder",
            "isa",
            "sets_attr",
            where="backend/impl.py _plan_prefills: layer.isa",
        )
    )
    return out


# What static analysis cannot infer, with the plugin line each entry stands for.
EXPLICIT: list[Use] = [
    # metadata.py build: `common.unpadded(...).replace(max_query_len=1)` (call result)
    Use(f"{ATTN}:CommonAttentionMetadata", "replace", "call", ("0", "max_query_len"),
        where="backend/metadata.py build: .unpadded(...).replace(...)"),
    Use(f"{ATTN}:CommonAttentionMetadata", "max_query_len", "attr",
        where="backend/metadata.py build: .unpadded(...).replace(...)"),
    Use(f"{ATTN}:CommonAttentionMetadata", "", "import", where="fields list"),
    # split_decodes_and_prefills' result is unpacked into 4 names
    Use("vllm.v1.attention.backends.utils:split_decodes_and_prefills", "", "returns",
        ("tuple[int, int, int, int]",), where="backend/metadata.py build"),
    # group_uses_pbs: `layers[...].impl`; impl.forward: getattr(layer, "layer_name", None)
    Use(LAYER, "impl", "assigned", where="backend/metadata.py group_uses_pbs"),
    # vLLM's calls into our impl: positional args bind to impl_args / our methods
    Use(LAYER, "impl_cls", "callsite", where="backend/impl.py impl_args"),
    Use(LAYER, "impl.forward", "callsite", where="backend/impl.py forward"),
    Use(LAYER, "impl.do_kv_cache_update", "callsite", where="backend/impl.py do_kv_cache_update"),
    # impl_args repeats AttentionImpl.__init__'s positional parameters, in order
    Use(f"{ATTN}:AttentionImpl", "__init__", "mirror", where="backend/impl.py impl_args"),
    # impl.unsupported_reason: cfg = get_current_vllm_config(); builder's vllm_config
    Use("vllm.config:VllmConfig", "model_config", "attr", where="backend/impl.py unsupported_reason"),
    Use("vllm.config:VllmConfig", "cache_config", "attr", where="backend/impl.py unsupported_reason"),
    Use("vllm.config:VllmConfig", "additional_config", "attr", where="pbs_vllm/config.py get_pbs_config"),
    Use("vllm.config:ModelConfig", "dtype", "attr", where="backend/impl.py unsupported_reason"),
    Use("vllm.config:CacheConfig", "block_size", "attr", where="backend/impl.py unsupported_reason"),
    # cpu_platform.get_attn_backend_cls: attn_selector_config.use_mla
    Use("vllm.v1.attention.selector:AttentionSelectorConfig", "use_mla", "attr",
        where="backend/cpu_platform.py get_attn_backend_cls"),
    # log.get_logger returns init_logger(...): logger.warning_once(msg)
    Use("vllm.logger:_VllmLogger", "warning_once", "call", ("1",), where="backend/log.py get_logger; impl.py, compat.py"),
    # metrics._is_reporting_rank: ps.get_tp_group().rank_in_group, ...is_first_rank
    Use("vllm.distributed.parallel_state:GroupCoordinator", "rank_in_group", "attr",
        where="pbs_vllm/metrics.py _is_reporting_rank"),
    Use("vllm.distributed.parallel_state:GroupCoordinator", "is_first_rank", "attr",
        where="pbs_vllm/metrics.py _is_reporting_rank"),
    # pyproject.toml's entry-point groups are the ones vLLM loads plugins from
    Use("vllm.plugins:DEFAULT_PLUGINS_GROUP", "", "value", ("vllm.general_plugins",),
        where="pyproject.toml entry points"),
    Use("vllm.plugins:PLATFORM_PLUGINS_GROUP", "", "value", ("vllm.platform_plugins",),
        where="pyproject.toml entry points"),
    # cli.serve-tiny runs `python -m vllm.entrypoints.openai.api_server`
    Use("vllm.entrypoints.openai.api_server", "", "module", where="pbs_vllm/cli.py serve-tiny"),
    # AttentionBackend layer base lists (abstract members, for coverage of our overrides)
    Use(f"{ATTN}:AttentionBackend", "", "members", where="backend/pbs_attn.py"),
    Use(f"{ATTN}:AttentionImpl", "", "members", where="backend/impl.py"),
    Use(f"{ATTN}:AttentionMetadataBuilder", "", "members", where="backend/metadata.py"),
] + _stock_uses()  # fmt: skip


# --------------------------------------------------------------------------- plugin side


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameters as strings: 'a', 'b=' (has a default), '*args', '*', 'k=', '**kw'."""
    a = fn.args
    pos = a.posonlyargs + a.args
    first_default = len(pos) - len(a.defaults)
    out = [p.arg + ("=" if i >= first_default else "") for i, p in enumerate(pos)]
    if a.vararg:
        out.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        out.append("*")
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append(p.arg + ("=" if d is not None else ""))
    if a.kwarg:
        out.append("**" + a.kwarg.arg)
    return out


def _decorator(fn) -> str:
    names = {_dotted(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list}
    names = {n.rsplit(".", 1)[-1] for n in names if n}
    for kind in ("staticmethod", "classmethod"):
        if kind in names:
            return kind
    if names & {"property", "cached_property"}:
        return "property"
    return "method"


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _call_sig(call: ast.Call) -> tuple:
    npos = sum(not isinstance(a, ast.Starred) for a in call.args)
    star = "*" if any(isinstance(a, ast.Starred) for a in call.args) else ""
    kws = [k.arg for k in call.keywords if k.arg]
    dstar = ["**"] if any(k.arg is None for k in call.keywords) else []
    return (f"{npos}{star}", *kws, *dstar)


def _is_sunder(name: str) -> bool:
    return name.startswith("_") and name.endswith("_")


def _strip_subscript(node):
    return node.value if isinstance(node, ast.Subscript) else node


class _Scan:
    """Uses of one plugin file."""

    def __init__(self, rel: str, tree: ast.Module, api: PluginAPI):
        self.rel, self.tree, self.api = rel, tree, api
        self.names: dict[str, str] = {}  # local name -> vLLM target
        self.seen: set = set()

    def add(self, use: Use) -> None:
        ident = (use.key, use.kind, use.sig, use.optional)
        if ident not in self.seen:
            self.seen.add(ident)
            self.api.uses.append(use)

    def at(self, node) -> str:
        return f"{self.rel}:{node.lineno}"

    def run(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] == "vllm":
                    for a in node.names:
                        target = f"{node.module}:{a.name}"
                        self.names[a.asname or a.name] = target
                        self.add(Use(target, where=self.at(node)))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "vllm":
                        self.add(Use(a.name, kind="module", where=self.at(node)))
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ClassDef):
                self.scan_class(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.scan_function(node, self.typed_vars(node))
        self.scan_function(self.tree, {})

    def base_of(self, cls: ast.ClassDef) -> str | None:
        for b in cls.bases:
            name = _dotted(_strip_subscript(b))
            if name in self.names:
                return self.names[name]
        return None

    def scan_class(self, cls: ast.ClassDef) -> None:
        base = self.base_of(cls)
        if base is None:
            return
        defined = []
        for stmt in cls.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                defined.append(stmt.name)
                if stmt.name.startswith("_") and stmt.name != "__init__":
                    continue  # private helpers, __new__ (object's otherwise)
                sig = (_decorator(stmt), *_params(stmt))
                opt = OPTIONAL_OVERRIDES.get(stmt.name, "")
                self.add(Use(base, stmt.name, "override", sig, opt, self.at(stmt)))
            elif isinstance(stmt, ast.Assign | ast.AnnAssign):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        defined.append(t.id)
                        self.add(Use(base, t.id, "attr", where=self.at(stmt)))
        self.api.subclasses[cls.name] = (base, defined)
        # super().m(...) inside the class
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Call)
                and _dotted(node.func.value.func) == "super"
                and node.func.attr != "__new__"
            ):
                self.add(Use(base, node.func.attr, "call", _call_sig(node), where=self.at(node)))

    def typed_vars(self, fn) -> dict[str, str]:
        """Variables of `fn` bound to instances of vLLM classes (annotations, aliases)."""
        typed = {}
        a = fn.args
        for p in a.posonlyargs + a.args + a.kwonlyargs:
            for n in ast.walk(p.annotation) if p.annotation else ():
                if isinstance(n, ast.Name) and n.id in self.names:
                    typed[p.arg] = self.names[n.id]
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                v = node.value
                if isinstance(v, ast.Name) and v.id in typed:
                    typed[node.targets[0].id] = typed[v.id]
                elif (
                    isinstance(v, ast.Attribute)
                    and isinstance(v.value, ast.Name)
                    and v.value.id in self.names
                    and v.attr.isupper()
                ):
                    typed[node.targets[0].id] = self.names[v.value.id]  # enum member
        return typed

    def member_use(self, target: str, member: str, node, parent_call, opt: str = "") -> None:
        target = INSTANCE_OF.get(target, target)
        if parent_call is not None:
            self.add(Use(target, member, "call", _call_sig(parent_call), opt, self.at(node)))
        else:
            self.add(Use(target, member, "attr", optional=opt, where=self.at(node)))

    def scan_function(self, fn, typed: dict[str, str]) -> None:
        calls = {}
        body = fn.body if isinstance(fn, ast.Module) else [fn]
        nodes = []
        for stmt in body:
            if isinstance(fn, ast.Module) and isinstance(
                stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            ):
                continue  # scanned as functions
            nodes.extend(ast.walk(stmt))
        for n in nodes:
            if isinstance(n, ast.Call):
                calls[id(n.func)] = n
        for n in nodes:
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name):
                if n.func.id in self.names:
                    self.add(Use(self.names[n.func.id], "", "call", _call_sig(n), where=self.at(n)))
                elif n.func.id in ("getattr", "hasattr") and len(n.args) >= 2:
                    obj, attr = n.args[0], n.args[1]
                    if not (isinstance(attr, ast.Constant) and isinstance(attr.value, str)):
                        continue
                    t = None
                    if isinstance(obj, ast.Name):
                        t = typed.get(obj.id) or self.names.get(obj.id)
                    if t and (n.func.id == "hasattr" or len(n.args) == 3):
                        opt = f"{n.func.id}() fallback at {self.at(n)}"
                        self.member_use(t, attr.value, n, None, opt)
                    elif t:
                        self.member_use(t, attr.value, n, None)
            if not isinstance(n, ast.Attribute) or _is_sunder(n.attr):
                continue
            v = n.value
            call = calls.get(id(n))
            if isinstance(v, ast.Name) and v.id in self.names:
                self.member_use(self.names[v.id], n.attr, n, call)
            elif isinstance(v, ast.Name) and v.id in typed:
                self.member_use(typed[v.id], n.attr, n, call)
            elif (
                isinstance(v, ast.Attribute)
                and isinstance(v.value, ast.Name)
                and v.value.id in self.names
                and v.attr.isupper()
            ):
                self.member_use(self.names[v.value.id], n.attr, n, call)  # Enum.MEMBER.m()


def _stock_members_tuple(repo: Path) -> tuple[str, ...]:
    tree = ast.parse((repo / "backend" / "compat.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "STOCK_MEMBERS" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    raise ValueError("backend/compat.py has no STOCK_MEMBERS tuple")


def _plugin_function(repo: Path, rel: str, qual: str) -> list[str]:
    """Params of a plugin function `qual` ('f' or 'Class.m') in file `rel`."""
    tree = ast.parse((repo / rel).read_text())
    *cls, name = qual.split(".")
    scope = tree.body
    if cls:
        scope = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls[0])
    fn = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    return [_decorator(fn) if cls else "function", *_params(fn)]


def used_names(repo_root: Path | str = REPO) -> PluginAPI:
    """Every vLLM name that backend/ and pbs_vllm/ touch (see the module docstring)."""
    repo = Path(repo_root)
    api = PluginAPI()
    for d in SCAN_DIRS:
        for path in sorted((repo / d).rglob("*.py")):
            rel = path.relative_to(repo)
            if SKIP_PARTS & set(rel.parts):
                continue
            _Scan(rel.as_posix(), ast.parse(path.read_text(), str(rel)), api).run()
    api.stock_members = _stock_members_tuple(repo)
    for s in STOCK_NAMES:
        for m in api.stock_members:
            opt = "compat.stock_members forwards only the members the stock backend has"
            api.uses.append(Use(f"stock:{s}", m, "attr", optional=opt, where="backend/compat.py"))
    impl_args = _plugin_function(repo, "backend/impl.py", "impl_args")
    fwd = _plugin_function(repo, "backend/impl.py", "PBSAttentionImpl.forward")
    kvu = _plugin_function(repo, "backend/impl.py", "PBSAttentionImpl.do_kv_cache_update")
    with_sig = {"impl_cls": impl_args, "impl.forward": fwd, "impl.do_kv_cache_update": kvu}
    for u in EXPLICIT:
        if u.kind == "callsite":
            u = Use(u.target, u.member, u.kind, tuple(with_sig[u.member]), u.optional, u.where)
        elif u.kind == "mirror":
            u = Use(u.target, u.member, u.kind, tuple(impl_args), u.optional, u.where)
        api.uses.append(u)
    # our impl forwards these to the stock impl, which must take what vLLM passes us
    for s in STOCK_NAMES:
        for name, sig in (("forward", fwd), ("do_kv_cache_update", kvu)):
            api.uses.append(
                Use(f"stock:{s}.impl", name, "override", tuple(sig), where="backend/impl.py")
            )
        api.uses.append(
            Use(f"stock:{s}.impl", "__init__", "mirror", tuple(impl_args), where="impl_args")
        )
    unique = {}
    for u in api.uses:
        unique.setdefault((u.key, u.kind, u.sig, u.optional), u)
    api.uses = list(unique.values())
    return api


# --------------------------------------------------------------------------- vLLM side


class _Missing(Exception):
    pass


class Source:
    """Lookups in an unpacked `vllm/` package (root holds `vllm/`), by ast only."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    def file(self, mod: str) -> Path | None:
        base = self.root.joinpath(*mod.split("."))
        for p in (base.with_suffix(".py"), base / "__init__.py"):
            if p.is_file():
                return p
        return None

    def tree(self, mod: str) -> ast.Module:
        if mod not in self._trees:
            f = self.file(mod)
            self._trees[mod] = ast.parse(f.read_text(), str(f)) if f else None
        if self._trees[mod] is None:
            raise _Missing(f"no module {mod}")
        return self._trees[mod]

    @staticmethod
    def _top(tree: ast.Module):
        """Module-level statements, descending into if/try blocks but not TYPE_CHECKING."""
        stack = list(tree.body)
        while stack:
            s = stack.pop(0)
            if isinstance(s, ast.If):
                if "TYPE_CHECKING" in ast.unparse(s.test):
                    stack = s.orelse + stack
                else:
                    stack = s.body + s.orelse + stack
            elif isinstance(s, ast.Try):
                stack = s.body + [x for h in s.handlers for x in h.body] + s.orelse + stack
            else:
                yield s

    def lookup(self, mod: str, name: str, depth: int = 0) -> tuple:
        """('class'|'function'|'assign'|'module'|'lazy', module, node) for mod.name."""
        if depth > 20:
            raise _Missing(f"import cycle at {mod}.{name}")
        tree = self.tree(mod)
        stars = []
        for s in self._top(tree):
            if isinstance(s, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if s.name == name:
                    kind = "class" if isinstance(s, ast.ClassDef) else "function"
                    return kind, mod, s
            elif isinstance(s, ast.Assign):
                if any(isinstance(t, ast.Name) and t.id == name for t in s.targets):
                    return "assign", mod, s
            elif isinstance(s, ast.AnnAssign) and s.value is not None:
                if isinstance(s.target, ast.Name) and s.target.id == name:
                    return "assign", mod, s
            elif isinstance(s, ast.ImportFrom):
                src = self._absolute(mod, s)
                for a in s.names:
                    if a.name == "*":
                        stars.append(src)
                    elif (a.asname or a.name) == name:
                        return self._resolve_from(src, a.name, depth)
            elif isinstance(s, ast.Import):
                for a in s.names:
                    if a.asname == name:
                        return "module", a.name, None
        for src in stars:
            try:
                return self.lookup(src, name, depth + 1)
            except _Missing:
                pass
        if self.file(f"{mod}.{name}"):
            return "module", f"{mod}.{name}", None
        for s in self._top(tree):
            if isinstance(s, ast.FunctionDef) and s.name == "__getattr__":
                for n in ast.walk(s):
                    if isinstance(n, ast.Constant) and n.value == name:
                        return "lazy", mod, s
        raise _Missing(f"{mod} has no {name}")

    def _resolve_from(self, src: str, name: str, depth: int) -> tuple:
        if self.file(src) is None:
            if src.split(".")[0] != "vllm":
                return "external", src, None
            raise _Missing(f"no module {src}")
        try:
            return self.lookup(src, name, depth + 1)
        except _Missing:
            if self.file(f"{src}.{name}"):
                return "module", f"{src}.{name}", None
            raise

    def _absolute(self, mod: str, s: ast.ImportFrom) -> str:
        if not s.level:
            return s.module or ""
        is_pkg = self.file(mod) is not None and self.file(mod).name == "__init__.py"
        parts = mod.split(".")
        base = parts if is_pkg else parts[:-1]
        base = base[: len(base) - (s.level - 1)] if s.level > 1 else base
        return ".".join(base + ([s.module] if s.module else []))

    def resolve_expr(self, mod: str, node) -> tuple | None:
        """A base-class expression of module `mod` -> lookup tuple (None if not vLLM)."""
        name = _dotted(_strip_subscript(node))
        if not name:
            return None
        head, *rest = name.split(".")
        try:
            found = self.lookup(mod, head)
            for part in rest:
                if found[0] != "module":
                    return None
                found = self.lookup(found[1], part)
        except _Missing:
            return None
        return found

    def mro(self, mod: str, cls: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
        """vLLM classes of cls's MRO (depth-first, left to right, deduplicated)."""
        out, seen = [], set()

        def visit(m, c):
            if (m, c.name) in seen:
                return
            seen.add((m, c.name))
            out.append((m, c))
            for b in c.bases:
                found = self.resolve_expr(m, b)
                if found and found[0] == "class":
                    visit(found[1], found[2])

        visit(mod, cls)
        return out

    def base_names(self, mod: str, cls: ast.ClassDef) -> list[str]:
        names = []
        for _, c in self.mro(mod, cls):
            names += [_dotted(_strip_subscript(b)) for b in c.bases]
        return names


def _class_member(src: Source, mod: str, cls: ast.ClassDef, name: str) -> dict | None:
    """How `name` is a member of the class (its MRO within vLLM), or None."""
    mro = src.mro(mod, cls)
    annotated = None
    for m, c in mro:
        for s in c.body:
            if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef) and s.name == name:
                return {
                    "kind": "function",
                    "decorator": _decorator(s),
                    "params": _params(s),
                    "defined": f"{m}:{c.name}",
                }
            if isinstance(s, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in s.targets
            ):
                return {"kind": "field", "how": "assign", "defined": f"{m}:{c.name}",
                        "assigned": True}  # fmt: skip
            if (
                isinstance(s, ast.AnnAssign)
                and isinstance(s.target, ast.Name)
                and s.target.id == name
                and annotated is None
            ):
                filled = s.value is not None or _dataclass_like(src, m, c)
                annotated = {"kind": "field", "how": "annotation", "defined": f"{m}:{c.name}",
                             "assigned": filled}  # fmt: skip
                if filled:
                    return annotated
    for m, c in mro:
        for fn in c.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            for n in ast.walk(fn):
                targets = (
                    n.targets
                    if isinstance(n, ast.Assign)
                    else [n.target]
                    if isinstance(n, ast.AnnAssign | ast.AugAssign)
                    else []
                )
                for t in targets:
                    if (
                        isinstance(t, ast.Attribute)
                        and t.attr == name
                        and isinstance(t.value, ast.Name)
                        and t.value.id == "self"
                    ):
                        return {"kind": "field", "how": "self-assign", "defined": f"{m}:{c.name}",
                                "assigned": True}  # fmt: skip
    return annotated


def _dataclass_like(src: Source, mod: str, cls: ast.ClassDef) -> bool:
    for d in cls.decorator_list:
        name = _dotted(d.func if isinstance(d, ast.Call) else d).rsplit(".", 1)[-1]
        if name in ("dataclass", "config"):
            return True
    return any(
        b.rsplit(".", 1)[-1] in ("NamedTuple", "BaseModel") for b in src.base_names(mod, cls)
    )


def _class_info(src: Source, mod: str, cls: ast.ClassDef) -> dict:
    mro = src.mro(mod, cls)
    info = {
        "kind": "class",
        "defined": f"{mod}:{cls.name}",
        "bases": [_dotted(_strip_subscript(b)) for b in cls.bases],
        "abstract": sorted(_abstract(mro)),
    }
    if any(b.rsplit(".", 1)[-1] == "Enum" for b in src.base_names(mod, cls)):
        info["enum"] = True
    if _dataclass_like(src, mod, cls):
        info["fields"] = [
            s.target.id
            for m, c in reversed(mro)
            for s in c.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        ]
        info["fields"] = list(dict.fromkeys(info["fields"]))
    return info


def _members(mro, stop: str) -> list[str]:
    """Public member names defined in the MRO classes before `stop` ('mod:Class')."""
    names = set()
    for m, c in mro:
        if f"{m}:{c.name}" == stop:
            break
        for s in c.body:
            if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(s.name)
            elif isinstance(s, ast.Assign):
                names |= {t.id for t in s.targets if isinstance(t, ast.Name)}
            elif isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
                names.add(s.target.id)
    return sorted(n for n in names if not n.startswith("_") or n == "__init__")


def _abstract(mro) -> set[str]:
    out: set[str] = set()
    for _, c in reversed(mro):
        for s in c.body:
            if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef):
                decos = {_dotted(d).rsplit(".", 1)[-1] for d in s.decorator_list}
                if "abstractmethod" in decos:
                    out.add(s.name)
                else:
                    out.discard(s.name)
            elif isinstance(s, ast.Assign):
                out -= {t.id for t in s.targets if isinstance(t, ast.Name)}
    return out


class _Resolver:
    def __init__(self, src: Source):
        self.src = src
        self.targets: dict[str, tuple] = {}

    def target(self, target: str) -> tuple:
        """A target string -> lookup tuple ('class', mod, node) etc."""
        if target not in self.targets:
            self.targets[target] = self._target(target)
        return self.targets[target]

    def _target(self, target: str) -> tuple:
        mod, _, qual = target.partition(":")
        if mod == "stock":
            member, _, part = qual.partition(".")
            rk, rm, enum = self.target(REGISTRY)
            path = None
            for s in enum.body:
                if isinstance(s, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == member for t in s.targets
                ):
                    path = ast.literal_eval(s.value)
            if not isinstance(path, str):
                raise _Missing(f"AttentionBackendEnum.{member} has no class path")
            bmod, _, bname = path.rpartition(".")
            found = self.src.lookup(bmod, bname)
            if not part:
                return found
            getter = {"impl": "get_impl_cls", "builder": "get_builder_cls"}[part]
            for m, c in self.src.mro(found[1], found[2]):
                for s in c.body:
                    if isinstance(s, ast.FunctionDef) and s.name == getter:
                        for n in ast.walk(s):
                            if isinstance(n, ast.Return) and isinstance(n.value, ast.Name):
                                return self.src.lookup(m, n.value.id)
                        raise _Missing(f"{m}:{c.name}.{getter} returns no plain class name")
            raise _Missing(f"{path} has no {getter}")
        if not qual:
            if self.src.file(mod) is None:
                raise _Missing(f"no module {mod}")
            return "module", mod, None
        return self.src.lookup(mod, qual)

    def entry(self, use: Use) -> dict:
        try:
            return self._entry(use)
        except _Missing as e:
            return {"kind": "missing", "why": str(e)}

    def _entry(self, use: Use) -> dict:
        kind, mod, node = self.target(use.target)
        if use.kind == "callsite":
            if kind != "class":
                raise _Missing(f"{use.target} is not a class")
            return {"kind": "callsites", "calls": self._callsites(mod, use.member)}
        if not use.member:
            if kind == "class":
                info = _class_info(self.src, mod, node)
                if use.kind == "members":
                    stop = use.sig[0] if use.sig else ""
                    info["members"] = _members(self.src.mro(mod, node), stop)
                return info
            if kind == "function":
                return {
                    "kind": "function",
                    "decorator": "function",
                    "params": _params(node),
                    "defined": f"{mod}:{node.name}",
                    "returns": ast.unparse(node.returns) if node.returns else "",
                }
            if kind == "lazy":
                return {"kind": "lazy", "defined": f"{mod}:__getattr__"}
            if kind == "assign" and isinstance(node.value, ast.Constant):
                return {"kind": kind, "defined": mod, "value": node.value.value}
            return {"kind": kind, "defined": mod}
        if kind == "module":
            k2, m2, n2 = self.src.lookup(mod, use.member)
            if k2 == "function":
                return {
                    "kind": "function",
                    "decorator": "function",
                    "params": _params(n2),
                    "defined": f"{m2}:{n2.name}",
                }
            return {"kind": k2, "defined": m2}
        if kind != "class":
            raise _Missing(f"{use.target} is a {kind}, not a class")
        if use.kind == "sets_attr":
            for n in ast.walk(node):
                targets = n.targets if isinstance(n, ast.Assign) else []
                if any(isinstance(t, ast.Attribute) and t.attr == use.member for t in targets):
                    return {"kind": "sets_attr", "defined": f"{mod}:{node.name}",
                            "line": n.lineno}  # fmt: skip
            raise _Missing(f"{mod}:{node.name} sets no .{use.member}")
        found = _class_member(self.src, mod, node, use.member)
        if found is None:
            raise _Missing(f"{mod}:{node.name} has no member {use.member}")
        return found

    def _callsites(self, mod: str, callee: str) -> list[dict]:
        calls = []
        for n in ast.walk(self.src.tree(mod)):
            if isinstance(n, ast.Call):
                name = _dotted(n.func)
                if name == callee or name.endswith("." + callee):
                    calls.append(
                        {
                            "args": [
                                ast.unparse(a) if not isinstance(a, ast.Starred) else "*"
                                for a in n.args
                            ],
                            "keywords": [k.arg or "**" for k in n.keywords],
                            "line": n.lineno,
                        }
                    )
        if not calls:
            raise _Missing(f"{mod} never calls {callee}")
        return calls


def _version_of(src: Path) -> str:
    for name in ("_version.py", "version.py"):
        f = src / "vllm" / name
        if f.is_file():
            m = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)""", f.read_text())
            if m:
                return m.group(1)
    return "unknown"


def api_manifest(vllm_src_dir: Path | str, api: PluginAPI | None = None) -> dict:
    """What an unpacked vLLM (a directory holding `vllm/`) has of the plugin's names."""
    src = Source(vllm_src_dir)
    api = api or used_names()
    res = _Resolver(src)
    symbols = {}
    for use in api.uses:
        if use.key in symbols and use.kind != "members":
            continue
        symbols[use.key] = res.entry(use)
    targets = {}
    for t in sorted({u.target for u in api.uses if u.target.startswith("stock:")}):
        try:
            k, m, n = res.target(t)
            targets[t] = f"{m}:{n.name}" if n is not None else m
        except _Missing as e:
            targets[t] = f"missing: {e}"
    return {
        "vllm": _version_of(Path(vllm_src_dir)),
        "stock": targets,
        "symbols": dict(sorted(symbols.items())),
    }


# --------------------------------------------------------------------------- checking


def _split(params: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """(positional 'a'/'a=', keyword-only, has *args, has **kwargs)."""
    pos, kwonly, star, dstar, after = [], [], False, False, False
    for p in params:
        if p.startswith("**"):
            dstar = True
        elif p.startswith("*"):
            star, after = star or p != "*", True
        elif after:
            kwonly.append(p)
        else:
            pos.append(p)
    return pos, kwonly, star, dstar


def _bound(entry: dict) -> list[str]:
    params = list(entry.get("params", []))
    if entry.get("decorator") in ("method", "classmethod", "property") and params:
        params = params[1:]
    return params


def _accepts(params: list[str], npos: int, keywords: list[str], spread: bool) -> str:
    """'' if a call with npos positional args and these keywords binds to params."""
    pos, kwonly, star, dstar = _split(params)
    if npos > len(pos) and not star:
        return f"{npos} positional args, takes {len(pos)}"
    names = [p.rstrip("=") for p in pos + kwonly]
    for k in keywords:
        if k not in names and not dstar:
            return f"no parameter {k!r}"
    if spread:
        return ""
    for i, p in enumerate(pos):
        if not p.endswith("=") and i >= npos and p not in keywords:
            return f"required parameter {p!r} not passed"
    for p in kwonly:
        if not p.endswith("=") and p not in keywords:
            return f"required keyword {p!r} not passed"
    return ""


def _override_diff(ours: list[str], base: dict) -> str:
    """'' if our def (decorator, *params) accepts every call the base's def allows."""
    deco, *mine = ours
    if base.get("kind") != "function":
        return f"vLLM has a {base.get('kind')} here, we define a method"
    if base["decorator"] != deco:
        return f"vLLM's is a {base['decorator']}, ours a {deco}"
    theirs = _bound(base)
    mine = mine[1:] if deco in ("method", "classmethod") and mine else mine
    mpos, mkw, mstar, mdstar = _split(mine)
    tpos, tkw, _, _ = _split(theirs)
    if mstar and mdstar and not mpos:
        return ""
    for i, t in enumerate(tpos):
        if i >= len(mpos):
            if not mstar:
                return f"vLLM's parameter {t.rstrip('=')!r} (#{i + 1}) missing in ours"
            continue
        if mpos[i].rstrip("=") != t.rstrip("="):
            return f"parameter #{i + 1}: vLLM {t.rstrip('=')!r}, ours {mpos[i].rstrip('=')!r}"
        if t.endswith("=") and not mpos[i].endswith("="):
            return f"vLLM's {t.rstrip('=')!r} has a default, ours not"
    for p in mpos[len(tpos) :]:
        if not p.endswith("="):
            return f"our extra parameter {p!r} has no default"
    names = {p.rstrip("=") for p in mpos + mkw}
    for k in tkw:
        if k.rstrip("=") not in names and not mdstar:
            return f"vLLM's keyword {k.rstrip('=')!r} missing in ours"
    return ""


def _mirror_diff(ours: list[str], theirs: dict) -> str:
    """impl_args must name vLLM's leading positional parameters in vLLM's order."""
    if theirs.get("kind") != "function":
        return f"vLLM has a {theirs.get('kind')} here"
    mpos = [p.rstrip("=") for p in _split(ours[1:])[0]]
    tpos = [p.rstrip("=") for p in _split(_bound(theirs))[0]]
    if tpos[: len(mpos)] != mpos:
        return f"vLLM's positional params {tpos}, ours {mpos}"
    return ""


SEVERITY = ("ok", "note", "fallback", "differs", "missing", "unrecorded")


def check_use(use: Use, entry: dict | None) -> tuple[str, str]:
    """(status, detail): status ok | fallback | missing | differs | unrecorded."""
    if entry is None:
        return "unrecorded", "not in this manifest: regenerate it (tools/vllm_api.py manifest)"
    if entry["kind"] == "missing":
        if use.optional:
            return "fallback", f"{entry['why']}; {use.optional}"
        return "missing", entry["why"]
    detail = ""
    if use.kind == "assigned" and not entry.get("assigned", True):
        detail = "only annotated, never assigned"
    elif use.kind == "call":
        if entry["kind"] == "function":
            npos = int(use.sig[0].rstrip("*"))
            kws = [k for k in use.sig[1:] if k != "**"]
            spread = use.sig[0].endswith("*") or "**" in use.sig
            detail = _accepts(_bound(entry), npos, kws, spread)
        elif entry["kind"] not in ("class", "lazy", "external", "assign"):
            detail = f"called, but vLLM has a {entry['kind']}"
    elif use.kind == "override":
        detail = _override_diff(list(use.sig), entry)
    elif use.kind == "mirror":
        detail = _mirror_diff(list(use.sig), entry)
    elif use.kind == "value":
        if entry.get("value") != use.sig[0]:
            detail = f"is {entry.get('value')!r}, the plugin relies on {use.sig[0]!r}"
    elif use.kind == "returns":
        got = entry.get("returns", "")
        if got.replace(" ", "") != use.sig[0].replace(" ", ""):
            detail = f"returns {got!r}, the plugin unpacks {use.sig[0]!r}"
    elif use.kind == "callsite":
        bound = use.sig[0] == "method"
        params = list(use.sig[1:])[1:] if bound else list(use.sig[1:])
        problems = []
        for c in entry["calls"]:
            spread = "*" in c["args"] or "**" in c["keywords"]
            npos = len([a for a in c["args"] if a != "*"])
            kws = [k for k in c["keywords"] if k != "**"]
            bad = _accepts(params, npos, kws, spread)
            if not bad and use.member == "impl_cls":  # positional args bind by name
                names = [p.rstrip("=") for p in _split(params)[0]]
                for i, a in enumerate(c["args"][: len(names)]):
                    if a.isidentifier() and a != names[i]:
                        bad = f"arg #{i + 1} is {a!r}, impl_args binds it as {names[i]!r}"
            if bad:
                problems.append(f"line {c['line']}: {bad}")
        detail = "; ".join(problems)
    return ("differs", detail) if detail else ("ok", "")


def derived_checks(api: PluginAPI, manifest: dict) -> list[tuple[str, str, str]]:
    """(row, status, detail): abstract members covered; stock overrides not forwarded."""
    sym = manifest["symbols"]
    rows = []
    stock_has = {
        s: {m for m in api.stock_members if sym.get(f"stock:{s}.{m}", {}).get("kind") != "missing"}
        for s in STOCK_NAMES
    }
    for cls, (base, defined) in sorted(api.subclasses.items()):
        info = sym.get(base)
        if info is None or info.get("kind") != "class":
            continue
        per = STOCK_NAMES if base == f"{ATTN}:AttentionBackend" else ("",)
        for s in per:
            have = set(defined) | (stock_has[s] if s else set())
            lacking = sorted(set(info["abstract"]) - have)
            row = f"{cls}: abstract members defined" + (f" ({s})" if s else "")
            rows.append((row, "missing" if lacking else "ok", ", ".join(lacking)))
    layers = (("", "PBSAttentionBackend", "AttentionBackend"),
              (".impl", "PBSAttentionImpl", "AttentionImpl"),
              (".builder", "PBSAttentionMetadataBuilder", "AttentionMetadataBuilder"))  # fmt: skip
    for s in STOCK_NAMES:
        for part, ours, base in layers:
            st = sym.get(f"stock:{s}{part}", {})
            bs = sym.get(f"{ATTN}:{base}", {})
            if "members" not in st or "members" not in bs:
                continue
            defined = set(api.subclasses.get(ours, ("", []))[1])
            forwarded = set(api.stock_members) if not part else set()
            extra = sorted(
                set(st["members"]) & set(bs["members"]) - defined - forwarded - {"__init__"}
            )
            row = f"stock {s}{part}: overrides that PBS leaves to the {base} default"
            rows.append((row, "note" if extra else "ok", ", ".join(extra)))
    return rows


def load_manifests(directory: Path = MANIFEST_DIR) -> dict[str, dict]:
    def vkey(p: Path):
        return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.]", p.stem))

    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"), key=vkey)}


def check(directory: Path = MANIFEST_DIR, verbose: bool = False, out=sys.stdout) -> int:
    api = used_names()
    manifests = load_manifests(directory)
    if not manifests:
        print(f"no manifests in {directory}", file=out)
        return 1
    versions = list(manifests)
    rows: dict[str, dict[str, tuple[str, str]]] = {}
    for u in api.uses:
        label = f"{u.kind} {u.key}" + (f" {u.sig}" if u.kind == "call" else "")
        for v in versions:
            status = check_use(u, manifests[v]["symbols"].get(u.key))
            old = rows.setdefault(label, {}).get(v)
            if old is None or SEVERITY.index(status[0]) > SEVERITY.index(old[0]):
                rows[label][v] = status
    for v in versions:
        for label, status, detail in derived_checks(api, manifests[v]):
            rows.setdefault(label, {})[v] = (status, detail)
    short = {"ok": "ok", "fallback": "fallbk", "missing": "MISSING", "differs": "DIFFERS",
             "unrecorded": "unrec", "note": "note"}  # fmt: skip
    width = min(max(len(r) for r in rows), 90)
    print(f"{'name':{width}} " + " ".join(f"{v:>7}" for v in versions), file=out)
    bad = 0
    details = []
    for label in sorted(rows):
        cells = rows[label]
        if not verbose and all(cells.get(v, ("ok",))[0] == "ok" for v in versions):
            continue
        line = " ".join(f"{short[cells.get(v, ('ok', ''))[0]]:>7}" for v in versions)
        print(f"{label[:width]:{width}} {line}", file=out)
        groups: dict[tuple[str, str], list[str]] = {}
        for v in versions:
            st, detail = cells.get(v, ("ok", ""))
            if st in ("missing", "differs", "unrecorded"):
                bad += 1
            if st != "ok":
                groups.setdefault((st, detail), []).append(v)
        for (st, detail), vs in groups.items():
            details.append(f"  {label} [{' '.join(vs)}] {st}: {detail}")
    n_ok = sum(all(c[0] == "ok" for c in cells.values()) for cells in rows.values())
    print(f"\n{n_ok} of {len(rows)} names ok in all {len(versions)} versions "
          f"({', '.join(versions)}); {bad} failing cells", file=out)  # fmt: skip
    if details:
        print("details:", *details, sep="\n", file=out)
    return 1 if bad else 0


# --------------------------------------------------------------------------- CLI


def download_sources(version: str, dest: Path) -> str:
    """Download the vllm==version wheel and extract its vllm/**/*.py into dest; wheel name."""
    with tempfile.TemporaryDirectory(prefix="vllm-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", tmp, f"vllm=={version}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("vllm-*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(f"pip download vllm=={version} failed: {proc.stderr[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            z.extractall(dest, members=members)
        return wheels[0].name


def _dumps(manifest: dict) -> str:
    """JSON with one symbol per line (small, diff-friendly)."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k != "symbols"]
    body = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest["symbols"].items()]
    return "{\n" + ",\n".join(head) + ',\n "symbols": {\n' + ",\n".join(body) + "\n }\n}\n"


def _write(manifest: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_dumps(manifest))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="record a vLLM release's API for the plugin's names")
    m.add_argument("--version", action="append", default=[], help="vllm release (repeatable)")
    m.add_argument("--src", type=Path, help="an unpacked package: directory holding vllm/")
    m.add_argument("--out", type=Path, help="output file (one version or --src)")
    c = sub.add_parser("check", help="compare the plugin's names with every manifest")
    c.add_argument("--dir", type=Path, default=MANIFEST_DIR)
    c.add_argument("-v", "--verbose", action="store_true", help="also list rows all ok")
    args = p.parse_args(argv)
    if args.cmd == "check":
        return check(args.dir, args.verbose)
    api = used_names()
    if args.src:
        manifest = api_manifest(args.src, api)
        _write(manifest, args.out or MANIFEST_DIR / f"{manifest['vllm']}.json")
        return 0
    if args.out and len(args.version) != 1:
        p.error("--out needs exactly one --version")
    failed = 0
    for v in args.version:
        with tempfile.TemporaryDirectory(prefix=f"vllm-{v}-src-") as tmp:
            try:
                wheel = download_sources(v, Path(tmp))
            except RuntimeError as e:
                print(e, file=sys.stderr)
                failed += 1
                continue
            manifest = {"wheel": wheel, **api_manifest(tmp, api)}
            _write(manifest, args.out or MANIFEST_DIR / f"{v}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

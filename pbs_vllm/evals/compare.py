"""Engine settings of the RULER suite and of the TTFT benchmark, and the pure helpers that
compare them.

A `Setting` names one engine configuration: the platform's stock attention backend
(`flash`: FLASH_ATTN on CUDA, CPU_ATTN on the CPU) or the PBS backend with overrides of
`pbs_vllm.config.PBSConfig`. One setting, `unpermuted-matched`, takes its cap on the kept
fraction of candidate blocks (`max_kept_fraction`) from a measurement: the mean density
(computed fraction of the causally visible key blocks) of `pbs-sparse` at the same length,
so the unpermuted ablation keeps about the same fraction of blocks as PBS.
`order_settings` puts such dependencies first.

Comparisons against the reference setting (`flash`), per sample:
- first-token agreement: whether the greedy first generated token is the same;
- top-k KL: KL(ref || other) of the first token's distribution over the reference's
  top-k tokens (`topk_kl`; an approximation, see there).

Pure Python (no torch, no vLLM): `benchmarks/bench_ruler.py` runs the engines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

REFERENCE = "flash"


class MissingDensityError(LookupError):
    """A density-matched setting ran before (or without) the setting it matches."""


@dataclass(frozen=True)
class Setting:
    """One engine configuration. `pbs`: PBSConfig overrides (backend 'pbs' only);
    `match_density_of`: a setting whose measured mean density at the same length becomes
    this one's `max_kept_fraction`; `suite`: part of the accuracy suite's `all` (False:
    a speed configuration of `benchmarks/bench_ttft.py`, still runnable by name)."""

    name: str
    backend: Literal["stock", "pbs"]
    pbs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    match_density_of: str | None = None
    description: str = ""
    suite: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ("stock", "pbs"):
            raise ValueError(f"setting {self.name!r}: backend must be 'stock' or 'pbs'")
        if self.backend == "stock" and (self.pbs or self.match_density_of):
            raise ValueError(f"setting {self.name!r}: the stock backend takes no PBS settings")
        object.__setattr__(self, "pbs", MappingProxyType(dict(self.pbs)))


# The sparse path everywhere: no dense fallback for short prefills, no switch to the stock
# kernel for dense masks (the accuracy of the masks themselves).
_SPARSE = {"tau": 0.9, "dense_fallback_len": 0, "dense_above": None}

SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("flash", "stock", description="the platform's stock attention backend"),
        Setting("pbs-default", "pbs", description="PBS with its default configuration"),
        Setting("pbs-sparse", "pbs", _SPARSE, description="PBS, tau 0.9, never dense"),
        Setting("pbs-tau0.8", "pbs", {**_SPARSE, "tau": 0.8}, description="pbs-sparse, tau 0.8"),
        *(
            Setting(f"pbs-tau{t}", "pbs", {**_SPARSE, "tau": t}, description=f"pbs-sparse, tau {t}")
            for t in (0.95, 0.98, 0.99)
        ),
        *(
            # the default tau with coarser permutation segments or finer blocks: candidates
            # for a lower density at tau 0.99's accuracy on long prompts
            Setting(
                f"pbs-tau0.99-{label}",
                "pbs",
                {**_SPARSE, "tau": 0.99, **geometry},
                description=f"pbs-tau0.99 with {text}",
            )
            for label, geometry, text in (
                ("s1024", {"segment_size": 1024}, "1024-token segments"),
                ("s2048", {"segment_size": 2048}, "2048-token segments"),
                ("b64", {"block_size": 64}, "64-token blocks"),
            )
        ),
        *(
            # tau over the candidates besides the always-kept sink block: on the CPU (docs/
            # accuracy.md) it halved the answer position's output error at the same tau
            Setting(
                f"pbs-tau{t}-exsink",
                "pbs",
                {**_SPARSE, "tau": t, "tau_excludes_sink": True},
                description=f"pbs-tau{t} with tau counted over the blocks besides the sink",
            )
            for t in (0.98, 0.99)
        ),
        Setting(
            "pbs-pooled256",
            "pbs",
            {**_SPARSE, "exact_last_block": False, "segment_size": 256},
            description="pbs-sparse with the paper's selection (pooled scores, segment 256)",
        ),
        Setting(
            "pbs-plus",
            "pbs",
            {**_SPARSE, "scoring": "antidiagonal"},
            description="pbs-sparse with antidiagonal scoring (PBS+)",
        ),
        *(
            Setting(
                f"pbs-last{label}",
                "pbs",
                {**_SPARSE, "dense_last_tokens": n},
                description=f"pbs-sparse, each chunk's last {n} query tokens dense",
            )
            for label, n in (("128", 128), ("1k", 1024), ("4k", 4096))
        ),
        Setting(
            "unpermuted-last1k-matched",
            "pbs",
            {**_SPARSE, "tau": 1.0, "permute": False, "dense_last_tokens": 1024},
            match_density_of="pbs-last1k",
            description="unpermuted block-sparse with the last 1024 query tokens dense, capped "
            "at pbs-last1k's measured density",
        ),
        *(
            Setting(
                name,
                "pbs",
                {**_SPARSE, "tau": 1.0, "permute": False},
                match_density_of=of,
                description=f"unpermuted block-sparse, capped at {of}'s measured density",
            )
            for name, of in (
                ("unpermuted-tau0.98-matched", "pbs-tau0.98"),
                ("unpermuted-tau0.99-matched", "pbs-tau0.99"),
                ("unpermuted-matched", "pbs-sparse"),
            )
        ),
        # speed configurations of bench_ttft.py (not in the suite's `all`)
        Setting("pbs-tau", "pbs", _SPARSE, description="pbs-sparse (its TTFT name)", suite=False),
        Setting(
            "pbs-tau-graphs",
            "pbs",
            {**_SPARSE, "cuda_graphs": True},
            description="pbs-tau with each step's PBS launches replayed from CUDA graphs",
            suite=False,
        ),
        Setting(
            "pbs-tau-triton",
            "pbs",
            {**_SPARSE, "attention_kernel": "triton"},
            description="pbs-tau on the portable Triton kernel (on Hopper it attends through FA3)",
            suite=False,
        ),
        *(
            Setting(
                f"pbs-d{pct}",
                "pbs",
                {**_SPARSE, "tau": 1.0, "max_kept_fraction": pct / 100},
                description=f"every candidate up to a cap of {pct}% of them (a forced density)",
                suite=False,
            )
            for pct in (5, 10, 25)
        ),
        Setting(
            "pbs-d25-graphs",
            "pbs",
            {**_SPARSE, "tau": 1.0, "max_kept_fraction": 0.25, "cuda_graphs": True},
            description="pbs-d25 with step graphs",
            suite=False,
        ),
        Setting("pbs-full", "pbs", {**_SPARSE, "tau": 1.0}, description="tau 1", suite=False),
        *(
            Setting(
                f"pbs-default-{label}",
                "pbs",
                {"dense_fallback_len": n},
                description=f"the default with sparse prefill from {label.upper()} on",
                suite=False,
            )
            for label, n in (("16k", 16384), ("8k", 8192))
        ),
        Setting(
            "pbs-routed",
            "pbs",
            {"tau": 0.9, "dense_fallback_len": 0},
            description="tau 0.9 at every length, the cost model routing each step",
            suite=False,
        ),
        Setting(
            "pbs-routed-0.6",
            "pbs",
            {"tau": 0.9, "dense_fallback_len": 0, "dense_above": 0.6},
            description="pbs-routed with a fixed break-even density of 0.6",
            suite=False,
        ),
    )
}


def _unknown(bad: Sequence[str]) -> ValueError:
    return ValueError(
        f"unknown setting(s) {', '.join(map(repr, bad))}; allowed: all, {', '.join(SETTINGS)}"
    )


def order_settings(names: Iterable[str], add_dependencies: bool = True) -> list[str]:
    """`names` with every `match_density_of` dependency before the setting that needs it
    (added when missing, unless `add_dependencies` is False: then a missing one is an
    error); otherwise in the given order, duplicates dropped."""
    names = list(dict.fromkeys(names))
    bad = [n for n in names if n not in SETTINGS]
    if bad:
        raise _unknown(bad)
    out: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in out:
            return
        if name in chain:
            raise ValueError(f"settings depend on each other in a cycle: {' -> '.join(chain)}")
        dep = SETTINGS[name].match_density_of
        if dep is not None:
            if dep not in names and not add_dependencies:
                raise ValueError(f"setting {name!r} needs {dep!r} (its density) in the list")
            visit(dep, (*chain, name))
        out.append(name)

    for n in names:
        visit(n, ())
    return out


def parse_settings(text: str) -> list[str]:
    """`flash,pbs-sparse` (or `all`: the suite's settings) -> validated names, dependencies first
    (`order_settings`). Unknown names are a ValueError naming them and the allowed ones."""
    if text.strip() == "all":
        return [name for name, s in SETTINGS.items() if s.suite]
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no settings in {text!r}; allowed: all, {', '.join(SETTINGS)}")
    return order_settings(names)


def setting_config(
    setting: Setting | str,
    length: int,
    densities: Mapping[tuple[str, int], float | None] | None = None,
) -> dict[str, Any] | None:
    """The `additional_config["pbs"]` dict of `setting` at `length`; None for the stock
    backend. `densities[(name, length)]`: measured mean densities (None: no sparse
    layer-call was measured), needed by density-matched settings."""
    s = SETTINGS[setting] if isinstance(setting, str) else setting
    if s.backend == "stock":
        return None
    config = dict(s.pbs)
    dep = s.match_density_of
    if dep is not None:
        densities = densities or {}
        if (dep, length) not in densities:
            raise MissingDensityError(
                f"setting {s.name!r} at length {length} caps its kept fraction at the measured "
                f"mean density of {dep!r} at that length, which is not known: run {dep!r} "
                f"at length {length} first (it failed or was not run)"
            )
        d = densities[(dep, length)]
        if d is None:
            raise MissingDensityError(
                f"setting {s.name!r} at length {length}: {dep!r} measured no density at "
                f"that length (no sparse layer-call ran), so there is nothing to match"
            )
        if not 0.0 < d <= 1.0:
            raise MissingDensityError(
                f"setting {s.name!r} at length {length}: {dep!r}'s density {d!r} is not in (0, 1]"
            )
        config["max_kept_fraction"] = float(d)
    return config


# ---------------------------------------------------------------------------- metrics


def first_token_agreement(
    a_tokens: Sequence[int | None], b_tokens: Sequence[int | None]
) -> float | None:
    """Fraction of positions where the two sequences of first generated token ids agree
    (None, a missing token, never agrees); None for empty sequences."""
    if len(a_tokens) != len(b_tokens):
        raise ValueError(f"token sequences differ in length: {len(a_tokens)} vs {len(b_tokens)}")
    if not a_tokens:
        return None
    same = sum(1 for a, b in zip(a_tokens, b_tokens) if a is not None and a == b)
    return same / len(a_tokens)


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


def topk_kl(ref_logprobs: Mapping[int, float], other_logprobs: Mapping[int, float]) -> float:
    """KL(ref || other) in nats over the reference's top-k tokens (the keys of
    `ref_logprobs`), both distributions renormalised over that token set.

    An approximation: only top-k logprobs are known. A reference token missing from
    `other`'s top-k is given `other`'s smallest listed logprob, an upper bound on its true
    logprob there, so those terms (the tail) are understated: the result is close to a
    lower bound of the KL over these tokens. Zero for identical inputs, never negative.
    Keys may be ints or their strings (as read back from JSON).
    """
    if not ref_logprobs:
        raise ValueError("topk_kl: the reference has no logprobs")
    if not other_logprobs:
        raise ValueError("topk_kl: the compared setting has no logprobs")
    ref = {int(t): float(v) for t, v in ref_logprobs.items()}
    other = {int(t): float(v) for t, v in other_logprobs.items()}
    floor = min(other.values())
    tokens = list(ref)
    p_log = [ref[t] for t in tokens]
    q_log = [other.get(t, floor) for t in tokens]
    p_norm, q_norm = _logsumexp(p_log), _logsumexp(q_log)
    kl = 0.0
    for lp, lq in zip(p_log, q_log):
        lp -= p_norm
        lq -= q_norm
        p = math.exp(lp)
        if p == 0.0:
            continue
        if lq == -math.inf:
            return math.inf
        kl += p * (lp - lq)
    return max(kl, 0.0)


def mean_topk_kl(
    ref: Sequence[Mapping[int, float] | None], other: Sequence[Mapping[int, float] | None]
) -> float | None:
    """Mean `topk_kl` over aligned pairs; pairs with a missing (None or empty) side are
    skipped; None when no pair is left."""
    if len(ref) != len(other):
        raise ValueError(f"logprob sequences differ in length: {len(ref)} vs {len(other)}")
    kls = [topk_kl(r, o) for r, o in zip(ref, other) if r and o]
    return sum(kls) / len(kls) if kls else None


# ---------------------------------------------------------------------------- summary


def summarize(
    records: Iterable[Mapping[str, Any]],
    densities: Mapping[tuple[str, int], float | None] | None = None,
    errors: Mapping[tuple[str, int], str] | None = None,
    reference: str = REFERENCE,
    order: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Per (setting, length) results from per-sample records.

    A record has `setting`, `length`, `task`, `key` (same across settings), `score`,
    `first_token` (id or None) and `top_logprobs` ({token id: logprob} of the first
    token, or None). Results hold the mean score over tasks (each task's mean, averaged:
    RULER's convention), the per-task means, the density, and the first-token agreement
    and mean top-k KL against `reference` over the keys both ran; `error` for a (setting,
    length) that failed. Rows go by setting (in `order`, else by first appearance), then
    by length.
    """
    densities = densities or {}
    errors = errors or {}
    by: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for r in records:
        by.setdefault((r["setting"], int(r["length"])), {})[r["key"]] = r
    cells = list(dict.fromkeys([*by, *errors]))
    rank = {n: i for i, n in enumerate(dict.fromkeys([*(order or ()), *(c[0] for c in cells)]))}
    cells.sort(key=lambda c: (rank[c[0]], c[1]))
    out = []
    for setting, length in cells:
        rows = by.get((setting, length), {})
        tasks: dict[str, list[float]] = {}
        for r in rows.values():
            tasks.setdefault(r["task"], []).append(float(r["score"]))
        per_task = {t: sum(v) / len(v) for t, v in tasks.items()}
        res: dict[str, Any] = {
            "setting": setting,
            "length": length,
            "samples": len(rows),
            "score": sum(per_task.values()) / len(per_task) if per_task else None,
            "per_task": per_task,
            "density": densities.get((setting, length)),
            "agreement": None,
            "topk_kl": None,
            "error": errors.get((setting, length)),
        }
        ref = by.get((reference, length))
        if ref and setting != reference:
            keys = [k for k in rows if k in ref]
            if keys:
                res["agreement"] = first_token_agreement(
                    [ref[k].get("first_token") for k in keys],
                    [rows[k].get("first_token") for k in keys],
                )
                res["topk_kl"] = mean_topk_kl(
                    [ref[k].get("top_logprobs") for k in keys],
                    [rows[k].get("top_logprobs") for k in keys],
                )
        out.append(res)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(results: Sequence[Mapping[str, Any]], reference: str = REFERENCE) -> str:
    """One row per (setting, length): mean score over tasks and each task's score (in %),
    density (`dense`: PBS measured no sparse layer-call; `-`: stock backend or unknown),
    first-token agreement (%) and mean top-k KL (nats) against `reference`."""
    tasks = list(dict.fromkeys(t for r in results for t in r.get("per_task", {})))
    head = ["setting", "length", "mean", *tasks, "density", f"agree vs {reference}", "top-k KL"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for r in results:
        length = int(r["length"])
        size = f"{length // 1024}K" if length % 1024 == 0 else str(length)
        density = r.get("density")
        if density is not None:
            dens = f"{density:.3f}"
        elif SETTINGS.get(r["setting"]) and SETTINGS[r["setting"]].backend == "pbs":
            dens = "dense" if r.get("samples") else "-"
        else:
            dens = "-"
        kl = r.get("topk_kl")
        mean = _pct(r.get("score"))
        if r.get("error"):
            msg = str(r["error"]).replace("|", "/").replace("\n", " ")
            mean = f"failed: {msg[:80]}" if not r.get("samples") else f"{mean} (failed: {msg[:60]})"
        cells = [
            r["setting"],
            size,
            mean,
            *(_pct(r.get("per_task", {}).get(t)) for t in tasks),
            dens,
            _pct(r.get("agreement")),
            "-" if kl is None else f"{kl:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "REFERENCE",
    "SETTINGS",
    "MissingDensityError",
    "Setting",
    "first_token_agreement",
    "markdown_table",
    "mean_topk_kl",
    "order_settings",
    "parse_settings",
    "setting_config",
    "summarize",
    "topk_kl",
]

"""`PBSConfig`: the validated configuration of the PBS backend.

Sources, later ones winning: the defaults (mostly the paper's), vLLM's
`--additional-config '{"pbs": {...}}'`, then environment variables `PBS_<FIELD>`
(e.g. `PBS_TAU=0.95`, `PBS_MAX_KEPT_FRACTION=none`). Any bad value fails with one
`PBSConfigError` naming the field, the value and what is allowed.

Renamed settings (`DEPRECATED_NAMES`, e.g. `max_density` -> `max_kept_fraction`) are still
accepted under their old name, as a key of the "pbs" object or as `PBS_<OLD>`, with one
deprecation warning per process; one source giving both the old and the new name is a
`PBSConfigError` naming both. Across sources the usual order holds (the environment wins).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pbs_vllm.kernels.params import SparsityParams

ENV_PREFIX = "PBS_"
ADDITIONAL_CONFIG_KEY = "pbs"
# Environment variables that start with PBS_ but are not config fields.
_NON_FIELD_ENV = {"PBS_VLLM_CPU_PLATFORM"}
# Old setting name -> current name; the old one is still accepted (see the module docstring).
DEPRECATED_NAMES = {"max_density": "max_kept_fraction"}

# Under vLLM's "vllm" logger, so its handler prints the line (no vllm import needed); the
# name is the one `pbs_vllm.backend.log.get_logger(__name__)` would give.
logger = logging.getLogger(f"vllm.{__name__}")
_warned: set[str] = set()  # deprecation messages already logged by this process


class PBSConfigError(ValueError):
    """An invalid PBS configuration; the message names field, value and what is allowed."""


class PBSConfig(BaseModel):
    """Settings of permuted block-sparse prefill (defaults: the paper's, except
    segment_size 512, exact_last_block and tau 0.99; docs/method.md lists the deviations)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    block_size: int = Field(128, description="Tokens per query/key block (power of two, 16-256).")
    segment_size: int = Field(
        512, description="Permutation segment length (multiple of block_size)."
    )
    tau: float = Field(
        0.99,
        gt=0.0,
        le=1.0,
        description="Cumulative block-probability threshold (the paper's 0.9 lost 4-6 RULER "
        "points on a real model; 0.99 kept them, docs/accuracy.md).",
    )
    max_kept_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Cap on the kept fraction of candidate key blocks per query block "
        "(none = no cap); formerly max_density, which is still accepted.",
    )
    dense_fallback_len: int = Field(
        65536, ge=0, description="Prefills whose sequence is shorter than this run dense."
    )
    dense_above: float | Literal["auto"] | None = Field(
        "auto",
        description="Break-even density: a layer whose PBS masks keep at least this fraction "
        "of their blocks (weighted by their causal pairs) runs the step's prefill on the stock "
        "kernel; auto = predicted per step from its lengths and the GPU's measured rates "
        "(backend/cost.py; 0.6 where the GPU has none), and a step no density could win goes "
        "to the stock kernel unestimated; none = never switch.",
    )
    dense_last_tokens: int = Field(
        0,
        ge=0,
        description="The query blocks holding any of the last this many queries of every PBS "
        "prefill chunk attend every key, whatever tau says: the end of a prompt, where the "
        "question and the first answer token usually sit, stays exact (0 = off).",
    )
    dense_hold_steps: int = Field(
        8,
        ge=1,
        description="After a dense_above switch, the layer's prefill steps without decodes "
        "stay on the stock kernel, unestimated, while their sequences are no longer than the "
        "length at which the switch's density, falling with context, would fall below the "
        "step's break-even density (dense_above), for at most this many steps (the step "
        "whose masks reached dense_above ran PBS: its densities reach routing later).",
    )
    stats_log_interval_s: float = Field(
        10.0, ge=0.0, description="Seconds between density log lines (0 = off)."
    )
    warmup: bool = Field(
        True,
        description="Compile and tune the PBS kernels for the model's shape at start-up (GPU), "
        "so no request pays Triton's JIT compiles, and measure their working memory for the "
        "largest prefill chunk, which vLLM's memory profile keeps out of the KV cache; "
        "false = compile on first use, no reservation.",
    )
    attention_kernel: Literal["auto", "fa3", "triton"] = Field(
        "auto",
        description="Kernel that attends the PBS masks: fa3 (vLLM's FlashAttention-3 over a "
        "block-ordered copy of the selected keys; Hopper), triton (portable), auto = fa3 "
        "where it runs, else triton.",
    )

    cuda_graphs: bool = Field(
        False,
        description="Capture each prefill step's PBS work (estimation and FA3 attention) as "
        "CUDA graphs at its first layer and replay them for the other layers, so a layer "
        "costs a few launches of host time (fa3 attention kernel only); false = launch "
        "every kernel from Python in every layer (the default: the graphs cut host time "
        "per layer 5x but did not yet shorten TTFT, and once ran out of GPU memory).",
    )

    # Research and ablation switches (the paper's variants and ours): not needed to serve.
    scoring: Literal["mean", "antidiagonal"] = Field(
        "mean", description="Block scoring: mean pooling (PBS) or antidiagonal (PBS+)."
    )
    antidiagonal_stride: int = Field(8, ge=1, description="Antidiagonal sampling stride (PBS+).")
    permute: bool = Field(True, description="False = unpermuted block-sparse ablation.")
    keep_sink: bool = Field(True, description="Always keep the block holding token 0.")
    tau_excludes_sink: bool = Field(
        False,
        description="tau counts the mass of the candidate blocks besides the sink block "
        "(kept anyway), so the sink's share does not fill the tau budget (needs keep_sink).",
    )
    exact_last_block: bool = Field(
        True,
        description="A chunk's last query block selects by its queries' exact attention mass "
        "per permuted block (the importance scores) instead of pooled scores; false = the "
        "paper's pooled scores for every block.",
    )

    @field_validator("dense_above")
    @classmethod
    def _density_or_auto(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, b: int) -> int:
        if not 16 <= b <= 256 or b & (b - 1):
            raise ValueError("must be a power of two between 16 and 256")
        return b

    @field_validator("segment_size")
    @classmethod
    def _multiple_of_block(cls, s: int, info: ValidationInfo) -> int:
        b = info.data.get("block_size")
        if b is not None and (s < b or s % b):
            raise ValueError(f"must be a positive multiple of block_size={b}")
        return s

    @field_validator("tau_excludes_sink")
    @classmethod
    def _needs_sink(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("keep_sink") is False:
            raise ValueError("needs keep_sink=true (the sink block is kept, so tau can skip it)")
        return v

    @field_validator("antidiagonal_stride")
    @classmethod
    def _divides_block(cls, st: int, info: ValidationInfo) -> int:
        b = info.data.get("block_size")
        if b is not None and b % st:
            raise ValueError(f"must divide block_size={b}")
        return st

    def sparsity_params(self) -> SparsityParams:
        """The kernel-level parameters (`pbs_vllm.kernels.SparsityParams`)."""
        return SparsityParams(
            block_size=self.block_size,
            segment_size=self.segment_size,
            tau=self.tau,
            max_kept_fraction=self.max_kept_fraction,
            permute=self.permute,
            scoring=self.scoring,
            antidiagonal_stride=self.antidiagonal_stride,
            keep_sink=self.keep_sink,
            tau_excludes_sink=self.tau_excludes_sink,
            exact_last_block=self.exact_last_block,
            dense_last_tokens=self.dense_last_tokens,
        )

    @classmethod
    def load(
        cls,
        additional_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> PBSConfig:
        """Build from vLLM's additional_config dict (its "pbs" key) and `PBS_*` variables."""
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        if not isinstance(section, Mapping):
            raise PBSConfigError(
                f"additional_config.pbs = {section!r}: must be a JSON object of PBS settings"
            )
        values = dict(section)
        names = {key: f"{ADDITIONAL_CONFIG_KEY}.{key}" for key in section}
        renamed = _rename_deprecated(values, names, lambda k: f"{ADDITIONAL_CONFIG_KEY}.{k}")
        env_values, env_names = _from_env(os.environ if env is None else env)
        renamed += _rename_deprecated(env_values, env_names, lambda k: ENV_PREFIX + k.upper())
        values.update(env_values)
        names.update(env_names)
        _warn_deprecated(renamed)
        try:
            return cls(**values)
        except ValidationError as e:
            raise PBSConfigError(_describe(e, values, names)) from None


_ALLOWED = {
    "block_size": "16, 32, 64, 128 or 256",
    "segment_size": "a positive multiple of block_size",
    "tau": "a number in (0, 1]",
    "max_kept_fraction": "a number in (0, 1], or null for no cap",
    "dense_fallback_len": "an integer >= 0",
    "dense_above": "'auto', a number in (0, 1], or null to never switch",
    "dense_last_tokens": "an integer >= 0",
    "dense_hold_steps": "an integer >= 1",
    "scoring": "'mean' or 'antidiagonal'",
    "antidiagonal_stride": "an integer >= 1 dividing block_size",
    "permute": "true or false",
    "keep_sink": "true or false",
    "tau_excludes_sink": "true or false (true needs keep_sink true)",
    "exact_last_block": "true or false",
    "stats_log_interval_s": "a number >= 0",
    "warmup": "true or false",
    "attention_kernel": "'auto', 'fa3' or 'triton'",
    "cuda_graphs": "true or false",
}


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Fields set through `PBS_<FIELD>`; values parsed as JSON when they are JSON.

    Other `PBS_*` variables (e.g. a PBS batch scheduler's `PBS_JOBID`) are ignored, unless
    the name is a near miss of a field (`PBS_TAUU`), which is reported as unknown.
    """
    values, names = {}, {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NON_FIELD_ENV:
            continue
        field = name[len(ENV_PREFIX) :].lower()
        known = field in PBSConfig.model_fields or field in DEPRECATED_NAMES
        if not known and not difflib.get_close_matches(
            field, PBSConfig.model_fields, n=1, cutoff=0.8
        ):
            continue
        if raw.strip().lower() in ("none", "null"):
            values[field] = None
        else:
            try:
                values[field] = json.loads(raw)
            except json.JSONDecodeError:
                values[field] = raw
        names[field] = name
    return values, names


def _rename_deprecated(
    values: dict[str, Any], names: dict[str, str], spell: Callable[[str], str]
) -> list[tuple[str, str]]:
    """Move the deprecated names of one source (`DEPRECATED_NAMES`) to the current ones, in
    place in `values` and in `names` (setting -> where it was given: `pbs.tau`, `PBS_TAU`);
    `spell` writes a setting's name the way this source does.

    Returns (where the old name was given, how to give the new one) per renamed setting;
    a source that gives both names of one setting is a PBSConfigError naming both.
    """
    renamed = []
    for old, new in DEPRECATED_NAMES.items():
        if old not in values:
            continue
        old_where, new_where = names.pop(old), spell(new)
        if new in values:
            raise PBSConfigError(
                f"invalid PBS configuration: {old_where} and {names[new]} are both given; "
                f"{old} is the deprecated name of {new}: give only {names[new]}"
            )
        values[new] = values.pop(old)
        names[new] = old_where
        renamed.append((old_where, new_where))
    return renamed


def _warn_deprecated(renamed: list[tuple[str, str]]) -> None:
    """One warning line for the deprecated names of a load, once per process."""
    if not renamed:
        return
    msg = "PBS configuration: " + "; ".join(
        f"{old} is deprecated, use {new} (same meaning)" for old, new in renamed
    )
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def _describe(err: ValidationError, values: Mapping[str, Any], names: Mapping[str, str]) -> str:
    """One message per problem: where it came from (`names`), field, value, what is allowed."""
    lines = []
    for item in err.errors(include_url=False):
        loc = [str(p) for p in item["loc"] if not str(p).startswith(("function-", "literal["))]
        field = loc[0] if loc else None
        where = names.get(field) if field else None
        where = where or (f"{ADDITIONAL_CONFIG_KEY}.{field}" if field else ADDITIONAL_CONFIG_KEY)
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(PBSConfig.model_fields)
            msg = f"unknown setting; allowed settings: {allowed}"
        if field is None:
            lines.append(f"{where}: {msg}")
            continue
        allowed = _ALLOWED.get(field)
        hint = f" (allowed: {allowed})" if allowed and item["type"] != "extra_forbidden" else ""
        lines.append(f"{where} = {values.get(field)!r}: {msg}{hint}")
    # pydantic can report one bad value once per union member; keep each line once.
    return "invalid PBS configuration: " + "; ".join(dict.fromkeys(lines))


def get_pbs_config(vllm_config: Any = None) -> PBSConfig:
    """The PBSConfig of a vLLM `VllmConfig` (its additional_config) plus the environment."""
    additional = getattr(vllm_config, "additional_config", None) if vllm_config else None
    return PBSConfig.load(additional if isinstance(additional, Mapping) else None)

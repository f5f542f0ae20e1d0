"""`PBSConfig`: the validated configuration of the PBS backend.

Sources, later ones winning: the defaults (mostly the paper's), vLLM's
`--additional-config '{"pbs": {...}}'`, then environment variables `PBS_<FIELD>`
(e.g. `PBS_TAU=0.95`, `PBS_MAX_DENSITY=none`). Any bad value fails with one
`PBSConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pbs_vllm.kernels.params import SparsityParams

ENV_PREFIX = "PBS_"
ADDITIONAL_CONFIG_KEY = "pbs"
# Environment variables that start with PBS_ but are not config fields.
_NON_FIELD_ENV = {"PBS_VLLM_CPU_PLATFORM"}


class PBSConfigError(ValueError):
    """An invalid PBS configuration; the message names field, value and what is allowed."""


class PBSConfig(BaseModel):
    """Settings of permuted block-sparse prefill (defaults: the paper's, except
    segment_size 512 and exact_last_block; docs/method.md lists the deviations)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    block_size: int = Field(128, description="Tokens per query/key block (power of two, 16-256).")
    segment_size: int = Field(
        512, description="Permutation segment length (multiple of block_size)."
    )
    tau: float = Field(0.9, gt=0.0, le=1.0, description="Cumulative block-probability threshold.")
    max_density: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Cap on kept fraction of candidate blocks (none = no cap).",
    )
    dense_fallback_len: int = Field(
        65536, ge=0, description="Prefills whose sequence is shorter than this run dense."
    )
    dense_above: float | None = Field(
        0.6,
        gt=0.0,
        le=1.0,
        description="A layer whose PBS masks keep at least this fraction of blocks runs the "
        "step's prefill on the stock kernel (none = never).",
    )
    dense_hold_steps: int = Field(
        8,
        ge=1,
        description="After a dense_above switch, the layer's prefill steps without decodes "
        "and without longer sequences stay on the stock kernel, unestimated, until this many "
        "(the switching one included) have run; 1 = estimate every step.",
    )
    scoring: Literal["mean", "antidiagonal"] = Field(
        "mean", description="Block scoring: mean pooling (PBS) or antidiagonal (PBS+)."
    )
    antidiagonal_stride: int = Field(8, ge=1, description="Antidiagonal sampling stride (PBS+).")
    permute: bool = Field(True, description="False = unpermuted block-sparse ablation.")
    keep_sink: bool = Field(True, description="Always keep the block holding token 0.")
    exact_last_block: bool = Field(
        True,
        description="A chunk's last query block selects by its queries' exact attention mass "
        "per permuted block (the importance scores) instead of pooled scores; false = the "
        "paper's pooled scores for every block.",
    )
    stats_log_interval_s: float = Field(
        10.0, ge=0.0, description="Seconds between density log lines (0 = off)."
    )
    warmup: bool = Field(
        True,
        description="Compile and tune the PBS kernels for the model's shape at start-up (GPU), "
        "so no request pays Triton's JIT compiles; false = compile on first use.",
    )
    attention_kernel: Literal["auto", "fa3", "triton"] = Field(
        "auto",
        description="Kernel that attends the PBS masks: fa3 (vLLM's FlashAttention-3 over a "
        "block-ordered copy of the selected keys; Hopper), triton (portable), auto = fa3 "
        "where it runs, else triton.",
    )

    cuda_graphs: bool = Field(
        True,
        description="Capture each prefill step's PBS work (estimation and FA3 attention) as "
        "CUDA graphs at its first layer and replay them for the other layers, so a layer "
        "costs a few launches of host time (fa3 attention kernel only); false = launch "
        "every kernel from Python in every layer.",
    )

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
            max_density=self.max_density,
            permute=self.permute,
            scoring=self.scoring,
            antidiagonal_stride=self.antidiagonal_stride,
            keep_sink=self.keep_sink,
            exact_last_block=self.exact_last_block,
        )

    @classmethod
    def load(
        cls,
        additional_config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> PBSConfig:
        """Build from vLLM's additional_config dict (its "pbs" key) and `PBS_*` variables."""
        values: dict[str, Any] = {}
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        if not isinstance(section, Mapping):
            raise PBSConfigError(
                f"additional_config.pbs = {section!r}: must be a JSON object of PBS settings"
            )
        values.update(section)
        env_values, env_names = _from_env(os.environ if env is None else env)
        values.update(env_values)
        try:
            return cls(**values)
        except ValidationError as e:
            raise PBSConfigError(_describe(e, values, env_names)) from None


_ALLOWED = {
    "block_size": "16, 32, 64, 128 or 256",
    "segment_size": "a positive multiple of block_size",
    "tau": "a number in (0, 1]",
    "max_density": "a number in (0, 1], or null for no cap",
    "dense_fallback_len": "an integer >= 0",
    "dense_above": "a number in (0, 1], or null to never switch",
    "dense_hold_steps": "an integer >= 1",
    "scoring": "'mean' or 'antidiagonal'",
    "antidiagonal_stride": "an integer >= 1 dividing block_size",
    "permute": "true or false",
    "keep_sink": "true or false",
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
        if field not in PBSConfig.model_fields and not difflib.get_close_matches(
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


def _describe(err: ValidationError, values: Mapping[str, Any], env_names: Mapping[str, str]) -> str:
    """One message per problem: where it came from, field, value, what is allowed."""
    lines = []
    for item in err.errors(include_url=False):
        loc = [str(p) for p in item["loc"] if not str(p).startswith(("function-", "literal["))]
        field = loc[0] if loc else None
        where = env_names.get(field) if field else None
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

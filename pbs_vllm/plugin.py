"""vLLM entry points: make `--attention-backend pbs` (and `CUSTOM`) select the PBS backend.

vLLM parses `--attention-backend X` as `AttentionBackendEnum[X.upper()]` and the attention
layer later does `AttentionBackendEnum[backend.get_name()]`. Enum members are pickled by
value, so a brand-new member would not unpickle in spawned or Ray workers that had not
added it first. Instead we register our class as the enum's `CUSTOM` member (which exists
in every process) and add `PBS` as an alias *name* of that member: the CLI accepts `pbs`,
what travels between processes is plain `CUSTOM`, and our backend's `get_name()` returns
"CUSTOM". Both entry points below are idempotent and run in every vLLM process:
`vllm.general_plugins` when vLLM loads plugins, `vllm.platform_plugins` earlier, when the
current platform is resolved (before any config is unpickled in a worker).
"""

from __future__ import annotations

import logging
import os

BACKEND_NAME = "PBS"
BACKEND_CLASS_PATH = "pbs_vllm.backend.pbs_attn.PBSAttentionBackend"
CPU_PLATFORM_PATH = "pbs_vllm.backend.cpu_platform.PBSCpuPlatform"
CPU_PLATFORM_ENV = "PBS_VLLM_CPU_PLATFORM"

logger = logging.getLogger(__name__)


def register() -> None:
    """Register the PBS backend as `CUSTOM` and alias the name `PBS` to it (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    current = custom.get_path() if custom.is_overridden() else None
    if current not in (None, BACKEND_CLASS_PATH):
        logger.warning(
            "pbs-vllm: attention backend CUSTOM was registered to %s; re-registering it to %s",
            current,
            BACKEND_CLASS_PATH,
        )
    if current != BACKEND_CLASS_PATH:
        register_backend(custom, BACKEND_CLASS_PATH)
    if AttentionBackendEnum._member_map_.get(BACKEND_NAME) is not custom:
        # An alias: a second name for the CUSTOM member, like `Enum` aliases declared in
        # the class body. It is never pickled under this name.
        AttentionBackendEnum._member_map_[BACKEND_NAME] = custom
        type.__setattr__(AttentionBackendEnum, BACKEND_NAME, custom)


def platform_plugin() -> str | None:
    """`vllm.platform_plugins` entry: register early; pick the CPU platform on request.

    vLLM's CpuPlatform always chooses its own attention backend. With
    `PBS_VLLM_CPU_PLATFORM=1` this returns a CpuPlatform subclass that honours
    `--attention-backend pbs`; otherwise None, leaving platform detection to vLLM.
    """
    register()
    if os.environ.get(CPU_PLATFORM_ENV, "0") == "1":
        return CPU_PLATFORM_PATH
    return None

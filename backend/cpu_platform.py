"""`PBSCpuPlatform`: vLLM's CPU platform, except that it honours `--attention-backend pbs`.

vLLM's `CpuPlatform.get_attn_backend_cls` always answers CPU_ATTN (or an MLA backend),
whatever the user selected. This subclass returns the PBS backend when the user selected
it (the `CUSTOM` member, of which `PBS` is an alias) and defers to `CpuPlatform` for
everything else. It is activated by `pbs_vllm.plugin.platform_plugin` when
`PBS_VLLM_CPU_PLATFORM=1` (do not also set `VLLM_TARGET_DEVICE=cpu`: that makes vLLM skip
platform plugins).
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum


class PBSCpuPlatform(CpuPlatform):
    """CpuPlatform whose attention-backend selection knows the PBS backend."""

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
            return AttentionBackendEnum.CUSTOM.get_path()
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

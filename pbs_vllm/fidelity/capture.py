"""A real model's attention inputs, captured for offline mask studies (CPU, transformers).

`capture_qkv` runs a Hugging Face causal LM once over a prompt in float32 and records, for
every layer, the post-RoPE q, k, v its attention function receives and the attention
output it returns. Attention runs through PyTorch's fused causal SDPA (memory linear in the
prompt length, so 16K-32K prompts fit on a 24 GiB machine), registered as a transformers
attention implementation. `cached_capture` keeps the result in a .pt file.
"""

from __future__ import annotations

import os

import torch

from pbs_vllm.evals import ruler


def load_prompt_ids(model: str, task: str, length: int, seed: int, index: int):
    """Prompt `index` of the RULER-style `task` at `length` (a `ruler` sample: token ids
    exactly as `benchmarks/bench_ruler.py` feeds them, chat template, answer reserved)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    sample = ruler.make_prompts(task, tok, length, index + 1, seed, reserve_output=True)[index]
    return sample


def capture_qkv(model_path: str, ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per layer: q [N, Hq, D], k, v [N, Hkv, D] (post-RoPE, as handed to the attention
    function) and out [N, Hq, D], the attention output before o_proj, from one float32
    forward over `ids`. Attention runs through PyTorch's fused causal SDPA (memory linear
    in N, so 16K-32K prompts fit), registered as a transformers attention implementation
    that records its inputs."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface

    captured: list[dict[str, torch.Tensor]] = []

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if scaling is None or abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
            raise ValueError(f"scaling {scaling} is not 1/sqrt(head_dim)")
        if kwargs.get("sliding_window") is not None:
            raise ValueError("sliding-window layer: dense causal reference does not apply")
        if attention_mask is not None:
            raise ValueError("capture expects no attention mask (one unpadded prompt)")
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        ).transpose(1, 2)  # [B, N, H, D], as transformers' implementations return it
        captured.append(
            {
                "q": query[0].transpose(0, 1).contiguous(),
                "k": key[0].transpose(0, 1).contiguous(),
                "v": value[0].transpose(0, 1).contiguous(),
                "out": out[0].contiguous(),
            }
        )
        return out, None

    AttentionInterface.register("pbs_capture", capture)
    AttentionMaskInterface.register("pbs_capture", lambda *args, **kwargs: None)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="pbs_capture"
    ).eval()
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids]), use_cache=False)
    if len(captured) != model.config.num_hidden_layers:
        raise RuntimeError(f"captured {len(captured)} layers of {model.config.num_hidden_layers}")
    return captured


def cached_capture(model_path: str, ids: list[int], cache: str | None):
    """`capture_qkv`, saved to / loaded from `cache` (a .pt file; its token ids must be
    `ids`, else ValueError). None: no cache."""
    if cache and os.path.exists(cache):
        saved = torch.load(cache)
        if saved["ids"] != list(ids) or saved["model"] != os.path.abspath(model_path):
            raise ValueError(f"{cache} holds another prompt or model; delete it or pick another")
        return saved["layers"]
    layers = capture_qkv(model_path, ids)
    if cache:
        torch.save(
            {"ids": list(ids), "model": os.path.abspath(model_path), "layers": layers}, cache
        )
    return layers

"""Captured q, k, v reproduce the attention output the model computed; the cache refuses
another prompt."""

from __future__ import annotations

import pytest
import torch

from pbs_vllm.fidelity.capture import cached_capture, capture_qkv
from pbs_vllm.fidelity.metrics import attend, dense_probs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(path)
    return str(path)


def test_captured_inputs_reproduce_the_attention_output(tiny_qwen, gen):
    ids = torch.randint(0, 128, (77,), generator=gen).tolist()
    layers = capture_qkv(tiny_qwen, ids)
    assert len(layers) == 2
    for cap in layers:
        q, k, v, out = cap["q"], cap["k"], cap["v"], cap["out"]
        assert q.shape == (77, 4, 16) and k.shape == v.shape == (77, 2, 16)
        ref = attend(dense_probs(q, k, 16**-0.5), v)
        assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    # layer 1's inputs depend on layer 0's output: the capture did not change the forward
    assert not torch.equal(layers[0]["q"], layers[1]["q"])


def test_cache_round_trip_and_mismatch(tiny_qwen, tmp_path, gen):
    ids = torch.randint(0, 128, (40,), generator=gen).tolist()
    path = str(tmp_path / "cap.pt")
    first = cached_capture(tiny_qwen, ids, path)
    again = cached_capture(tiny_qwen, ids, path)
    assert all(torch.equal(a["q"], b["q"]) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="another prompt or model"):
        cached_capture(tiny_qwen, ids[:-1], path)

"""The training model exports to a folder that `transformers` loads with identical logits,
and whose tokenizer maps the task's text to exactly the generator's token ids."""

from __future__ import annotations

import pytest
import torch

from training.export import export_hf, load_exported
from training.model import ModelConfig, RetrievalLlama
from training.retrieval_data import eval_prompts, sample_batch
from training.vocab import VOCAB

transformers = pytest.importorskip("transformers")

SMALL = ModelConfig(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10_000.0,
)


@pytest.fixture
def exported(tmp_path, gen):
    """A random SMALL model with non-trivial norms, exported; returns (folder, model)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = RetrievalLlama(SMALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger weights than the init so attention is sharp and every layer matters.
            p.mul_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else 10.0)
    export_hf(model, tmp_path)
    return tmp_path, load_exported(tmp_path)


def test_transformers_logits_match(exported, gen):
    folder, ours = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tokens = sample_batch(2, 96, 6, gen).tokens
    with torch.no_grad():
        expected = ours(tokens)
        got = hf(tokens).logits
    assert torch.isfinite(expected).all()
    assert expected.std() > 0.5, "degenerate logits make the comparison meaningless"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_export_round_trips_fp16_weights(exported):
    folder, reloaded = exported
    again = load_exported(folder)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(v.dtype == torch.float32 for v in reloaded.state_dict().values())


def test_tokenizer_round_trip(exported):
    folder, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompts, answers = eval_prompts(3, 200, 8, seed=17)
    for ids, answer in zip(prompts, answers):
        text = tok.decode(ids, skip_special_tokens=True)
        assert tok(text).input_ids == ids
        assert tok.decode([answer]) == tok.convert_ids_to_tokens(answer)
        assert text.endswith(":") and tok.convert_ids_to_tokens(answer).startswith("V")
    assert len(tok) == VOCAB.size


def test_prompts_follow_the_task_layout(gen):
    b = sample_batch(4, 300, 10, gen)
    rows = torch.arange(4)[:, None]
    assert b.tokens.shape == (4, 300)
    assert (b.tokens[:, 0] == VOCAB.bos).all()
    assert (b.query_pos[:, -1] == 299).all()
    assert (b.tokens[rows, b.query_pos] == VOCAB.sep).all()
    for r in range(4):
        seq = b.tokens[r].tolist()
        for q, pos in enumerate(b.query_pos[r].tolist()):
            key = seq[pos - 1]
            context = seq[: 1 + 300 - 4 * 10]  # <s> + context
            starts = [i for i, t in enumerate(context) if t == key]
            assert len(starts) == 1, "every queried key appears once in the context"
            assert context[starts[0] + 1] == VOCAB.sep
            assert context[starts[0] + 2] == b.answers[r, q]
            if q < 9:
                assert seq[pos + 1] == b.answers[r, q], "earlier answers are in the prompt"
    keys = (b.tokens >= VOCAB.key0) & (b.tokens < VOCAB.value0)
    assert (keys.sum(1) == 20).all(), "10 needles + 10 queries"


def test_too_short_length_is_rejected(gen):
    with pytest.raises(ValueError, match="length=20: too short for 4 needles"):
        sample_batch(1, 20, 4, gen)

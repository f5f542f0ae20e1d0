"""Generate the embedded test model `pbs_vllm/models/tiny-llama/` (deterministic).

    python -m pbs_vllm.models.make_tiny_llama [OUT_DIR]

A 2-layer LlamaForCausalLM (hidden 256, 4 query / 2 KV heads, head_dim 64, 8192
positions) with seeded random fp16 weights, plus a byte-level BPE tokenizer trained with
the `tokenizers` library on the built-in text below. The text it generates is noise; it
exists so vLLM can start and run every attention path on a laptop. Weight scales are
chosen so attention is not flat and logits have clear top-1 margins, which keeps greedy
decoding stable across attention backends.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
TOKENIZER_VOCAB = 1000
SEED = 20251024
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)

_TEXT = """\
Permuted block sparse attention reorders the keys inside each segment so that the keys a
query block needs gather into a few blocks. The query blocks stay in their original order,
so the output needs no reordering. A paged cache keeps keys and values in pages of a fixed
number of tokens; a block table maps every sequence to its pages. Prefill reads the prompt
in chunks, decode adds one token at a time, and both find earlier tokens through the pages.
The quick brown fox jumps over the lazy dog while the server answers one more request.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1024 4096 8192 appear in logs, shapes and configs.
"""


def corpus():
    """Built-in training text: the paragraph above, its sentences shuffled, and symbols."""
    sentences = [s.strip() for s in _TEXT.replace("\n", " ").split(".") if s.strip()]
    for i in range(400):
        yield ". ".join(sentences[(i * 3 + k) % len(sentences)] for k in range(3)) + "."
    yield "".join(chr(c) for c in range(32, 127))


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def build_weights(vocab: int) -> dict[str, torch.Tensor]:
    """Seeded random fp16 weights in Hugging Face Llama naming."""
    gen = torch.Generator().manual_seed(SEED)
    h, f = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    d, nq, nkv = CONFIG["head_dim"], CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).half()

    w = {
        "model.embed_tokens.weight": rand(vocab, h, std=1.0),
        "model.norm.weight": torch.ones(h, dtype=torch.float16),
        "lm_head.weight": rand(vocab, h, std=0.25),
    }
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        w[p + "self_attn.q_proj.weight"] = rand(nq * d, h, std=0.08)
        w[p + "self_attn.k_proj.weight"] = rand(nkv * d, h, std=0.08)
        w[p + "self_attn.v_proj.weight"] = rand(nkv * d, h, std=h**-0.5)
        w[p + "self_attn.o_proj.weight"] = rand(h, nq * d, std=(nq * d) ** -0.5)
        w[p + "mlp.gate_proj.weight"] = rand(f, h, std=h**-0.5)
        w[p + "mlp.up_proj.weight"] = rand(f, h, std=h**-0.5)
        w[p + "mlp.down_proj.weight"] = rand(h, f, std=f**-0.5)
    return w


def write_model(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    bos, eos, pad = (tok.token_to_id(t) for t in (BOS, EOS, PAD))
    vocab = -(-tok.get_vocab_size() // 64) * 64
    special = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    config = {**CONFIG, "vocab_size": vocab, **special}
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    for name, data in [
        ("config.json", config),
        ("generation_config.json", special),
        ("tokenizer_config.json", tok_config),
    ]:
        (out / name).write_text(json.dumps(data, indent=1) + "\n")
    weights = out / "model.safetensors"
    save_file(build_weights(vocab), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path(__file__).resolve().parent / "tiny-llama"
    write_model(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Write a trained `RetrievalLlama` as a Hugging Face / vLLM model folder (fp16 safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.model import ModelConfig, RetrievalLlama
from training.vocab import BOS, EOS, PAD, UNK, VOCAB, build_tokenizer

WEIGHTS = "model.safetensors"


def export_hf(model: RetrievalLlama, out: Path) -> None:
    """Write config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
    model.safetensors (fp16) of `model` into `out` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    special = {"bos_token_id": VOCAB.bos, "eos_token_id": VOCAB.eos, "pad_token_id": VOCAB.pad}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "model_max_length": c.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    files = {
        "config.json": c.hf_config(VOCAB.bos, VOCAB.eos, VOCAB.pad),
        "generation_config.json": {**special, "do_sample": False},
        "tokenizer_config.json": tokenizer_config,
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=1) + "\n")
    build_tokenizer().save(str(out / "tokenizer.json"))
    weights = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()
    }
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / WEIGHTS).chmod(0o644)  # safetensors writes 0600; the file ships as package data


def load_exported(folder: Path, device: torch.device | str = "cpu") -> RetrievalLlama:
    """Rebuild a `RetrievalLlama` (fp32) from a folder written by `export_hf`."""
    cfg = json.loads((folder / "config.json").read_text())
    fields = {k: cfg[k] for k in ModelConfig.__dataclass_fields__}
    model = RetrievalLlama(ModelConfig(**fields))
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
    return model.to(device)

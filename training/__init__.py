"""Training of the shipped retrieval model `pbs_vllm/models/retrieval-llama` (GPU, minutes).

    python -m training.train --out OUT/retrieval-llama --minutes 7

Modules: `vocab` (word-level vocabulary and tokenizer), `retrieval_data` (synthetic
key-value recall prompts), `model` (a small Llama in plain PyTorch with Hugging Face
parameter names), `export` (Hugging Face folder writer), `train` (the time-budgeted run).
"""

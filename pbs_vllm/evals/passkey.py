"""Pass-key retrieval prompts through a model's chat template: filler text with one key
sentence at a chosen depth (the CPU real-model benchmark and its engine test).

Nothing here imports vLLM; `tokenizer` is any Hugging Face tokenizer with a chat template.
"""

from __future__ import annotations

# The small real model these prompts are run on in CI (`pbs-vllm fetch-model` name).
CPU_MODEL = "smollm2-135m-instruct"

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_messages(tokenizer, n_tokens: int, key: int, depth: float) -> list[dict]:
    """Chat messages of a pass-key prompt of at least n_tokens tokens (chat template
    included; a few more at most): filler text with the key sentence at `depth` (0 = start,
    1 = end)."""
    intro = (
        "There is a pass key hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the pass key.\n"
    )
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? Answer with the number only."

    def messages(n_fill: int) -> list[dict]:
        at = round(n_fill * depth)
        text = intro + FILLER * at + needle + FILLER * (n_fill - at) + question
        return [{"role": "user", "content": text}]

    per_filler = len(tokenizer.encode(FILLER * 20)) / 20
    n_fill = max(0, int((n_tokens - len(chat_ids(tokenizer, messages(0)))) / per_filler))
    while len(chat_ids(tokenizer, messages(n_fill))) < n_tokens:
        n_fill += 1
    return messages(n_fill)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` through the model's chat template, generation prompt added."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def passkey_prompt(tokenizer, n_tokens: int, key: int, depth: float) -> list[int]:
    """Token ids of `passkey_messages` through the model's chat template."""
    return chat_ids(tokenizer, passkey_messages(tokenizer, n_tokens, key, depth))

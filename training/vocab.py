"""The fixed word-level vocabulary of the retrieval task and its `tokenizers` tokenizer.

Every token is one whitespace-separated word, so text <-> ids is exact both ways:
specials `<s> </s> <pad> <unk>`, the query marker `<q>`, the separator `:`, keys
`K000..K511`, values `V000..V511` and filler words `w000..w999`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, models, pre_tokenizers, processors

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
QUERY, SEP = "<q>", ":"
NUM_KEYS, NUM_VALUES, NUM_FILLER = 512, 512, 1000


@dataclass(frozen=True)
class Vocab:
    """Token ids of the task; keys, values and filler are contiguous id ranges."""

    bos: int = 0
    eos: int = 1
    pad: int = 2
    unk: int = 3
    query: int = 4
    sep: int = 5
    key0: int = 6
    value0: int = 6 + NUM_KEYS
    filler0: int = 6 + NUM_KEYS + NUM_VALUES
    size: int = 6 + NUM_KEYS + NUM_VALUES + NUM_FILLER


VOCAB = Vocab()


def words() -> list[str]:
    """All tokens, index = token id."""
    return (
        [BOS, EOS, PAD, UNK, QUERY, SEP]
        + [f"K{i:03d}" for i in range(NUM_KEYS)]
        + [f"V{i:03d}" for i in range(NUM_VALUES)]
        + [f"w{i:03d}" for i in range(NUM_FILLER)]
    )


def build_tokenizer() -> Tokenizer:
    """WordLevel tokenizer over `words()`: encoding prepends `<s>`; decoding (no decoder set)
    joins words with single spaces."""
    table = words()
    assert len(table) == VOCAB.size
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(table)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, VOCAB.bos)]
    )
    tok.add_special_tokens([BOS, EOS, PAD, UNK])
    return tok

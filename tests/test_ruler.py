"""RULER-style prompt generators (`pbs_vllm.evals.ruler`) with the shipped tiny tokenizer:
token budgets, answers in the prompt, determinism, scoring, errors."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from pbs_vllm.evals import ruler

TOKENIZER_DIR = Path(ruler.__file__).resolve().parents[1] / "models" / "tiny-llama"
LENGTHS = (512, 1500)
# At 512 tokens some tasks' fixed parts (several needles, the cwe list) do not fit with
# this tokenizer's tiny vocabulary: those are built at the longer length only.
SHORT_OK = ("niah_single_noise", "niah_single_code", "niah_multikey", "vt")


@pytest.fixture(scope="module")
def tok():
    """AutoTokenizer of the tiny model's folder: fast tokenizer and chat template."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def plain_tok():
    """The same tokenizer.json without the folder's chat template."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"), bos_token="<s>"
    )


def _cases():
    for task in ruler.TASKS:
        for length in LENGTHS:
            if length < 1000 and task not in SHORT_OK:
                continue
            yield task, length


@pytest.fixture(scope="module")
def built(tok):
    """(task, length) -> 3 samples, seed 0."""
    return {(t, n): ruler.make_prompts(t, tok, n, 3, seed=0) for t, n in _cases()}


@pytest.mark.parametrize(("task", "length"), list(_cases()))
def test_prompt_fits_length(built, tok, task, length):
    for s in built[(task, length)]:
        assert s.target_tokens == length
        assert 0.97 * length <= s.num_tokens <= length, (s.key, s.num_tokens)
        # The ids are the measured prompt: the text re-encoded (template holds the BOS).
        assert tok.encode(s.prompt_text, add_special_tokens=False) == s.prompt_token_ids
        assert s.prompt_token_ids.count(tok.bos_token_id) == 1
        assert s.max_new_tokens == ruler.MAX_NEW_TOKENS[task]
        assert s.key == f"{task}/{length}/{s.index}"


@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t != "cwe"])
def test_answers_in_prompt(built, task):
    for s in built[(task, 1500)]:
        assert s.answers
        for a in s.answers:
            assert a in s.prompt_text, (s.key, a)
        # The model is asked about the answers without being told them after the text.
        question = s.prompt_text.rsplit("\n\n", 1)[-1]
        assert not any(a in question for a in s.answers)


def test_niah_needles_and_code_haystack(built):
    s = built[("niah_single_code", 1500)][0]
    assert s.meta["haystack"] == "python-stdlib"
    assert f"# One of the special magic numbers for {s.meta['keys'][0]} is: " in s.prompt_text
    assert "def " in s.prompt_text or "import " in s.prompt_text
    mk = built[("niah_multikey", 1500)][0]
    assert len(set(mk.meta["keys"])) == ruler.NUM_NEEDLES and mk.answers == mk.meta["values"][:1]
    mv = built[("niah_multivalue", 1500)][0]
    assert len(set(mv.meta["keys"])) == 1 and mv.answers == mv.meta["values"]
    assert len(set(mv.answers)) == ruler.NUM_NEEDLES
    mq = built[("niah_multiquery", 1500)][0]
    assert mq.answers == mq.meta["values"] and all(k in mq.prompt_text for k in mq.meta["keys"])


def test_vt_chain_in_order(built):
    for s in built[("vt", 1500)] + built[("vt", 512)]:
        chain = s.meta["chains"][0]
        assert s.answers == chain["names"]
        text = s.prompt_text
        pos = [text.index(f"VAR {chain['names'][0]} = {chain['value']}.")]
        for a, b in zip(chain["names"], chain["names"][1:]):
            pos.append(text.index(f"VAR {b} = VAR {a}."))
        assert pos == sorted(pos), s.key  # every name is bound before it is used


def test_cwe_common_words_are_most_frequent(built):
    for s in built[("cwe", 1500)]:
        words = re.findall(r"^\d+\. (\w+)$", s.prompt_text, flags=re.MULTILINE)
        assert words == s.meta["words"]
        counts = Counter(words)
        common = set(s.answers)
        assert len(common) == ruler.CWE_COMMON
        least_common = min(counts[w] for w in common)
        most_rare = max(c for w, c in counts.items() if w not in common)
        assert least_common > most_rare
        assert {w for w, _ in counts.most_common(ruler.CWE_COMMON)} == common


def test_deterministic_per_seed(tok, built):
    again = ruler.make_prompts("niah_multikey", tok, 1500, 3, seed=0)
    assert [s.prompt_token_ids for s in again] == [
        s.prompt_token_ids for s in built[("niah_multikey", 1500)]
    ]
    other = ruler.make_prompts("niah_multikey", tok, 1500, 3, seed=1)
    assert all(a.prompt_text != b.prompt_text for a, b in zip(again, other))
    assert all(a.answers != b.answers for a, b in zip(again, other))
    # Samples of one seed differ from each other.
    assert len({s.prompt_text for s in again}) == 3


def test_reserve_output(tok):
    for task in ("niah_single_noise", "vt", "cwe"):
        (s,) = ruler.make_prompts(task, tok, 1500, 1, reserve_output=True)
        target = 1500 - ruler.MAX_NEW_TOKENS[task]
        assert s.length == 1500 and s.target_tokens == target
        assert 0.97 * target <= s.num_tokens <= target
        assert s.num_tokens + s.max_new_tokens <= 1500


def test_without_chat_template(plain_tok):
    assert not plain_tok.chat_template
    (s,) = ruler.make_prompts("niah_single_noise", plain_tok, 512, 1)
    assert 0.97 * 512 <= s.num_tokens <= 512
    assert s.prompt_text.endswith(f"The special magic number for {s.meta['keys'][0]} is:")
    assert s.prompt_token_ids[0] == plain_tok.bos_token_id
    assert s.answers[0] in s.prompt_text


def test_score():
    refs = ["1234567", "7654321"]
    assert ruler.score(refs, "the numbers are 1234567 and 7654321.") == 1.0
    assert ruler.score(refs, "only 7654321") == 0.5
    assert ruler.score(refs, "none here") == 0.0
    assert ruler.score(["ABCDE", "FGHIJ"], "abcde, fghij") == 1.0  # case-insensitive
    assert ruler.score(["apple"], "APPLE") == 1.0
    s = ruler.Sample("vt", 8, 0, 0, "p", [0], ["XQ", "ZZ"], 4, 8)
    assert ruler.score(s, "xq") == 0.5
    with pytest.raises(ValueError, match="no reference"):
        ruler.score([], "x")
    samples = [s, ruler.Sample("vt", 8, 1, 0, "p", [0], ["AB"], 4, 8)]
    assert ruler.mean_scores(samples, ["xq zz", "no"]) == {("vt", 8): 0.5}


def test_jsonl_roundtrip(tmp_path, built):
    samples = built[("vt", 512)]
    ruler.write_jsonl(tmp_path / "p.jsonl", samples)
    assert ruler.read_jsonl(tmp_path / "p.jsonl") == samples


def test_parse_length_and_tasks():
    assert ruler.parse_length("8k") == 8192
    assert ruler.parse_length(" 16K ") == 16384
    assert ruler.parse_length("1.5k") == 1536
    assert ruler.parse_length("4096") == 4096
    assert ruler.parse_length(100) == 100
    assert ruler.parse_lengths("8k,1k,8192") == [8192, 1024]
    for bad in ("eightk", "8kk", "", "0", "-4k"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            ruler.parse_length(bad)
    assert ruler.parse_tasks("all") == list(ruler.TASKS)
    assert ruler.parse_tasks("vt, cwe,vt") == ["vt", "cwe"]
    with pytest.raises(ValueError, match="niah_bogus.*allowed: all, niah_single_noise"):
        ruler.parse_tasks("vt,niah_bogus")


def test_errors_name_the_value(tok):
    with pytest.raises(ValueError, match="'qa_hotpot'.*allowed: niah_single_noise"):
        ruler.make_prompts("qa_hotpot", tok, 1024, 1)
    with pytest.raises(ValueError, match="'12q'"):
        ruler.make_prompts("vt", tok, "12q", 1)
    with pytest.raises(ValueError, match="niah_multiquery at length 300: target 300 tokens"):
        ruler.make_prompts("niah_multiquery", tok, 300, 1)
    with pytest.raises(ValueError, match="length 100 leaves no room for the cwe prompt"):
        ruler.make_prompts("cwe", tok, 100, 1, reserve_output=True)

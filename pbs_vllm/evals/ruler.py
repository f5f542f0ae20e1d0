"""RULER-style synthetic long-context tasks: prompt generators and string-match scoring.

Re-implemented from the description of NVIDIA's RULER benchmark (Hsieh et al., 2024); no
code or text taken from it. Pure Python: the only outside object is the tokenizer passed
in (HF-style: `encode(text, add_special_tokens=...)`, optional `chat_template` /
`apply_chat_template`), which measures every prompt.

Tasks (`TASKS`):
- `niah_single_noise`: one needle ("One of the special magic numbers for KEY is: N.")
  at a random depth of repeated filler sentences; asked for N.
- `niah_single_code`: the same needle, as a `#` comment line, in a haystack of real Python
  source: the standard-library files of the running interpreter, read in sorted module
  order (no downloads; the haystack therefore depends on the Python version installed).
- `niah_multikey`: 4 needles with different keys, one asked (3 distractors).
- `niah_multivalue`: 4 needles with the same key and different numbers; all 4 asked.
- `niah_multiquery`: 4 needles with different keys; all 4 keys asked at once.
- `vt` (variable tracking): chains `VAR A = 12345.`, `VAR B = VAR A.`, ... (2 chains of
  4 hops, one asked) spread in order over filler sentences; asked for every name bound to
  the asked value.
- `cwe` (common words extraction): a numbered list of words in which 10 common words
  appear many times (up to 30) and every other word only a few times (3, or 1 in short
  prompts); asked for the 10 most common.

Every prompt is fitted to a token target: the filler (sentences, code lines, list words)
grows until one more unit would pass the target, then (sentences and code lines) the
words of the next unit are added as far as they fit at the end of the haystack, all
measured on the final prompt, chat template and answer prefix included, so a prompt is
never over the target and lands within about 1% under it. With `reserve_output=True` the
target is `length - max_new_tokens` (RULER's convention: prompt and answer together fit in
`length`).

The prompt is wrapped in the tokenizer's chat template when it has one (one user turn,
generation prompt), followed by an answer prefix ("The special magic number for KEY is")
that starts the assistant's reply. `Sample.prompt_token_ids` are the exact ids that were
measured: feed those to the engine (the text, re-tokenised with special tokens, can gain
a second BOS).

Scoring is RULER's string match: the fraction of reference strings found in the output
(case-insensitive), per prompt; a task's score is the mean over its prompts.
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

TASKS: tuple[str, ...] = (
    "niah_single_noise",
    "niah_single_code",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
)

# Tokens generated per task (the answers need far fewer; RULER's budgets, vt doubled for
# the longer variable names of BPE vocabularies).
MAX_NEW_TOKENS: dict[str, int] = {
    "niah_single_noise": 128,
    "niah_single_code": 128,
    "niah_multikey": 128,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "vt": 64,
    "cwe": 120,
}

# Bump when a change alters the generated prompts (invalidates cached prompt files).
PROMPT_VERSION = "2"

NUM_NEEDLES = 4  # multikey / multivalue / multiquery
VT_CHAINS = 2
VT_HOPS = 4
CWE_COMMON = 10
CWE_FREQ_COMMON = 30
CWE_FREQ_RARE = 3

# Written for this module: plain filler sentences, cycled (the "noise" haystack).
FILLER = (
    "The river runs past the old mill.",
    "A light wind moves over the field.",
    "The road turns left at the stone bridge.",
    "Clouds gather slowly above the hills.",
    "The village is quiet in the evening.",
    "Birds rest on the roof of the barn.",
)

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
    "kind", "lively", "mellow", "narrow", "odd", "proud", "quiet", "rapid", "shiny", "tidy",
    "upbeat", "vivid", "wary", "young", "zesty", "bitter", "crisp", "damp", "faint", "grand",
    "humble", "loyal", "misty", "noble", "plain", "royal", "silent", "tender", "wild", "woolly",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "rocket",
    "saddle", "tunnel", "umbrella", "valley", "walnut", "yacht", "zipper", "basket", "castle",
    "desert", "feather", "glacier", "hammer", "ladder", "mirror", "pillow", "ribbon", "spider",
    "teapot", "violin", "window", "compass",
)  # fmt: skip
# Common words of the cwe task: real English words, none a substring of another.
_COMMON_WORDS = (
    "apple", "bridge", "cloud", "dragon", "forest", "guitar", "honey", "jungle", "kitten",
    "lemon", "monkey", "ocean", "planet", "rabbit", "silver", "tiger", "velvet", "winter",
    "yellow", "zebra", "butter", "copper", "flower", "marble", "orange", "pirate", "sunset",
    "thunder", "wizard", "bottle",
)  # fmt: skip
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class Sample:
    """One prompt with its references. `length` is the nominal length asked for,
    `target_tokens` the prompt's token budget, `num_tokens` what it measured."""

    task: str
    length: int
    index: int
    seed: int
    prompt_text: str
    prompt_token_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    target_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def key(self) -> str:
        """Identifies the sample across settings: task, length and index."""
        return f"{self.task}/{self.length}/{self.index}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(**d)


def parse_length(text: str | int) -> int:
    """`8k` -> 8192, `1.5k` -> 1536, `8192` -> 8192; anything else, or a length below 1,
    is a ValueError naming the value."""
    if isinstance(text, bool):
        raise ValueError(f"bad length {text!r}: expected a token count such as 8192 or 8k")
    if isinstance(text, int):
        n = text
    else:
        t = str(text).strip().lower()
        try:
            n = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
        except ValueError:
            raise ValueError(
                f"bad length {text!r}: expected a token count such as 8192 or 8k"
            ) from None
    if n < 1:
        raise ValueError(f"bad length {text!r}: must be at least 1 token")
    return n


def parse_lengths(text: str) -> list[int]:
    """`8k,16k,32k` -> [8192, 16384, 32768] (order kept, duplicates dropped)."""
    out = [parse_length(t) for t in text.split(",") if t.strip()]
    if not out:
        raise ValueError(f"no lengths in {text!r}")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------- scoring


def score(sample: Sample | Sequence[str], output_text: str) -> float:
    """RULER string match: fraction of the references present in `output_text`
    (case-insensitive). `sample` may be a Sample or a list of reference strings."""
    refs = sample.answers if isinstance(sample, Sample) else list(sample)
    if not refs:
        raise ValueError("sample has no reference answers")
    out = output_text.lower()
    return sum(1.0 for r in refs if r.lower() in out) / len(refs)


def mean_scores(samples: Sequence[Sample], outputs: Sequence[str]) -> dict[tuple[str, int], float]:
    """Mean score per (task, length)."""
    acc: dict[tuple[str, int], list[float]] = {}
    for s, o in zip(samples, outputs, strict=True):
        acc.setdefault((s.task, s.length), []).append(score(s, o))
    return {k: sum(v) / len(v) for k, v in acc.items()}


# ---------------------------------------------------------------------------- rendering


class _Renderer:
    """Body text -> (prompt text, token ids), chat template and answer prefix included."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def __call__(self, body: str, answer_prefix: str) -> tuple[str, list[int]]:
        if self.templated:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )
            text += answer_prefix
            # The template already holds any BOS / special tokens as text.
            ids = self.tok.encode(text, add_special_tokens=False)
        else:
            text = f"{body}\n\n{answer_prefix}"
            ids = self.tok.encode(text)
        return text, list(ids)


def _fit(
    render_k: Callable[[int], tuple[str, list[int]]],
    target: int,
    k_max: int,
    rate_hint: float,
) -> tuple[int, tuple[str, list[int]]]:
    """Largest filler count k (0..k_max) whose prompt has at most `target` tokens.

    Secant steps on the measured token counts, kept inside the bracket (lo, hi) of
    measured counts (at most 4x lo + 64 while no count above the target is known), so
    every step measures a new k and narrows the search; stops once a fitting prompt is
    within 0.5% of the target or the bracket closes. Only measured prompts are returned,
    so the result is never over the target (BPE counts are near-monotone in k, which only
    matters for how close under the target the result lands).
    """
    cache: dict[int, tuple[str, list[int]]] = {}

    def n_of(k: int) -> int:
        if k not in cache:
            cache[k] = render_k(k)
        return len(cache[k][1])

    n0 = n_of(0)
    if n0 > target:
        raise ValueError(f"target {target} tokens is below the task's fixed parts ({n0} tokens)")
    tol = max(1, int(0.005 * target))
    lo, hi = 0, k_max + 1  # n(lo) <= target; hi: smallest k known to be over (or k_max + 1)
    if target - n0 <= tol or k_max == 0:
        return 0, cache[0]
    rate = max(rate_hint, 1e-3)
    k = min(k_max, max(1, int((target - n0 - tol / 2) / rate)))
    for _ in range(100):
        n = n_of(k)
        if n <= target:
            lo = max(lo, k)
            if target - n <= tol:
                break
        else:
            hi = min(hi, k)
        if hi - lo <= 1:
            break
        rate = max((n - n0) / k, 1e-3)
        guess = int(k + (target - tol / 2 - n) / rate)
        if hi > k_max:  # no count over the target seen yet: grow at most geometrically
            guess = min(guess, 4 * lo + 64)
        # Every k strictly inside (lo, hi) is unmeasured: measured ones are <= lo or >= hi.
        k = min(max(guess, lo + 1), hi - 1)
    return lo, cache[lo]


def _insert(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """Insert needles between units at fractional depths (0 = start, 1 = end). Needles
    that land at the same place keep their given order (vt chains stay in order)."""
    pos = [round(d * len(units)) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (pos[j], j))
    out: list[str] = []
    j = 0
    for i, unit in enumerate(units):
        while j < len(order) and pos[order[j]] <= i:
            out.append(needles[order[j]])
            j += 1
        out.append(unit)
    out.extend(needles[o] for o in order[j:])
    return out


# ---------------------------------------------------------------------------- haystacks


def _noise(k: int, start: int) -> list[str]:
    return [FILLER[(start + i) % len(FILLER)] for i in range(k)]


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[str, ...]:
    """Source files of the standard library's top-level modules, by sorted module name."""
    names = sorted(getattr(sys, "stdlib_module_names", ()))
    files = []
    for name in names:
        if name.startswith("_") or name in ("this", "antigravity"):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) if spec else None
        if origin and origin.endswith(".py") and Path(origin).is_file():
            files.append(origin)
    if not files:
        raise RuntimeError("no standard-library source files found for the code haystack")
    return tuple(files)


_CODE_LINES: list[str] = []
_CODE_FILES_READ = [0]


def _code_lines(n: int) -> list[str]:
    """The first `n` lines of the code corpus (read lazily, cached). Lines are
    right-stripped, tabs expanded, lines over 160 characters dropped (fine fitting)."""
    files = _stdlib_files()
    while len(_CODE_LINES) < n:
        i = _CODE_FILES_READ[0]
        if i >= len(files):
            i = _CODE_FILES_READ[0] = 0  # wrap around: the corpus repeats
            if not _CODE_LINES:
                raise RuntimeError("standard-library sources are empty")
        _CODE_FILES_READ[0] += 1
        text = Path(files[i]).read_text(encoding="utf-8", errors="replace")
        _CODE_LINES.append(f"# ---- {Path(files[i]).name} ----")
        for line in text.splitlines():
            line = line.rstrip().expandtabs(4)
            if len(line) <= 160:
                _CODE_LINES.append(line)
    return _CODE_LINES[:n]


# ---------------------------------------------------------------------------- tasks


@dataclass
class _Task:
    """What `_one` needs to fit a prompt: `render(k, tail)` -> (text, ids) with k filler
    units and a partial unit `tail` after them; `next_unit(k)`: the text of the unit after
    the first k, whose start is the fine fill (None: whole units only)."""

    render: Callable[[int, str], tuple[str, list[int]]]
    k_max: int
    rate: float  # tokens per filler unit (estimate)
    answers: list[str]
    meta: dict
    next_unit: Callable[[int], str] | None = None
    words: Callable[[int], list[str]] | None = None  # cwe: the list of k rare words


def _number(rng: random.Random, digits: int, avoid: set[str]) -> str:
    while True:
        v = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if v not in avoid:
            avoid.add(v)
            return v


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


_NIAH_HEAD = (
    "Some special magic numbers are hidden in the text below. Read it carefully and "
    "remember them: you will be asked about them afterwards."
)


def _haystack(
    rng: random.Random, tokenizer, code: bool, needles: list[str], depths: list[float]
) -> tuple[Callable[[int, str], str], Callable[[int], list[str]], float, int, dict]:
    """(hay(k, tail), next_unit(k), tokens per unit, k_max, meta) of the noise or code
    haystack with `needles` inserted at `depths`."""
    if code:
        start = rng.randrange(0, 20000)
        sep = "\n"

        def unit(i: int) -> str:
            return _code_lines(start + i + 1)[start + i]

        def units(k: int) -> list[str]:
            return _code_lines(start + k)[start:]

        k_max = 10**6
        meta = {"haystack": "python-stdlib", "code_start_line": start}
    else:
        start = rng.randrange(len(FILLER))
        sep = " "

        def unit(i: int) -> str:
            return FILLER[(start + i) % len(FILLER)]

        def units(k: int) -> list[str]:
            return _noise(k, start)

        k_max = 10**7
        meta = {"haystack": "noise", "noise_start": start}

    def hay(k: int, tail: str) -> str:
        text = sep.join(_insert(units(k), needles, depths))
        return f"{text}{sep}{tail}" if tail else text

    probe = sep.join(units(64))
    rate = len(tokenizer.encode(probe, add_special_tokens=False)) / 64
    return hay, unit, rate, k_max, meta


def _niah(task: str, rng: random.Random, render: _Renderer, tokenizer) -> _Task:
    avoid: set[str] = set()
    if task == "niah_multivalue":
        keys = _keys(rng, 1) * NUM_NEEDLES
    elif task in ("niah_multikey", "niah_multiquery"):
        keys = _keys(rng, NUM_NEEDLES)
    else:
        keys = _keys(rng, 1)
    values = [_number(rng, 7, avoid) for _ in keys]
    depths = [rng.random() for _ in keys]
    needles = [_needle(k, v) for k, v in zip(keys, values)]
    if task == "niah_multivalue":
        q = (
            f"What are all the special magic numbers for {keys[0]} mentioned in the text "
            f"above? There are {NUM_NEEDLES} of them: list every one, separated by commas."
        )
        prefix = f"The special magic numbers for {keys[0]} are:"
        answers = values
    elif task == "niah_multiquery":
        names = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        q = (
            f"What are the special magic numbers for {names} mentioned in the text above? "
            "Give the number of each, separated by commas."
        )
        prefix = f"The special magic numbers for {names} are:"
        answers = values
    else:
        asked = 0  # multikey: needle 0 is asked, the others are distractors
        q = (
            f"What is the special magic number for {keys[asked]} mentioned in the text above? "
            "Answer with the number."
        )
        prefix = f"The special magic number for {keys[asked]} is:"
        answers = [values[asked]]
    code = task == "niah_single_code"
    if code:
        needles = [f"# {n}" for n in needles]
    hay, next_unit, rate, k_max, meta = _haystack(rng, tokenizer, code, needles, depths)
    meta.update(keys=keys, values=values, depths=depths, needles=needles)

    def render_k(k: int, tail: str) -> tuple[str, list[int]]:
        return render(f"{_NIAH_HEAD}\n\n{hay(k, tail)}\n\n{q}", prefix)

    return _Task(render_k, k_max, rate, answers, meta, next_unit)


def _vt(rng: random.Random, render: _Renderer, tokenizer) -> _Task:
    avoid: set[str] = set()
    names_used: set[str] = set()

    def name() -> str:
        while True:
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in names_used:
                names_used.add(n)
                return n

    chains = []
    for _ in range(VT_CHAINS):
        value = _number(rng, 5, avoid)
        names = [name() for _ in range(VT_HOPS + 1)]
        chains.append((value, names))
    statements, depths = [], []
    for value, names in chains:
        stmts = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
        ]
        ds = sorted(rng.random() for _ in stmts)  # in order: each name bound before use
        statements += stmts
        depths += ds
    value, names = chains[0]
    q = (
        f"Find every variable that is assigned the value {value} in the text above, directly "
        "or through other variables. Answer with the variable names, separated by commas."
    )
    prefix = f"The variables assigned the value {value} are:"
    head = (
        "Memorize the variable assignments hidden in the text below: you will be asked to "
        "trace them afterwards."
    )
    hay, next_unit, rate, k_max, meta = _haystack(rng, tokenizer, False, statements, depths)

    def render_k(k: int, tail: str) -> tuple[str, list[int]]:
        return render(f"{head}\n\n{hay(k, tail)}\n\n{q}", prefix)

    meta.update(chains=[{"value": v, "names": n} for v, n in chains], statements=statements)
    return _Task(render_k, k_max, rate, list(names), meta, next_unit)


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct made-up words (2-3 consonant-vowel syllables plus a final consonant),
    none containing or contained in a common word."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3)))
        )
        w += rng.choice(_CONSONANTS)
        if w in seen or any(c in w or w in c for c in _COMMON_WORDS):
            continue
        seen.add(w)
        out.append(w)
    return out


def _cwe(rng: random.Random, render: _Renderer, tokenizer, target: int) -> _Task:
    common = rng.sample(_COMMON_WORDS, CWE_COMMON)
    # Scale the frequencies to the list the target can hold (common words at most about a
    # third of it), so short prompts keep a clear gap between common and rare words.
    per_item = max(1.0, len(tokenizer.encode(" 999. bakemor\n", add_special_tokens=False)))
    items_est = max(1, int(target / per_item))
    freq_c = max(4, min(CWE_FREQ_COMMON, items_est // (3 * CWE_COMMON)))
    freq_r = CWE_FREQ_RARE if freq_c >= 4 * CWE_FREQ_RARE else 1
    # The probe line is a long one: real lines are often shorter, so leave room (2x).
    k_max = 2 * (items_est // freq_r) + 64
    rare = _pseudo_words(rng, k_max)
    order_seed = rng.randrange(2**31)
    q = (
        f"What are the {CWE_COMMON} most common words in the list above? Answer with the "
        f"{CWE_COMMON} words, separated by commas."
    )
    prefix = f"The {CWE_COMMON} most common words in the list are:"
    head = (
        "Below is a numbered list of words. Some words appear many more times than the "
        "others: find the ones that appear most often."
    )

    def words(k: int) -> list[str]:
        ws = [w for w in common for _ in range(freq_c)] + [
            w for w in rare[:k] for _ in range(freq_r)
        ]
        random.Random(order_seed).shuffle(ws)
        return ws

    def render_k(k: int, tail: str) -> tuple[str, list[int]]:
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words(k)))
        return render(f"{head}\n\n{listing}\n\n{q}", prefix)

    meta = {"common": common, "freq_common": freq_c, "freq_rare": freq_r}
    return _Task(render_k, k_max, per_item * freq_r, list(common), meta, words=words)


def _one(task: str, tokenizer, render: _Renderer, length: int, target: int, seed: int, i: int):
    rng = random.Random(f"pbs-ruler:{task}:{length}:{seed}:{i}")
    if task.startswith("niah_"):
        t = _niah(task, rng, render, tokenizer)
    elif task == "vt":
        t = _vt(rng, render, tokenizer)
    else:
        t = _cwe(rng, render, tokenizer, target)
    k, (text, ids) = _fit(lambda k: t.render(k, ""), target, t.k_max, t.rate)
    tail = ""
    if t.next_unit is not None:
        # Fine fill (units can be long): the next unit's words as far as they fit, then
        # the characters of the word after them.
        unit = t.next_unit(k)
        words = re.findall(r"\s*\S+", unit)
        if words:
            j, _ = _fit(
                lambda j: t.render(k, "".join(words[:j])),
                target,
                len(words) - 1,
                t.rate / len(words),
            )
            head, part = "".join(words[:j]), words[j]
            c, (text, ids) = _fit(
                lambda c: t.render(k, head + part[:c]),
                target,
                len(part) - 1,
                t.rate / max(1, len(unit)),
            )
            tail = head + part[:c]
    t.meta["filler_units"] = k
    t.meta["tail"] = tail
    if t.words is not None:
        t.meta["words"] = t.words(k)
    return Sample(
        task=task,
        length=length,
        index=i,
        seed=seed,
        prompt_text=text,
        prompt_token_ids=ids,
        answers=t.answers,
        max_new_tokens=MAX_NEW_TOKENS[task],
        target_tokens=target,
        meta=t.meta,
    )


def make_prompts(
    task: str,
    tokenizer,
    length: int | str,
    n: int,
    seed: int = 0,
    reserve_output: bool = False,
) -> list[Sample]:
    """`n` prompts of `task`, each at most `length` tokens (`length - max_new_tokens` with
    `reserve_output`) and within about 1% of it. Deterministic in (task, length, seed, i)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    length = parse_length(length)
    target = length - MAX_NEW_TOKENS[task] if reserve_output else length
    if target <= 0:
        raise ValueError(
            f"length {length} leaves no room for the {task} prompt "
            f"({MAX_NEW_TOKENS[task]} tokens are reserved for the answer)"
        )
    render = _Renderer(tokenizer)
    try:
        return [_one(task, tokenizer, render, length, target, seed, i) for i in range(n)]
    except ValueError as e:
        raise ValueError(f"{task} at length {length}: {e}") from None


def parse_tasks(text: str) -> list[str]:
    """`all` or a comma-separated subset of TASKS."""
    if text.strip() == "all":
        return list(TASKS)
    wanted = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in wanted if t not in TASKS]
    if bad:
        raise ValueError(f"unknown tasks {bad}; allowed: all, {', '.join(TASKS)}")
    if not wanted:
        raise ValueError(f"no tasks in {text!r}; allowed: all, {', '.join(TASKS)}")
    return wanted


def write_jsonl(path: str | Path, samples: Sequence[Sample]) -> None:
    import json

    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")


def read_jsonl(path: str | Path) -> list[Sample]:
    import json

    with open(path) as f:
        return [Sample.from_dict(json.loads(line)) for line in f if line.strip()]


__all__ = [
    "MAX_NEW_TOKENS",
    "PROMPT_VERSION",
    "TASKS",
    "Sample",
    "make_prompts",
    "mean_scores",
    "parse_length",
    "parse_lengths",
    "parse_tasks",
    "read_jsonl",
    "score",
    "write_jsonl",
]

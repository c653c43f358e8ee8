"""Long-context tasks in the RULER style, generated locally from a seed (no downloads).

After RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"): synthetic tasks whose length, needle depth and difficulty are controlled exactly.

Tasks (haystack = consecutive words of the embedded text from a seeded sentence start, whitespace
collapsed; a needle at depth ``d`` goes before the haystack word at ``d`` of the haystack's tokens: at
the nearest sentence boundary, as RULER does, when one is within 2% (>= 16 tokens), else at the
nearest word boundary, since the text has long code passages without sentence ends):

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {7-digit value}." at
  depth ``d``; asked for the key's number. Answers: ``[value]``.
- ``niah_multikey``: the asked needle at depth ``d`` plus 3 distractor needles (other keys, other
  values) at seeded random depths. Answers: ``[value of the asked key]``.
- ``niah_multivalue``: 4 needles with the same key and different values, the first at depth ``d``,
  the others at random depths; all 4 are asked. Answers: the 4 values.
- ``vt`` (variable tracking): one chain of 4 hops, "VAR ABCDE = 12345." at depth ``d`` then
  "VAR FGHIJ = VAR ABCDE." ... at sorted random depths after it; a one-shot example (RULER's ICL
  example) precedes the task. Answers: the 5 variable names bound to the value.
- ``cwe`` (common words extraction): a numbered list of words; 10 common words appear ``freq_cw``
  times, the others 3 times each. ``freq_cw`` is RULER's 30 when it fits, otherwise the largest value
  (at least 6) that keeps the common words at most 60% of the list; the list grows by one uncommon
  word (3 entries) at a time; no listed word is a substring of another (so substring scoring cannot
  credit a wrong word). No depth. Answers: the 10 common words.

Prompts: the task text is the user turn of the tokenizer's chat template (when it has one) and
RULER's answer prefix opens the assistant turn ("The special magic number for {key} mentioned in
the provided text is"), so the model's first tokens are the answer.

Lengths are in the model's tokens: ``prompt_tokens + max_new_tokens <= length`` (RULER's rule), with
the haystack grown word by word (binary search) until one more word would not fit, so the prompt
ends within a few tokens of ``length - max_new_tokens``. ``max_new_tokens`` per task: see
``GEN_TOKENS``.

Scoring (RULER's ``string_match_all``, used by RULER for niah, vt and cwe): a sample scores the
fraction of its expected answers that occur in the output as case-insensitive substrings (1.0 = all
found, 0.5 = half, 0.0 = none); task accuracy is the mean over samples, in percent.
``string_match_part`` (RULER's QA metric: 1.0 if any expected answer occurs) is reported alongside.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, lru_cache

from tqdm.auto import tqdm

from sparseland.errors import SparselandError

TASKS: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)
GEN_TOKENS: dict[str, int] = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 40, "cwe": 96}
MIN_LENGTH = 256

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What are all the special magic numbers for {key} mentioned in the provided text?"
)
NIAH_PREFIX = "The special magic numbers for {key} mentioned in the provided text are"
NIAH1_TEMPLATE = (  # RULER's singular wording when one value is asked
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n{context}\n"
    "What is the special magic number for {key} mentioned in the provided text?"
)
NIAH1_PREFIX = "The special magic number for {key} mentioned in the provided text is"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {value} in the text above."
)
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assigned the value {value}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the {n} most common words in the above list?"
)
CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"

_ADJECTIVE_TEXT = (  # needle keys are "adjective-noun", as RULER's word keys
    "amber brave calm dusty eager fancy gentle hollow icy jolly keen lively mellow noisy orange plain "
    "quiet rapid silver tidy upbeat vivid witty young zesty bold crisp damp early fuzzy golden humble"
)
_NOUN_TEXT = (
    "anchor basket candle dragon engine falcon garden harbor island jacket kettle lantern meadow needle "
    "orchard pepper quarry rabbit saddle tunnel umbrella violin walnut yacht zebra bridge cactus dolphin"
)
_ADJECTIVES, _NOUNS = _ADJECTIVE_TEXT.split(), _NOUN_TEXT.split()


@dataclass(frozen=True)
class LongCtxSample:
    """One prompt with its expected answers; ``depth`` is the requested needle depth in [0, 1]."""

    task: str
    length: int  # target tokens: prompt_tokens + max_new_tokens <= length
    prompt: str
    answers: list[str]
    prompt_tokens: int
    max_new_tokens: int
    depth: float | None  # None for cwe
    needle_position: int | None  # token index where the (first asked) needle starts in the prompt
    index: int
    seed: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def score_all(output: str, answers: Sequence[str]) -> float:
    """RULER ``string_match_all``: fraction of ``answers`` found in ``output`` (case-insensitive substrings)."""
    if not answers:
        raise SparselandError("a sample needs at least one expected answer to be scored")
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


def score_part(output: str, answers: Sequence[str]) -> float:
    """RULER ``string_match_part``: 1.0 if any of ``answers`` occurs in ``output``, else 0.0."""
    if not answers:
        raise SparselandError("a sample needs at least one expected answer to be scored")
    out = output.lower()
    return float(any(a.lower() in out for a in answers))


def score(sample: LongCtxSample, output: str) -> float:
    """The task's metric: ``string_match_all`` for every task of the suite (as RULER does for them)."""
    return score_all(output, sample.answers)


# ---------------------------------------------------------------------------------------------
# Text pieces


@lru_cache(maxsize=4)
def _words(text: str) -> tuple[str, ...]:
    return tuple(w for w in re.sub(r"\s+", " ", text).split(" ") if w)


@lru_cache(maxsize=4)
def _vocabulary(text: str) -> tuple[str, ...]:
    """Distinct lowercase words of 5-10 letters of ``text``, sorted (the cwe word pool)."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{5,10}\b", text))))


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def _sentence_starts(words: Sequence[str]) -> list[int]:
    return [0] + [i + 1 for i, w in enumerate(words) if _SENTENCE_END.search(w)]


def _haystack(words: Sequence[str], start: int, n: int) -> list[str]:
    return [words[(start + i) % len(words)] for i in range(n)]


def _insert(hay: list[str], needles: list[tuple[float, str]], cost: Callable[[str], int]) -> str:
    """Join ``hay`` with each ``(depth, text)`` needle placed at ``depth`` of the haystack's tokens.

    ``cost(word)`` is a word's token count. A needle goes at the nearest sentence boundary when one is
    within 2% of the haystack (at least 16 tokens) of its depth, else at the nearest word boundary
    (the embedded text has long code passages without sentence ends).
    """
    n = len(hay)
    cum = [0]  # cum[i]: tokens before word i
    for w in hay:
        cum.append(cum[-1] + cost(w))
    slack = max(16.0, 0.02 * cum[-1])
    starts = [s for s in _sentence_starts(hay) if s <= n]
    at: dict[int, list[str]] = {}
    for depth, text in sorted(needles, key=lambda x: x[0]):  # stable: equal depths keep their order
        target = depth * cum[-1]
        pos = min(starts, key=lambda s: abs(cum[s] - target))
        if abs(cum[pos] - target) > slack:
            pos = min(range(n + 1), key=lambda i: abs(cum[i] - target))
        at.setdefault(pos, []).append(text)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(at.get(i, []))
        if i < n:
            parts.append(hay[i])
    return " ".join(parts)


def _unique(rng: random.Random, make: Callable[[], str], k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        x = make()
        if x not in out:
            out.append(x)
    return out


def _distinct_words(rng: random.Random, vocab: Sequence[str], k: int, need: int) -> list[str]:
    """Up to ``k`` (at least ``need``) words of ``vocab``, none a substring of another (exact scoring)."""
    pool = list(vocab)
    rng.shuffle(pool)
    out: list[str] = []
    for w in pool:
        if not any(w in o or o in w for o in out):
            out.append(w)
            if len(out) == k:
                break
    if len(out) < need:
        raise SparselandError(f"the text has too few distinct words for a cwe list of {need} words; use a longer text")
    return out


# ---------------------------------------------------------------------------------------------
# Prompt assembly and length fitting


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids: no special tokens added (the chat template already holds them)."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _wrap(tokenizer, body: str, prefix: str) -> str:
    """The user turn of the chat template (if any) followed by the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        return head + prefix
    return body + "\n" + prefix


def _fit(count: Callable[[str], int], build: Callable[[int], str], budget: int, lo: int, hi: int) -> int:
    """Largest ``n`` in ``[lo, hi]`` with ``count(build(n)) <= budget`` (binary search; -1 if none)."""
    best = -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if count(build(mid)) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


@dataclass
class _Draft:
    """A task instance whose haystack size is still open: ``build(n)`` gives the prompt for size ``n``."""

    build: Callable[[int], str]
    answers: list[str]
    needle: str | None  # the text whose position is reported
    lo: int = 0
    hi: int | None = None  # None: the token budget (every haystack word costs at least one token)
    meta: dict = field(default_factory=dict)


def _sentence_start(words: Sequence[str], rng: random.Random) -> int:
    i = rng.randrange(len(words))
    for _ in range(len(words)):
        if _SENTENCE_END.search(words[i - 1]):
            return i
        i = (i + 1) % len(words)
    return i


def _niah(task: str, rng: random.Random, words, wrap, cost, depth: float) -> _Draft:
    n_keys, n_values = {"niah_single": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (1, 4)}[task]
    keys = _unique(rng, lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", n_keys)
    values = _unique(rng, lambda: str(rng.randint(1_000_000, 9_999_999)), n_keys * n_values)
    needles = [
        NEEDLE.format(key=k, value=values[i * n_values + j]) for i, k in enumerate(keys) for j in range(n_values)
    ]
    # The asked needle (keys[0], first value) sits at ``depth``; every other needle at a random depth.
    placed = [(depth, needles[0])] + [(rng.random(), t) for t in needles[1:]]
    start = _sentence_start(words, rng)
    template, prefix = (NIAH1_TEMPLATE, NIAH1_PREFIX) if n_values == 1 else (NIAH_TEMPLATE, NIAH_PREFIX)

    def build(n: int) -> str:
        ctx = _insert(_haystack(words, start, n), placed, cost)
        return wrap(template.format(context=ctx, key=keys[0]), prefix.format(key=keys[0]))

    return _Draft(build, values[:n_values], needles[0], meta={"key": keys[0], "distractors": len(needles) - n_values})


def _var_names(rng: random.Random, k: int) -> list[str]:
    return _unique(rng, lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), k)


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]


def _vt(rng: random.Random, words, wrap, cost, depth: float, hops: int = 4) -> _Draft:
    ex_names, ex_value = _var_names(rng, 4), str(rng.randint(10_000, 99_999))
    ex_ctx = " The grass is green. ".join(_chain(ex_names, ex_value))
    example = (
        VT_TEMPLATE.format(context=ex_ctx, value=ex_value)
        + "\n"
        + VT_PREFIX.format(n=len(ex_names), value=ex_value)
        + " ".join(ex_names)
        + "\n\n"
    )
    names = [n for n in _var_names(rng, hops + 1 + len(ex_names)) if n not in ex_names][: hops + 1]
    value = str(rng.randint(10_000, 99_999))
    while value == ex_value:
        value = str(rng.randint(10_000, 99_999))
    stmts = _chain(names, value)
    placed = [(depth, stmts[0])] + [
        (d, s) for d, s in zip(sorted(rng.uniform(depth, 1.0) for _ in stmts[1:]), stmts[1:], strict=True)
    ]
    start = _sentence_start(words, rng)

    def build(n: int) -> str:
        ctx = _insert(_haystack(words, start, n), placed, cost)
        return wrap(example + VT_TEMPLATE.format(context=ctx, value=value), VT_PREFIX.format(n=len(names), value=value))

    return _Draft(build, names, stmts[0], meta={"value": value, "hops": hops})


def _cwe(rng: random.Random, vocab, wrap, count, budget: int, n_cw: int = 10, freq_ucw: int = 3) -> _Draft:
    pool = _distinct_words(rng, vocab, budget // (2 * freq_ucw) + n_cw, need=3 * n_cw)
    common, uncommon = pool[:n_cw], pool[n_cw:]
    perm_seed = rng.randrange(2**32)

    def builder(freq_cw: int) -> Callable[[int], str]:
        def build(n_ucw: int) -> str:  # the list with ``n_ucw`` uncommon words
            entries = [w for w in common for _ in range(freq_cw)] + [
                w for w in uncommon[:n_ucw] for _ in range(freq_ucw)
            ]
            random.Random(perm_seed).shuffle(entries)
            ctx = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
            return wrap(CWE_TEMPLATE.format(context=ctx, n=n_cw), CWE_PREFIX.format(n=n_cw))

        return build

    # RULER's freq_cw=30 if it fits with common words <= 60% of the list, else the largest that does.
    for freq_cw in range(30, 2 * freq_ucw - 1, -1):
        lo = -(-2 * n_cw * freq_cw // (3 * freq_ucw))  # ceil: uncommon entries >= 2/3 of common entries
        build = builder(freq_cw)
        if lo <= len(uncommon) and count(build(lo)) <= budget:
            meta = {"freq_cw": freq_cw, "freq_ucw": freq_ucw}
            return _Draft(build, common, None, lo=lo, hi=len(uncommon), meta=meta)
    raise SparselandError(
        f"a cwe list with {n_cw} words x {2 * freq_ucw} does not fit in {budget} prompt tokens; use a longer length"
    )


# ---------------------------------------------------------------------------------------------
# The suite


def _check(tasks: Sequence[str], lengths: Sequence[int], n_samples: int, max_context: int | None) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise SparselandError(f"unknown task(s) {unknown or list(tasks)}; choose from {list(TASKS)}")
    if not isinstance(n_samples, int) or n_samples <= 0:
        raise SparselandError(f"n_samples={n_samples!r} must be a positive integer")
    for n in lengths:
        if not isinstance(n, int) or n < MIN_LENGTH:
            raise SparselandError(f"length {n!r} is too short; pass {MIN_LENGTH} tokens or more")
        if max_context is not None and n > max_context:
            raise SparselandError(
                f"length {n} is longer than the model's context of {max_context} tokens "
                f"(prompt and answer must fit); pass --length {max_context} or less"
            )


def make_sample(
    tokenizer, task: str, length: int, index: int = 0, n_samples: int = 1, seed: int = 0, text: str | None = None
) -> LongCtxSample:
    """Sample ``index`` of ``n_samples`` for one (task, length): its depth is ``(index + 0.5) / n_samples``.

    Each sample has its own seeded ``random.Random``, so adding lengths or tasks never changes others.
    """
    from sparseland.data.text import embedded_text

    _check([task], [length], n_samples, None)
    text = embedded_text() if text is None else text
    rng = random.Random(f"sparseland-longctx:{seed}:{task}:{length}:{index}")
    depth = (index + 0.5) / n_samples
    max_new = GEN_TOKENS[task]
    budget = length - max_new

    def count(prompt: str) -> int:
        return len(encode_prompt(tokenizer, prompt))

    def wrap(body: str, prefix: str) -> str:
        return _wrap(tokenizer, body, prefix)

    @cache
    def cost(word: str) -> int:  # a haystack word's tokens, as it appears in text (after a space)
        return count(" " + word)

    if task == "cwe":
        draft = _cwe(rng, _vocabulary(text), wrap, count, budget)
    elif task == "vt":
        draft = _vt(rng, _words(text), wrap, cost, depth)
    else:
        draft = _niah(task, rng, _words(text), wrap, cost, depth)
    n = _fit(count, draft.build, budget, draft.lo, budget if draft.hi is None else draft.hi)
    if n < 0:
        raise SparselandError(
            f"task {task!r} does not fit in {length} tokens (instructions and needles alone are longer); "
            "use a longer length"
        )
    prompt = draft.build(n)
    needle_position = None
    if draft.needle is not None:
        needle_position = count(prompt[: prompt.index(draft.needle)])
    return LongCtxSample(
        task=task,
        length=length,
        prompt=prompt,
        answers=list(draft.answers),
        prompt_tokens=count(prompt),
        max_new_tokens=max_new,
        depth=None if task == "cwe" else depth,
        needle_position=needle_position,
        index=index,
        seed=seed,
        meta={**draft.meta, "haystack_units": n},
    )


def generate_samples(
    tokenizer,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    tasks: Sequence[str] = TASKS,
    n_samples: int = 4,
    seed: int = 0,
    text: str | None = None,
    max_context: int | None = None,
    progress: bool = False,
) -> list[LongCtxSample]:
    """``n_samples`` samples per (task, length), depths evenly spread, deterministic for a ``seed``.

    ``max_context`` (the model's limit, e.g. 8192) rejects lengths that would not fit.
    """
    lengths, tasks = list(lengths), list(tasks)
    _check(tasks, lengths, n_samples, max_context)
    cells = [(t, n, i) for n in lengths for t in tasks for i in range(n_samples)]
    bar = tqdm(cells, desc="longctx samples", unit="sample", disable=not progress, leave=False)
    return [make_sample(tokenizer, t, n, i, n_samples, seed, text) for t, n, i in bar]

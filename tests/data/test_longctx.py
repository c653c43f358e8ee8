"""The RULER-style long-context generator: determinism, lengths, needle placement, answers, scoring.

Most tests use ``StubTokenizer`` (one token per word or punctuation mark, no chat template), which is
instant; ``test_real_tokenizer_lengths`` uses the embedded model's tokenizer when it is cached.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

import pytest

from sparseland.data.longctx import (
    GEN_TOKENS,
    NEEDLE,
    TASKS,
    encode_prompt,
    generate_samples,
    make_sample,
    score_all,
    score_part,
)
from sparseland.errors import SparselandError


class StubTokenizer:
    """Word-level tokenizer: ``\\w+`` runs and single punctuation marks; ids in [3, vocab)."""

    chat_template = None

    def __init__(self, vocab: int = 256) -> None:
        self.vocab = vocab
        self.seen: dict[int, str] = {}

    def _id(self, tok: str) -> int:
        i = 3 + zlib.crc32(tok.encode()) % (self.vocab - 3)
        self.seen[i] = tok
        return i

    def __call__(self, text: str, add_special_tokens: bool = False, **_):
        return {"input_ids": [self._id(t) for t in re.findall(r"\w+|[^\w\s]", text)]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(self.seen.get(int(i), "?") for i in ids)


@pytest.fixture(scope="module")
def tok():
    return StubTokenizer()


def _ntok(tok, text: str) -> int:
    return len(encode_prompt(tok, text))


def test_same_seed_same_samples_other_seed_differs(tok):
    a = generate_samples(tok, [512], n_samples=2, seed=3)
    b = generate_samples(tok, [512], n_samples=2, seed=3)
    c = generate_samples(tok, [512], n_samples=2, seed=4)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, c, strict=True))
    assert [s.task for s in a] == [t for t in TASKS for _ in range(2)]


def test_adding_lengths_does_not_change_other_samples(tok):
    one = generate_samples(tok, [512], tasks=["niah_single"], n_samples=2)
    two = generate_samples(tok, [512, 1024], tasks=["niah_single"], n_samples=2)
    assert [s.prompt for s in one] == [s.prompt for s in two if s.length == 512]


@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_hits_target_length(tok, task, length):
    s = make_sample(tok, task, length, index=1, n_samples=3)
    budget = length - GEN_TOKENS[task]
    assert s.prompt_tokens == _ntok(tok, s.prompt)
    # haystack grows one word (niah, vt) or one 3x-repeated word (cwe, ~4 tokens per entry) at a time
    tol = 16 if task == "cwe" else 8
    assert budget - tol <= s.prompt_tokens <= budget


def _context_span(prompt: str, start_marker: str, end_marker: str) -> tuple[int, int]:
    a = prompt.index(start_marker) + len(start_marker)
    return a, prompt.rindex(end_marker)


@pytest.mark.parametrize("index", range(4))
def test_needle_in_prompt_at_stated_depth(tok, index):
    s = make_sample(tok, "niah_single", 2048, index=index, n_samples=4)
    needle = NEEDLE.format(key=s.meta["key"], value=s.answers[0])
    assert s.prompt.count(needle) == 1 and s.prompt.count(s.answers[0]) == 1
    assert s.depth == pytest.approx((index + 0.5) / 4)
    a, b = _context_span(s.prompt, "afterwards.\n", "\nWhat is the special magic number")
    ctx_a, ctx_b = _ntok(tok, s.prompt[:a]), _ntok(tok, s.prompt[:b])
    measured = (s.needle_position - ctx_a) / (ctx_b - ctx_a)
    assert s.needle_position == _ntok(tok, s.prompt[: s.prompt.index(needle)])
    assert abs(measured - s.depth) < 0.08  # needles go at the nearest sentence boundary
    assert s.meta["key"] in s.prompt[b:]  # the question asks for this key


def test_multikey_has_distractors_and_one_answer(tok):
    s = make_sample(tok, "niah_multikey", 1024, seed=1)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", s.prompt)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = [v for k, v in needles if k == s.meta["key"]]
    assert s.answers == asked
    assert "for " + s.meta["key"] + " mentioned" in s.prompt


def test_multivalue_asks_all_values_of_one_key(tok):
    s = make_sample(tok, "niah_multivalue", 1024, seed=2)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", s.prompt)
    assert len(needles) == 4 and {k for k, _ in needles} == {s.meta["key"]}
    assert sorted(s.answers) == sorted(v for _, v in needles)
    assert len(set(s.answers)) == 4


def test_vt_answers_are_exactly_the_names_bound_to_the_value(tok):
    s = make_sample(tok, "vt", 1024, index=0, n_samples=2, seed=5)
    task_part = s.prompt[s.prompt.rindex("Memorize and track") :]  # skip the one-shot example
    bound = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", task_part):
        bound[name] = bound.get(rhs[4:], rhs) if rhs.startswith("VAR ") else rhs  # in text order: one pass
    value = s.meta["value"]
    assert sorted(n for n, v in bound.items() if v == value) == sorted(s.answers)
    assert len(s.answers) == 5 and f"value {value}" in task_part


def test_cwe_answers_are_the_most_common_words(tok):
    s = make_sample(tok, "cwe", 2048, seed=7)
    words = re.findall(r"^\d+\. (\w+)$", s.prompt, flags=re.M)
    counts = Counter(words)
    common = [w for w, _ in counts.most_common(10)]
    assert sorted(common) == sorted(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    # no answer is a substring of another listed word, so substring scoring cannot credit a wrong word
    assert not any(a in w for a in s.answers for w in counts if w != a)


def test_scoring_rules_exact_partial_none():
    answers = ["1234567", "7654321", "1111111", "2222222"]
    assert score_all("They are 1234567, 7654321, 1111111 and 2222222.", answers) == 1.0
    assert score_all("1234567 and 1111111", answers) == 0.5
    assert score_all("no idea", answers) == 0.0
    assert score_all("VAR abcde", ["ABCDE"]) == 1.0  # case-insensitive
    assert score_part("1111111", answers) == 1.0
    assert score_part("nothing", answers) == 0.0
    with pytest.raises(SparselandError):
        score_all("x", [])


def test_bad_input_is_rejected(tok):
    with pytest.raises(SparselandError, match="unknown task"):
        generate_samples(tok, [1024], tasks=["niah_single", "bogus"])
    with pytest.raises(SparselandError, match="too short"):
        generate_samples(tok, [100])
    with pytest.raises(SparselandError, match="context of 8192"):
        generate_samples(tok, [16384], max_context=8192)
    with pytest.raises(SparselandError, match="positive"):
        generate_samples(tok, [1024], n_samples=0)


def _cached_tokenizer():
    from sparseland.models.loader import cache_root

    dirs = sorted((cache_root() / "models").glob("smollm2-135m-f32-*"))
    if not dirs:
        pytest.skip("the embedded model is not converted yet (run `sparseland eval` once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs[-1])


def test_real_tokenizer_lengths_and_chat_template():
    tok = _cached_tokenizer()
    for task in TASKS:
        s = make_sample(tok, task, 1024)
        budget = 1024 - GEN_TOKENS[task]
        assert s.prompt_tokens == len(tok(s.prompt, add_special_tokens=False)["input_ids"])
        assert budget - 24 <= s.prompt_tokens <= budget
        assert s.prompt.startswith("<|im_start|>") and "<|im_start|>assistant\n" in s.prompt
        assert all(a in s.prompt for a in s.answers)

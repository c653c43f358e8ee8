"""An offline task suite, scored exactly: does a compressed chat model still answer questions?

Four kinds of items, generated from a seed with no download, each asked through the chat template
and answered greedily (the lean decode loop); the answer is parsed and checked by the machine:

- ``python``: the value of a short generated Python expression; the expected value is what running
  the expression gives, and an answer is right when the span stating it (the first backticked span,
  what follows the first "is" or "=", or the whole first line) parses (``ast.literal_eval``) to an
  equal value of the same type or reads exactly as the value's ``repr``/``str``;
- ``arithmetic``: a sum, difference or product of two numbers; right when the integer the answer
  states (after its last "=" or "is", or the answer alone) is the result;
- ``facts``: which Python statement or string method the embedded text (``pydoc_data.topics``)
  describes, with the name blanked out of the description; right when the name is in the answer as a
  word and no other candidate name is;
- ``choice``: the same kind of question with four lettered options (the right name and three
  distractors from the same family); right when the letter after "answer is", else the first option
  letter in the answer, is the right one.

Accuracy comes with its binomial standard error; two models on the same items are compared by the
paired difference (its standard error from the per-item differences) and the flips (right to wrong,
wrong to right).
"""

from __future__ import annotations

import ast
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sparseland.errors import SparselandError

KINDS = ("python", "arithmetic", "facts", "choice")
LETTERS = "ABCD"
MAX_NEW_TOKENS = {"python": 24, "arithmetic": 16, "facts": 16, "choice": 12}


@dataclass
class TaskItem:
    kind: str
    prompt: str
    answer: str  # the expected answer, as text (a repr for python items, the letter for choice items)
    candidates: list[str] = field(default_factory=list)  # facts: every name of the family; choice: options


# ---------------------------------------------------------------- item generation


_SAFE_BUILTINS = {
    "len": len,
    "sum": sum,
    "max": max,
    "min": min,
    "sorted": sorted,
    "abs": abs,
    "str": str,
    "int": int,
    "list": list,
    "range": range,
    "reversed": reversed,
}


def run_expression(expr: str):
    """The value of ``expr``, evaluated with a handful of builtins and nothing else."""
    return eval(expr, {"__builtins__": _SAFE_BUILTINS}, {})  # noqa: S307 - our own generated expressions


def _python_expr(rng: random.Random) -> str:
    words = ["apple", "code", "hello", "data", "sparse", "model", "cat", "python"]
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 5)
    w = rng.choice(words)
    xs = rng.sample(range(1, 10), 4)
    forms = [
        f"len({w!r})",
        f"{w!r}.upper()",
        f"{w!r}[{c - 1}]",
        f"{w!r}[::-1]",
        f"{a} * {b} - {c}",
        f"{a * b + c} // {a}",
        f"{a * b + c} % {a}",
        f"{xs}[{c % 4}]",
        f"sorted({xs})",
        f"max({xs}) - min({xs})",
        f"sum({xs})",
        f"[x * {c} for x in range({min(a, 4)})]",
        f"{w!r} + {str(a)!r}",
        f"len({xs} + [{a}])",
        f"{w!r}.count({w[0]!r})",
        f"{a} ** 2",
    ]
    return rng.choice(forms)


def python_items(n: int, rng: random.Random) -> list[TaskItem]:
    items, seen = [], set()
    while len(items) < n:
        expr = _python_expr(rng)
        if expr in seen:
            continue
        seen.add(expr)
        value = run_expression(expr)
        prompt = f"What is the value of this Python expression? Reply with the value only.\n\n{expr}"
        items.append(TaskItem("python", prompt, repr(value)))
    return items


def arithmetic_items(n: int, rng: random.Random) -> list[TaskItem]:
    items, seen = [], set()
    while len(items) < n:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 99), rng.randint(2, 99))
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        items.append(TaskItem("arithmetic", f"What is {a} {op} {b}? Reply with the number only.", str(value)))
    return items


def _first_prose(paragraphs: Sequence[str]) -> str | None:
    """The first paragraph that is prose (not an indented grammar or code block), as one line."""
    for p in paragraphs:
        if p.strip() and not p.startswith(" ") and not p.startswith("*") and "::=" not in p:
            return " ".join(p.split())
    return None


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.:])(\s|$)", text)
    return (m.group(1) if m else text).rstrip(":") + ("" if (m and m.group(1).endswith(".")) else ".")


def _mask(text: str, name: str) -> str:
    return re.sub(rf"(?i)\b{re.escape(name)}\b", "___", text)


def described_names() -> list[tuple[str, str, str]]:
    """``(family, name, description)`` from the embedded text: every statement with its own topic ('The
    "assert" statement') and every ``str`` method, with the first sentence of its description and the
    name blanked out."""
    from pydoc_data import topics

    out = []
    for key in sorted(topics.topics):
        lines = topics.topics[key].strip().split("\n")
        m = re.fullmatch(r'The "(\w+)" statement', lines[0])
        if not m or m.group(1) != key:
            continue
        prose = _first_prose("\n".join(lines[2:]).split("\n\n"))
        if prose:
            out.append(("statement", key, _mask(_first_sentence(prose), key)))
    text = topics.topics["string-methods"]
    for m in re.finditer(r"^str\.(\w+)\(.*?\)\n\n((?:   .+\n)+)", text, re.M):
        name, desc = m.group(1), " ".join(m.group(2).split())
        out.append(("string method", name, _mask(_first_sentence(desc), name)))
    seen = [d for _, _, d in out]
    return [t for t in out if seen.count(t[2]) == 1]  # a description two names share has no single answer


def _fact_prompt(family: str, desc: str) -> str:
    what = "Python statement" if family == "statement" else "Python string method"
    return f'Which {what} is described here (the name is blanked as ___)?\n\n"{desc}"\n\nReply with the name only.'


def fact_items(rng: random.Random, split: int) -> tuple[list[TaskItem], list[TaskItem]]:
    """Open questions (even positions) and four-way multiple choice (odd positions) over the names the
    embedded text describes; distractors are other names of the same family."""
    names = described_names()
    families = {f: [n for g, n, _ in names if g == f] for f in {g for g, _, _ in names}}
    facts, choice = [], []
    for i, (family, name, desc) in enumerate(names):
        if i % 2 == split:
            facts.append(TaskItem("facts", _fact_prompt(family, desc), name, families[family]))
            continue
        options = [name] + rng.sample([n for n in families[family] if n != name], 3)
        rng.shuffle(options)
        listing = "\n".join(f"{LETTERS[k]}) {o}" for k, o in enumerate(options))
        what = "Python statement" if family == "statement" else "Python string method"
        prompt = (
            f'Which {what} is described here (the name is blanked as ___)?\n\n"{desc}"\n\n{listing}\n\n'
            "Reply with the letter only."
        )
        choice.append(TaskItem("choice", prompt, LETTERS[options.index(name)], options))
    return facts, choice


def task_suite(seed: int = 0, n_python: int = 40, n_arithmetic: int = 40) -> list[TaskItem]:
    """The suite: ``n_python`` + ``n_arithmetic`` generated items and every fact of the embedded text
    (about 30 open, 30 multiple choice); the same seed gives the same items."""
    rng = random.Random(seed)
    facts, choice = fact_items(rng, split=0)
    return python_items(n_python, rng) + arithmetic_items(n_arithmetic, rng) + facts + choice


# ---------------------------------------------------------------- scoring


def _clean(output: str) -> str:
    """The first non-empty line of an answer, without code fences, backticks or a trailing period."""
    text = output.replace("```python", "```").strip()
    lines = [ln.strip() for ln in text.split("\n") if ln.strip() and ln.strip() != "```"]
    line = lines[0] if lines else ""
    line = line.strip("`").strip()
    return line[:-1].strip() if line.endswith(".") and not line.endswith("..") else line


def _python_candidates(output: str) -> list[str]:
    """The spans of an answer that may state the value: the first backticked span, what follows the
    first " is " or "=" of the first line (to the end of the sentence), and the whole first line."""
    line = _clean(output)
    spans = []
    m = re.search(r"`([^`]+)`", output)
    if m:
        spans.append(m.group(1).strip())
    m = re.search(r"(?:\bis\b|=)\s*(.+)$", line)
    if m:
        spans.append(m.group(1).strip().strip("`").rstrip(".").strip())
    return spans + [line]


def _matches_value(span: str, item: TaskItem) -> bool:
    expected = ast.literal_eval(item.answer)
    try:
        got = ast.literal_eval(span)
        if got == expected and type(got) is type(expected):
            return True
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return span in (item.answer, str(expected))


def _stated_integer(output: str) -> str | None:
    """The integer an arithmetic answer states: after the last "=" or " is " of the first line, or the
    line itself when it is just a number; None otherwise (a restated question is not an answer)."""
    line = _clean(output).replace(",", "")
    parts = re.split(r"=|\bis\b", line)
    tail = parts[-1] if len(parts) > 1 else line
    m = re.match(r"\s*\**\s*(-?\d+)\b", tail)
    if m and (len(parts) > 1 or re.fullmatch(r"\s*\**\s*-?\d+\s*\**\s*", tail)):
        return m.group(1)
    return None


def score(item: TaskItem, output: str) -> bool:
    """Whether ``output`` answers ``item`` correctly (see the module docstring for each kind's rule)."""
    if item.kind == "python":
        return any(_matches_value(span, item) for span in _python_candidates(output))
    if item.kind == "arithmetic":
        return _stated_integer(output) == item.answer
    if item.kind == "facts":
        found = {n for n in item.candidates if re.search(rf"\b{re.escape(n)}\b", output, re.I)}
        return found == {item.answer}
    if item.kind == "choice":
        m = re.search(r"answer is:?\s*\**\(?([A-D])\b", output) or re.search(r"\b([A-D])\b", output)
        return m is not None and m.group(1) == item.answer
    raise SparselandError(f"unknown task kind {item.kind!r}; choose from {', '.join(KINDS)}")


# ---------------------------------------------------------------- running and results


@dataclass
class TaskResult:
    label: str
    kinds: list[str]
    correct: list[bool]
    outputs: list[str]
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.correct)

    def accuracy(self, kind: str | None = None) -> float:
        sel = [c for c, k in zip(self.correct, self.kinds, strict=True) if kind in (None, k)]
        if not sel:
            raise SparselandError(f"no items of kind {kind!r}")
        return sum(sel) / len(sel)

    def standard_error(self) -> float:
        """Binomial standard error of the accuracy, sqrt(p (1 - p) / n)."""
        p = self.accuracy()
        return math.sqrt(p * (1 - p) / self.n)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy"] = self.accuracy()
        d["standard_error"] = self.standard_error()
        d["per_kind"] = {k: self.accuracy(k) for k in dict.fromkeys(self.kinds)}
        return d


@dataclass
class PairedComparison:
    """``model`` against ``reference`` on the same items (differences in accuracy, as fractions)."""

    difference: float  # accuracy(model) - accuracy(reference)
    standard_error: float  # of the difference: std of the per-item differences / sqrt(n)
    right_to_wrong: int  # items the reference gets right and the model wrong
    wrong_to_right: int
    n: int

    @property
    def flip_rate(self) -> float:
        return (self.right_to_wrong + self.wrong_to_right) / self.n

    def to_dict(self) -> dict:
        return {**asdict(self), "flip_rate": self.flip_rate}


def paired(model: TaskResult, reference: TaskResult) -> PairedComparison:
    """Paired difference of two results on the same items, with its standard error and the flips."""
    if model.kinds != reference.kinds:
        raise SparselandError("the two results are on different items; run both on the same task suite")
    n = model.n
    d = [int(a) - int(b) for a, b in zip(model.correct, reference.correct, strict=True)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return PairedComparison(
        difference=mean,
        standard_error=math.sqrt(var / n),
        right_to_wrong=sum(x == -1 for x in d),
        wrong_to_right=sum(x == 1 for x in d),
        n=n,
    )


def prompt_ids(tokenizer, item: TaskItem, system: str | None = None) -> torch.Tensor:
    from sparseland.data.chat import chat_ids

    return chat_ids(tokenizer, item.prompt, system)


@torch.inference_mode()
def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[TaskItem],
    label: str = "model",
    system: str | None = None,
    progress: bool = True,
) -> TaskResult:
    """Ask every item through the chat template, decode greedily (lean loop), score the answer."""
    from sparseland.runtime.generate import greedy_generate

    if not items:
        raise SparselandError("no task items; build them with task_suite()")
    model.eval()
    t0 = time.perf_counter()
    outputs, correct = [], []
    for item in tqdm(items, desc=f"tasks {label}", unit="item", disable=not progress, leave=False):
        ids = prompt_ids(tokenizer, item, system)
        res = greedy_generate(model, ids, MAX_NEW_TOKENS[item.kind])
        out = tokenizer.decode(res.tokens, skip_special_tokens=True)
        outputs.append(out)
        correct.append(score(item, out))
    return TaskResult(label, [i.kind for i in items], correct, outputs, time.perf_counter() - t0)


def format_table(results: Sequence[TaskResult], reference: TaskResult | None = None) -> str:
    """Accuracy (%) per kind and overall with its SE; against ``reference``: the paired difference and flips."""
    kinds = list(dict.fromkeys(results[0].kinds))
    head = ["model", *kinds, "all", "SE"] + (["vs ref", "paired SE", "R->W", "W->R"] if reference else [])
    rows = [head]
    for r in results:
        row = [r.label, *(f"{100 * r.accuracy(k):.1f}" for k in kinds), f"{100 * r.accuracy():.1f}"]
        row.append(f"{100 * r.standard_error():.1f}")
        if reference is not None:
            c = paired(r, reference)
            row += [f"{100 * c.difference:+.1f}", f"{100 * c.standard_error:.1f}", str(c.right_to_wrong)]
            row.append(str(c.wrong_to_right))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + f"\n({results[0].n} items; accuracy and differences in points)"

import math
import re

import pytest

from sparseland.errors import SparselandError
from sparseland.evaluate.tasks import (
    TaskItem,
    TaskResult,
    described_names,
    evaluate_tasks,
    format_table,
    paired,
    run_expression,
    score,
    task_suite,
)
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """A byte-level stand-in with a chat template, for the tiny random models (vocab 256; ids < 3 special)."""

    chat_template = "byte-chat"
    eos_token_id = 2
    pad_token_id = 2

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in msgs)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, **kw):
        return {"input_ids": [max(3, b) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i >= 3).decode("utf-8", "replace")


def test_suite_is_deterministic_and_sized():
    a, b = task_suite(seed=0), task_suite(seed=0)
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert [i.prompt for i in task_suite(seed=1)] != [i.prompt for i in a]
    kinds = {k: sum(i.kind == k for i in a) for k in ("python", "arithmetic", "facts", "choice")}
    assert kinds["python"] == 40 and kinds["arithmetic"] == 40 and kinds["facts"] >= 25 and kinds["choice"] >= 25
    assert 100 <= len(a) <= 200
    assert len({i.prompt for i in a}) == len(a)


def test_python_answers_are_what_running_the_expression_gives():
    assert run_expression("sorted([3, 1, 2])") == [1, 2, 3]
    assert run_expression("'code'[::-1]") == "edoc"
    with pytest.raises(NameError):
        run_expression("open('x')")  # no builtins beyond the handful
    for item in task_suite():
        if item.kind == "python":
            expr = item.prompt.rsplit("\n\n", 1)[1]
            assert item.answer == repr(run_expression(expr))
        if item.kind == "arithmetic":
            a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)\?", item.prompt).groups()
            assert int(item.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_facts_come_from_the_embedded_text_with_the_name_blanked():
    names = {(f, n): d for f, n, d in described_names()}
    assert "conditional execution" in names[("statement", "if")]
    assert names[("string method", "capitalize")].startswith("Return a copy of the string with its first character")
    assert ("statement", "break") not in names  # break and continue share one description: no single answer
    for (_, n), d in names.items():
        assert not re.search(rf"\b{n}\b", d, re.I), (n, d)
    for item in task_suite():
        if item.kind == "choice":
            options = re.findall(r"^([A-D])\) (\w+)$", item.prompt, re.M)
            assert [o for _, o in options] == item.candidates and len(set(item.candidates)) == 4
            right = dict(options)[item.answer]
            assert any(n == right and d in item.prompt for (_, n), d in names.items())


@pytest.mark.parametrize(
    ("kind", "answer", "output", "right"),
    [
        ("python", "6", "6", True),
        ("python", "6", "```\n6\n```", True),
        ("python", "6", "The answer is 6.", True),
        ("python", "6", "7", False),
        ("python", "6", "6.0", False),  # a float is not the int the expression gives
        ("python", "'CAT'", "'CAT'", True),
        ("python", "'CAT'", "CAT", True),
        ("python", "'CAT'", "cat", False),
        ("python", "[0, 3, 6]", "[0, 3, 6]", True),
        ("python", "[0, 3, 6]", "[0, 3, 6, 9]", False),
        ("arithmetic", "87", "The answer is 87.", True),
        ("arithmetic", "-35", "-35", True),
        ("arithmetic", "-35", "35", False),
        ("arithmetic", "1,234", "", False),
        ("arithmetic", "126", "39 + 48 = 126", True),  # the stated result, not the restated operands
        ("arithmetic", "21", "42 - 21", False),  # a restated question states nothing
        ("arithmetic", "22", "75 - 33 is 22.", True),
        ("arithmetic", "84", "To add 63 and 21, we need to combine the numbers", False),
        ("python", "3", "The value of this Python expression is 3.", True),
        ("python", "'hello'", "The value of this Python expression is `'hello'`.", True),
        ("python", "'olleh'", "The value of this Python expression is `'hello'`.", False),
        ("python", "5", "The expression `max([5, 7, 8, 3]) - min([5, 7,", False),
    ],
)
def test_score_python_and_arithmetic(kind, answer, output, right):
    assert score(TaskItem(kind, "q", answer), output) is right


def test_score_facts_and_choice():
    fact = TaskItem("facts", "q", "nonlocal", ["global", "nonlocal", "pass"])
    assert score(fact, "nonlocal") and score(fact, "The `nonlocal` statement.")
    assert not score(fact, "global or nonlocal") and not score(fact, "global") and not score(fact, "nonlocals")
    choice = TaskItem("choice", "q", "C", ["isascii", "endswith", "count", "istitle"])
    assert score(choice, "C") and score(choice, "C) count") and score(choice, "The answer is C.")
    assert not score(choice, "B") and not score(choice, "count")
    assert score(choice, "A) isascii\n\nThe correct answer is C)") and not score(choice, "C) count\nThe answer is: B")
    with pytest.raises(SparselandError, match="unknown task kind"):
        score(TaskItem("essay", "q", "x"), "x")


def test_paired_difference_hand_computed():
    kinds = ["python"] * 5
    ref = TaskResult("dense", kinds, [True, True, False, False, True], [""] * 5)
    mod = TaskResult("pruned", kinds, [True, False, True, False, False], [""] * 5)
    c = paired(mod, ref)
    # d = (0, -1, 1, 0, -1): mean -0.2, sample variance 2.8 / 4 = 0.7, SE sqrt(0.7 / 5)
    assert c.difference == pytest.approx(-0.2)
    assert c.standard_error == pytest.approx(math.sqrt(0.7 / 5))
    assert (c.right_to_wrong, c.wrong_to_right) == (2, 1) and c.flip_rate == pytest.approx(0.6)
    assert ref.accuracy() == pytest.approx(0.6) and ref.standard_error() == pytest.approx(math.sqrt(0.24 / 5))
    table = format_table([ref, mod], reference=ref)
    assert "-20.0" in table and "60.0" in table
    with pytest.raises(SparselandError, match="different items"):
        paired(mod, TaskResult("x", ["facts"] * 5, [True] * 5, [""] * 5))


def test_evaluate_tasks_runs_greedy_through_the_chat_template():
    model = make_tiny_llama(max_pos=1024)
    items = [i for i in task_suite()[::20]]
    res = evaluate_tasks(model, ByteTokenizer(), items, label="tiny", progress=False)
    assert res.n == len(items) and len(res.outputs) == len(items)
    assert res.correct == [score(i, o) for i, o in zip(items, res.outputs, strict=True)]
    again = evaluate_tasks(model, ByteTokenizer(), items, label="tiny", progress=False)
    assert again.outputs == res.outputs  # greedy: the same answers
    assert paired(again, res).difference == 0 and paired(again, res).flip_rate == 0

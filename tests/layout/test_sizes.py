"""Size limits of the source tree (issue 17): no source file in ``sparseland/`` or ``benchmarks/``
over 500 lines, no function over 80 lines. A function's length is its whole ``def`` (first line of
the signature to its last line, nested functions included), so splitting a function means naming
helpers, not nesting them.

The allow-list below names the files another engineer owns, each with its reason. It may only
shrink: an entry that no longer breaks a limit fails the test too, so it gets deleted."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("sparseland", "benchmarks")
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".hpp", ".c", ".sh"}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80

# path (relative to the repo, a trailing "/" for a whole folder) -> reason
ALLOWED = {
    "sparseland/runtime/generate.py": "decode loop; owned by the runtime engineer (issue 17 part 4)",
    "sparseland/runtime/csrc/": "qdense.cpp / qsparse.cpp: AVX2 and AVX-512 halves to split next",
    "benchmarks/bench_vs_llamacpp.py": "peer benchmark; owned by the runtime engineer",
}


def _allowed(rel: str) -> bool:
    return any(rel == key or (key.endswith("/") and rel.startswith(key)) for key in ALLOWED)


def _sources() -> list[Path]:
    out = []
    for root in ROOTS:
        out += [p for p in (REPO / root).rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES]
    return sorted(out)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length) of every function in ``path`` longer than ``limit``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if length > limit:
                    out.append((name, child.lineno, length))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def _violations(path: Path) -> list[str]:
    rel = _rel(path)
    out = []
    lines = _line_count(path)
    if lines > MAX_FILE_LINES:
        out.append(f"{rel}: {lines} lines (limit {MAX_FILE_LINES})")
    if path.suffix == ".py":
        for name, line, length in long_functions(path):
            out.append(f"{rel}:{line} {name}: {length} lines (limit {MAX_FUNCTION_LINES})")
    return out


def test_no_file_or_function_over_the_limits():
    bad = [v for p in _sources() if not _allowed(_rel(p)) for v in _violations(p)]
    assert not bad, "split by what the code does (named helpers, modules):\n" + "\n".join(bad)


@pytest.mark.parametrize("entry", sorted(ALLOWED))
def test_allow_list_only_shrinks(entry):
    """Every allow-listed path exists and still breaks a limit; otherwise delete its entry."""
    target = REPO / entry
    assert target.exists(), f"{entry} is gone: delete it from ALLOWED"
    files = [p for p in _sources() if _rel(p).startswith(entry)] if entry.endswith("/") else [target]
    assert any(_violations(p) for p in files), f"{entry} is within the limits now: delete it from ALLOWED"


def test_the_counter_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = tmp_path / "m.py"
    src.write_text(f"class K:\n  def short(self):\n    return 1\n  def long(self):\n{body}\n", encoding="utf-8")
    assert long_functions(src) == [("K.long", 4, MAX_FUNCTION_LINES + 1)]
    assert long_functions(src, limit=MAX_FUNCTION_LINES + 1) == []


if __name__ == "__main__":  # python -m tests.layout.test_sizes: every file and function over a limit
    for path in _sources():
        for violation in _violations(path):
            print(("allowed  " if _allowed(_rel(path)) else "VIOLATES ") + violation)

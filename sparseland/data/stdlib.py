"""A second offline text, big enough for millions of tokens: the Python standard library's own
``.py`` sources, on every machine that has Python, license-clean (PSF).

Files are taken in sorted relative-path order, so the text is the same for the same Python version.
The split is by file, never inside one: a file whose position in that order is a multiple of
``eval_every`` belongs to the evaluation part, every other file to the training part. Excluded:
``site-packages`` (not the standard library), ``test``/``tests`` packages (generated data, huge
literals), ``idlelib``/``turtledemo``, and ``pydoc_data`` (it *is* the embedded text, which must
stay disjoint from this one).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from sparseland.errors import SparselandError

SPLITS = ("train", "eval")
_EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "pydoc_data",
    "__pycache__",
}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train", eval_every: int = 10) -> list[Path]:
    """The standard library's ``.py`` files of one split, in a fixed order."""
    if split not in SPLITS:
        raise SparselandError(f"split {split!r} is not one of {SPLITS}")
    if eval_every < 2:
        raise SparselandError(f"eval_every={eval_every} must be at least 2")
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise SparselandError(f"no .py files found under {root}; is this Python's standard library installed?")
    want_eval = split == "eval"
    return [p for i, p in enumerate(files) if (i % eval_every == 0) == want_eval]


def stdlib_text(split: str = "train", max_chars: int | None = None, eval_every: int = 10) -> str:
    """The sources of one split joined with a file header line each, cut to ``max_chars`` at a file
    boundary (the first file is always whole). Files that are not UTF-8 are skipped."""
    root = stdlib_root()
    parts: list[str] = []
    total = 0
    for path in stdlib_files(split, eval_every):
        try:
            body = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chunk = f"# file: {path.relative_to(root).as_posix()}\n{body.strip()}\n\n"
        if max_chars is not None and parts and total + len(chunk) > max_chars:
            break
        parts.append(chunk)
        total += len(chunk)
    return "".join(parts)


def stdlib_description() -> str:
    return f"python{sys.version_info.major}.{sys.version_info.minor} standard library sources ({stdlib_root()})"

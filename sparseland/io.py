"""Small file helpers shared by the package and the benchmark scripts."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_results(directory: str | Path, stem: str, data: dict, markdown: str) -> None:
    """A benchmark's results: ``{stem}.json`` (``data``, indented) and ``{stem}.md`` in ``directory``,
    each written atomically."""
    directory = Path(directory)
    write_text_atomic(directory / f"{stem}.json", json.dumps(data, indent=2))
    write_text_atomic(directory / f"{stem}.md", markdown)


@contextmanager
def atomic_directory(out_dir: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir`` to write into; when the block ends it is renamed to
    ``out_dir`` (mode 0755), and if the block raises it is removed, so ``out_dir`` is never half-written."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

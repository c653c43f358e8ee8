"""The frontier's result store: one SQLite file, one transaction per finished cell.

Why SQLite and not JSON lines: SQLite's rollback journal makes each ``put`` all-or-nothing even under
``kill -9`` or a power cut (a half-written cell is rolled back on the next open), it needs no
hand-written validation of partial lines, and it ships with Python. Files that are not ours are
recognised by ``PRAGMA application_id`` and the schema version by ``PRAGMA user_version``; a file
that is not a database, is damaged, or belongs to another program raises ``SparselandError``.

Rows are keyed by the cell key (see ``frontier.cell_key``): a changed setting or code version gives
a new key, so old rows are simply not found again; they stay in the file as history. The ``meta``
table remembers the grid of the last run, which is what ``sparseland report`` renders.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from sparseland.errors import SparselandError

STORE_NAME = "results.sqlite"
APPLICATION_ID = 0x53504C44  # "SPLD"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    result TEXT NOT NULL,
    finished_at REAL NOT NULL
);
"""


def _bad(path: Path, why: str) -> SparselandError:
    return SparselandError(
        f"{path} is not a usable sparseland results store ({why}); "
        "pass another --out directory, or delete the file to start over"
    )


class ResultStore:
    """Finished frontier cells, stored atomically one by one. Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if self.path.exists() and not self.path.is_file():
            raise _bad(self.path, "it is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0)
        except sqlite3.Error as exc:
            raise _bad(self.path, str(exc)) from exc
        try:
            self._open(fresh)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise _bad(self.path, f"SQLite says: {exc}") from exc
        except SparselandError:
            self._db.close()
            raise

    def _open(self, fresh: bool) -> None:
        db = self._db
        if fresh:
            with db:
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.executescript(_SCHEMA)
            return
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise _bad(self.path, "it is an SQLite file written by another program")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SparselandError(
                f"{self.path} was written by a newer sparseland (store schema {version} > {SCHEMA_VERSION}); "
                "upgrade sparseland or use another --out directory"
            )
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise _bad(self.path, f"integrity check failed: {check}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "cells"} <= tables:  # our file, but its creation was interrupted: complete it
            with db:
                db.executescript(_SCHEMA)

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- cells -----------------------------------------------------------------------------------
    def _decode(self, key: str, text: str) -> dict[str, Any]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(self.path, f"cell {key[:12]} holds invalid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("key") != key or "cell" not in data:
            raise _bad(self.path, f"cell {key[:12]} is not a frontier result")
        return data

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result of cell ``key``, or ``None`` if it has not finished."""
        row = self._db.execute("SELECT result FROM cells WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._decode(key, row[0])

    def keys(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT key FROM cells")}

    def put(self, result: dict[str, Any]) -> None:
        """Store one finished cell in its own transaction (replacing an older row with the same key)."""
        text = json.dumps(result, sort_keys=True, allow_nan=True)
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO cells (key, method, result, finished_at) VALUES (?, ?, ?, ?)",
                (result["key"], result["cell"]["method"], text, float(result.get("finished_at", 0.0))),
            )

    def results(self, keys: list[str] | None = None) -> list[dict[str, Any]]:
        """Finished results for ``keys`` (in that order, missing ones skipped), or all of them."""
        if keys is None:
            rows = self._db.execute("SELECT key, result FROM cells ORDER BY finished_at").fetchall()
            return [self._decode(k, t) for k, t in rows]
        found = [self.get(k) for k in keys]
        return [r for r in found if r is not None]

    # -- the grid of the last run ----------------------------------------------------------------
    def set_meta(self, name: str, value: Any) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def get_meta(self, name: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except json.JSONDecodeError as exc:
            raise _bad(self.path, f"meta entry {name!r} holds invalid JSON") from exc


def open_store(out_dir: str | Path, *, must_exist: bool = False) -> ResultStore:
    """Open (or create) the store in ``out_dir``; with ``must_exist`` a missing store is an error."""
    out = Path(out_dir).expanduser()
    path = out / STORE_NAME
    if must_exist and not path.is_file():
        where = f"{out} does not exist" if not out.exists() else f"{out} holds no {STORE_NAME}"
        raise SparselandError(f"no frontier results to report: {where}; run `sparseland frontier --out {out}` first")
    if out.exists() and not out.is_dir():
        raise SparselandError(f"--out {out} is a file, not a directory; pass a directory")
    return ResultStore(path)

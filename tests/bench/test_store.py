"""The result store: round trip, and clear errors for corrupted, foreign and newer files."""

from __future__ import annotations

import sqlite3

import pytest

from sparseland.bench.store import STORE_NAME, ResultStore, open_store
from sparseland.errors import SparselandError


def _result(key: str, ppl: float = 10.0) -> dict:
    cell = {"method": "magnitude", "sparsity": 0.5, "pattern": "unstructured", "options": {}}
    return {"key": key, "cell": cell, "perplexity": ppl, "finished_at": 1.0}


def test_round_trip_and_meta(tmp_path):
    with open_store(tmp_path) as store:
        store.put(_result("a", 3.0))
        store.put(_result("b", 4.0))
        store.put(_result("a", 5.0))  # same key: replaced
        store.set_meta("grid", ["b", "a", "missing"])
    with open_store(tmp_path, must_exist=True) as store:
        assert store.keys() == {"a", "b"}
        assert store.get("a")["perplexity"] == 5.0
        assert store.get("zzz") is None
        assert [r["key"] for r in store.results(store.get_meta("grid"))] == ["b", "a"]
        assert store.get_meta("nothing", 7) == 7


def test_garbage_file_is_a_clear_error(tmp_path):
    (tmp_path / STORE_NAME).write_bytes(b"this is not a database at all\n" * 100)
    with pytest.raises(SparselandError, match="not a usable sparseland results store"):
        open_store(tmp_path)


def test_foreign_sqlite_file_is_a_clear_error(tmp_path):
    db = sqlite3.connect(tmp_path / STORE_NAME)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(SparselandError, match="another program"):
        open_store(tmp_path)


def test_truncated_store_is_a_clear_error(tmp_path):
    with open_store(tmp_path) as store:
        for i in range(20):
            store.put({**_result(f"k{i}"), "padding": "x" * 4000})  # spread over many pages
    path = tmp_path / STORE_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SparselandError, match="not a usable"), open_store(tmp_path) as store:
        store.results()


def test_invalid_row_is_a_clear_error(tmp_path):
    with open_store(tmp_path) as store:
        store.put(_result("a"))
    db = sqlite3.connect(tmp_path / STORE_NAME)
    db.execute("UPDATE cells SET result = '{broken' WHERE key = 'a'")
    db.commit()
    db.close()
    with open_store(tmp_path) as store, pytest.raises(SparselandError, match="invalid JSON"):
        store.get("a")


def test_newer_schema_is_a_clear_error(tmp_path):
    ResultStore(tmp_path / STORE_NAME).close()
    db = sqlite3.connect(tmp_path / STORE_NAME)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(SparselandError, match="newer sparseland"):
        open_store(tmp_path)


def test_bad_out_paths(tmp_path):
    with pytest.raises(SparselandError, match="does not exist"):
        open_store(tmp_path / "nope", must_exist=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SparselandError, match="not a directory"):
        open_store(tmp_path / "file")
    (tmp_path / "d" / STORE_NAME).mkdir(parents=True)
    with pytest.raises(SparselandError, match="not a file"):
        open_store(tmp_path / "d")

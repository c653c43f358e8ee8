"""sparseland.io: the atomic writers shared by checkpoints, out-of-core pruning and the benchmarks."""

import stat

import pytest

from sparseland.io import atomic_directory


def test_atomic_directory_renames_into_place(tmp_path):
    out = tmp_path / "a" / "ck"
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith("ck.tmp-")
        (tmp / "f.txt").write_text("x")
        assert not out.exists()  # nothing at the destination until the block ends
    assert (out / "f.txt").read_text() == "x"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert not list(out.parent.glob("*.tmp-*"))


def test_atomic_directory_leaves_nothing_when_the_block_fails(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out) as tmp:
        (tmp / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

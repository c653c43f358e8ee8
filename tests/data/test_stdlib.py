from sparseland.data.stdlib import stdlib_files, stdlib_text


def test_splits_are_disjoint_and_cover_the_library():
    train, ev = stdlib_files("train"), stdlib_files("eval")
    assert train and ev
    assert not set(train) & set(ev)
    assert 8 * len(ev) <= len(train) <= 10 * len(ev)
    names = {p.name for p in train + ev}
    assert "topics.py" not in names  # pydoc_data (the embedded text) is excluded
    assert all("site-packages" not in p.parts for p in train + ev)


def test_text_is_deterministic_and_cut_at_file_boundaries():
    a = stdlib_text("eval", max_chars=50_000)
    b = stdlib_text("eval", max_chars=50_000)
    assert a == b
    assert len(a) <= 50_000 or a.count("# file: ") == 1
    assert a.startswith("# file: ")


def test_train_split_has_millions_of_characters():
    assert len(stdlib_text("train", max_chars=5_000_000)) > 4_000_000

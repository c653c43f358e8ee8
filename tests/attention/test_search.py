"""Offline per-head pattern search (MoA style): budget respected, choices saved with the model."""

import pytest
import torch

from sparseland.api import sparsify_
from sparseland.attention import (
    HeadPatternConfig,
    StreamingConfig,
    load_head_patterns,
    measured_sparsity,
    remove,
    save_head_patterns,
    search_head_patterns,
)
from sparseland.errors import SparselandError
from tests.conftest import make_tiny_llama

CANDIDATES = [StreamingConfig(block_size=16, sink=16, window=w) for w in (0.1, 0.5, 1.0)]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(layers=2, max_pos=512)


def test_search_respects_budget_and_round_trips(model, tmp_path):
    calib = torch.randint(3, 256, (2, 128), generator=torch.Generator().manual_seed(0))
    dense_only = search_head_patterns(model, calib, CANDIDATES, budget=1.0)
    assert all(c == 2 for row in dense_only.choice for c in row)  # the exact (dense) candidate wins
    cfg = search_head_patterns(model, calib, CANDIDATES, budget=0.5)
    assert len(cfg.choice) == 2 and all(len(row) == 4 for row in cfg.choice)
    assert any(c != 2 for row in cfg.choice for c in row)
    path = save_head_patterns(cfg, tmp_path)
    assert path.name == "sparse_attention.json" and load_head_patterns(tmp_path) == cfg
    sparsify_(model, cfg)
    try:
        ids = torch.randint(3, 256, (1, 128), generator=torch.Generator().manual_seed(1))
        model(ids)
        assert measured_sparsity(model) > 0.0
        masks = model._sparseland_attention.last_masks
        # each head carries its chosen candidate's pattern; 8 blocks, the last row keeps sink + window
        blocks_in_last_row = {0: 1 + 1, 1: 1 + 4, 2: 8}
        for layer, row in enumerate(cfg.choice):
            for h, c in enumerate(row):
                assert int(masks[layer][h, -1].sum()) == blocks_in_last_row[c]
    finally:
        remove(model)


def test_head_pattern_config_validates():
    with pytest.raises(SparselandError, match="index candidates"):
        HeadPatternConfig(block_size=16, candidates=CANDIDATES, choice=[[0, 5]])
    with pytest.raises(SparselandError, match="block_size"):
        HeadPatternConfig(block_size=32, candidates=CANDIDATES, choice=[[0]])
    with pytest.raises(SparselandError, match="no searched attention patterns"):
        load_head_patterns("/nonexistent/dir")

"""Training each method on a tiny random Llama: budget, base untouched, learning, sparsity kept, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.peft import (
    LoRAConfig,
    S2FTConfig,
    SpIELConfig,
    load_adapter,
    make_config,
    merge_adapter_,
    save_adapter,
    train_adapter,
    unmerge_adapter_,
)
from sparseland.peft.train import parameter_count
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ["spiel", "shira", "lift", "s2ft", "lora", "sparse-lora"]
EXTRA = {"spiel": {"update_every": 4, "accumulate": 2, "swap_fraction": 0.5}, "lift": {"rank": 4}}


def _data(n=4, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _loss(model, x):
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_within_budget_and_leaves_the_base_alone(method, tmp_path):
    model = make_tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = _data()
    cfg = make_config(method, budget=0.02, lr=1e-2, **EXTRA.get(method, {}))
    res = train_adapter(model, cfg, x, steps=12, batch_size=4, progress=False)
    budget = round(0.02 * parameter_count(model))
    assert res.budget == budget and 0.85 * budget <= res.n_params <= budget
    assert res.adapter.n_params == res.n_params
    assert type(model).__name__ == "LlamaForCausalLM" and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())  # training never wrote W
    before = _loss(model, x)
    record = merge_adapter_(model, load_adapter(save_adapter(res.adapter, tmp_path / "a.safetensors")))
    assert _loss(model, x) < before - 0.05  # the merged adapter carries what training learned
    assert abs(_loss(model, x) - res.losses[-1]["loss"]) < 0.5
    unmerge_adapter_(model, record)
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())


def test_spiel_swaps_indices_at_a_fixed_budget():
    model = make_tiny_llama()
    cfg = SpIELConfig(budget=0.02, lr=1e-2, update_every=3, accumulate=2, swap_fraction=0.5)
    first = train_adapter(make_tiny_llama(), SpIELConfig(budget=0.02, swap_fraction=0.0), _data(), 1, progress=False)
    res = train_adapter(model, cfg, _data(), steps=10, progress=False)
    assert len(res.swaps) == 3 and all(s > 0 for s in res.swaps)  # updates after steps 3, 6, 9
    assert res.swaps[0] > res.swaps[-1]  # the swap fraction decays (cosine)
    for name, d in res.adapter.deltas.items():
        assert d.indices.numel() == first.adapter.deltas[name].indices.numel()  # same budget per weight
        assert torch.all(d.indices[1:] > d.indices[:-1])
    changed = sum(
        int((~torch.isin(d.indices, first.adapter.deltas[n].indices)).sum()) for n, d in res.adapter.deltas.items()
    )
    assert changed > 0


def test_s2ft_trains_whole_heads_and_channels_only():
    model = make_tiny_llama()  # hidden 64, 4 heads of 16
    res = train_adapter(model, S2FTConfig(budget=0.05, lr=1e-2), _data(), steps=3, progress=False)
    assert {n.rsplit(".", 2)[-2] for n in res.adapter.deltas} <= {"o_proj", "down_proj"}
    heads = [d.cols for n, d in res.adapter.deltas.items() if "o_proj" in n]
    assert heads and all(c.numel() % 16 == 0 and torch.all(c.view(-1, 16)[:, 0] % 16 == 0) for c in heads)
    with pytest.raises(SparselandError, match="o_proj and down_proj"):
        S2FTConfig(targets=("q_proj",))


def test_lora_is_peft_and_gets_the_rank_that_fits():
    model = make_tiny_llama()
    res = train_adapter(model, LoRAConfig(budget=0.02), _data(), steps=2, progress=False)
    per_rank = 2 * ((64 + 64) + (64 + 32))  # q_proj 64->64, v_proj 64->32, two layers
    assert res.n_params == (res.budget // per_rank) * per_rank
    assert res.peft_adapter_bytes > 4 * res.n_params  # peft's own file, for the size comparison
    assert set(res.adapter.low_rank) == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")
    }


def _prune_half(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                thr = p.abs().flatten().kthvalue(p.numel() // 2).values
                p[p.abs() <= thr] = 0.0
    return model


@pytest.mark.parametrize("method", METHODS)
def test_on_a_pruned_model_the_merged_model_keeps_every_zero(method):
    model = _prune_half(make_tiny_llama())
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n}
    cfg = make_config(method, budget=0.02, lr=1e-2, **EXTRA.get(method, {}))
    res = train_adapter(model, cfg, _data(), steps=6, progress=False)
    assert res.adapter.metadata["keep_sparsity"] is True
    merge_adapter_(model, res.adapter)
    for n, z in zeros.items():
        assert torch.equal(dict(model.named_parameters())[n] == 0, z), n


def test_pruned_merged_model_runs_on_the_sparse_runtime():
    from sparseland.runtime import to_sparse_runtime_

    model = _prune_half(make_tiny_llama())
    res = train_adapter(model, make_config("spiel", budget=0.02, lr=1e-2, **EXTRA["spiel"]), _data(), 6, progress=False)
    merge_adapter_(model, res.adapter)
    x = _data(2, 16, seed=5)
    with torch.no_grad():
        dense = model(input_ids=x).logits
        report = to_sparse_runtime_(model, format="bitmask")
        sparse = model(input_ids=x).logits
    assert report is not None
    assert any(type(m).__name__ == "SparseLinear" for m in model.modules())
    assert torch.allclose(dense, sparse, atol=1e-4)


def test_bad_input():
    with pytest.raises(SparselandError, match="0.003"):
        SpIELConfig(budget=3)
    with pytest.raises(SparselandError, match="unknown method"):
        make_config("dora")
    with pytest.raises(SparselandError, match="accumulate"):
        SpIELConfig(update_every=2, accumulate=5)
    with pytest.raises(SparselandError, match="exceeds"):
        train_adapter(make_tiny_llama(), SpIELConfig(n_params=10**9), _data(), 1, progress=False)
    with pytest.raises(SparselandError, match="LongTensor"):
        train_adapter(make_tiny_llama(), SpIELConfig(), _data().float(), 1, progress=False)


def test_cli_peft_writes_adapter_and_report(tmp_path, capsys):
    from sparseland.cli import main
    from sparseland.runtime.checkpoint import save_sparse_checkpoint
    from tests.models.test_loader import _word_tokenizer

    ck = save_sparse_checkpoint(make_tiny_llama(), _word_tokenizer(), tmp_path / "m", metadata={})
    text = tmp_path / "words.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 50, (4000,), generator=g)))
    args = ["peft", "--model", str(ck), "--method", "shira", "--budget", "0.02", "--train-text", str(text)]
    small = ["--seq-len", "32", "--steps", "3", "--eval-windows", "2", "--train-windows", "8", "--no-progress"]
    assert main([*args, *small, "--out", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["trainable_params"] > 0
        and report["adapter_bytes"] == (tmp_path / "run" / "adapter.safetensors").stat().st_size
    )
    assert set(report["perplexity_after"]) == {"target", "embedded"}
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 3
    assert main([*args, *small, "--out", str(tmp_path / "run")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["peft", "--model", str(ck), "--budget", "7", "--train-text", str(text), "--out", "x"])
    assert "(0, 1)" in capsys.readouterr().err

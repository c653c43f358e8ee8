import copy
import json

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.models import load_model
from sparseland.runtime.checkpoint import read_manifest
from sparseland.training.distill import distillation_loss
from sparseland.training.finetune import FinetuneConfig, finetune, lr_at
from sparseland.training.masking import default_filter
from tests.conftest import make_tiny_llama
from tests.runtime.helpers import magnitude_prune_

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed: int = 0):
    teacher = make_tiny_llama(seed=seed)
    student = copy.deepcopy(teacher)
    magnitude_prune_(student, 0.5)
    return student, teacher


def _windows(n: int = 16, t: int = 32, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _full_loss(student, teacher) -> float:
    x = _windows()
    s, t = student(x, output_hidden_states=True), teacher(x, output_hidden_states=True)
    out = distillation_loss(
        s.logits, t.logits, feature_weight=1.0, student_hidden=s.hidden_states[1:], teacher_hidden=t.hidden_states[1:]
    )
    return out.total.item()


def _masked(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if default_filter(n, p)}


def test_loss_falls_and_mask_is_unchanged_in_the_saved_checkpoint(tmp_path):
    student, teacher = _pair()
    before = _masked(student)
    loss0 = _full_loss(student, teacher)
    res = finetune(
        student, teacher, _windows(), steps=12, lr=1e-3, batch_size=4, out_dir=tmp_path / "ft", progress=False
    )
    assert len(res.losses) == 12 and _full_loss(student, teacher) < 0.7 * loss0  # on all windows, before vs after
    assert res.density == pytest.approx(0.5, abs=0.01)

    saved, _ = load_model(tmp_path / "ft")  # a sparse checkpoint: sparseland.json written, checkpoints gone
    assert not (tmp_path / "ft" / "checkpoints").exists()
    after = dict(saved.named_parameters())
    for name, w0 in before.items():
        w1 = after[name].detach()
        pruned = w0 == 0
        assert torch.all(w1[pruned].view(torch.int32) == 0), name  # bit-exact +0.0 at every pruned entry
        assert torch.all(w1[~pruned] != 0), name  # the zero pattern did not grow either
        assert not torch.equal(w1, w0), name  # and the kept weights did train
    meta = read_manifest(tmp_path / "ft")["metadata"]["finetune"]
    assert meta["config"]["steps"] == 12 and len(meta["losses"]) == 12 and meta["resumed_from"] == 0


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def hook(s, _rec):
        if s == step:
            raise _Crash

    return hook


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    kwargs = dict(steps=8, lr=2e-3, batch_size=4, grad_accum=2, save_every=3, progress=False, feature_weight=1.0)
    full, teacher = _pair()
    ref = finetune(full, teacher, _windows(), out_dir=tmp_path / "a", **kwargs)

    student, teacher = _pair()
    with pytest.raises(_Crash):
        finetune(student, teacher, _windows(), out_dir=tmp_path / "b", on_step=_crash_at(7), **kwargs)
    ckdir = tmp_path / "b" / "checkpoints"
    assert [p.name for p in ckdir.iterdir()] == ["step-00000006"]
    (ckdir / "step-00000009.tmp-crashed").mkdir()  # a save interrupted half-way is ignored
    student, teacher = _pair()  # a fresh process: reload the pruned model
    res = finetune(student, teacher, _windows(), out_dir=tmp_path / "b", **kwargs)
    assert res.resumed_from == 6
    assert res.losses == ref.losses
    a, b = load_model(tmp_path / "a")[0].state_dict(), load_model(tmp_path / "b")[0].state_dict()
    for name in a:
        assert torch.equal(a[name].view(torch.int32), b[name].view(torch.int32)), name  # bit-exact


def test_resume_refuses_other_settings_and_finished_runs(tmp_path):
    kwargs = dict(batch_size=2, save_every=1, progress=False)
    student, teacher = _pair()
    with pytest.raises(_Crash):
        finetune(student, teacher, _windows(), 4, 1e-3, out_dir=tmp_path / "r", on_step=_crash_at(1), **kwargs)
    with pytest.raises(SparselandError, match="lr=0.001, not 0.002"):
        finetune(student, teacher, _windows(), 4, 2e-3, out_dir=tmp_path / "r", **kwargs)
    with pytest.raises(SparselandError, match="unfinished"):
        finetune(student, teacher, _windows(), 4, 1e-3, out_dir=tmp_path / "r", resume=False, **kwargs)
    other, _ = _pair(seed=1)
    with pytest.raises(SparselandError, match="mask_sha256"):
        finetune(other, teacher, _windows(), 4, 1e-3, out_dir=tmp_path / "r", **kwargs)
    finetune(student, teacher, _windows(), 4, 1e-3, out_dir=tmp_path / "r", **kwargs)
    with pytest.raises(SparselandError, match="finished"):
        finetune(student, teacher, _windows(), 4, 1e-3, out_dir=tmp_path / "r", **kwargs)


def test_bad_input(tmp_path):
    student, teacher = _pair()
    with pytest.raises(SparselandError, match="almost no zero weights"):
        finetune(teacher, copy.deepcopy(teacher), _windows(), 2, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(SparselandError, match="vocabulary"):
        finetune(student, make_tiny_llama(vocab=300), _windows(), 2, out_dir=tmp_path / "x", progress=False)
    with pytest.raises(SparselandError, match="steps=0"):
        finetune(student, teacher, _windows(), 0, out_dir=tmp_path / "x")
    with pytest.raises(SparselandError, match="grad_accum"):
        FinetuneConfig(steps=5, batch_size=3, grad_accum=2)
    with pytest.raises(SparselandError, match="token ids outside"):
        finetune(student, teacher, _windows(vocab=400), 2, out_dir=tmp_path / "x", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f.txt").write_text("x")
    with pytest.raises(SparselandError, match="not a fine-tune run"):
        finetune(student, teacher, _windows(), 2, out_dir=tmp_path / "busy", progress=False)


def test_schedule_warms_up_then_decays_to_zero():
    cfg = FinetuneConfig(steps=100, lr=1.0, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.001


def test_cli_finetune_and_bad_input(tmp_path, capsys):
    from sparseland.cli import main
    from sparseland.runtime.checkpoint import save_sparse_checkpoint
    from tests.models.test_loader import _word_tokenizer

    student, teacher = _pair()
    tok = _word_tokenizer()
    pruned = save_sparse_checkpoint(student, tok, tmp_path / "pruned", metadata={"method": "magnitude"})
    dense = save_sparse_checkpoint(teacher, tok, tmp_path / "dense", metadata={})
    text = tmp_path / "words.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (3000,), generator=g)))
    common = ["--teacher", str(dense), "--text", str(text), "--seq-len", "32", "--eval-seq-len", "64"]

    args = ["finetune", "--model", str(pruned), *common, "--steps", "3", "--batch-size", "2"]
    assert main([*args, "--eval-windows", "2", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuned" in out and "x dense" in out
    meta = read_manifest(tmp_path / "out")["metadata"]
    assert meta["evaluation"]["after"]["n_windows"] == 2 and meta["source"]["metadata"] == {"method": "magnitude"}

    assert main(["finetune", "--model", str(dense), *common, "--steps", "3", "--out", str(tmp_path / "o2")]) == 2
    assert "prune it first" in capsys.readouterr().err
    other = save_sparse_checkpoint(make_tiny_llama(vocab=300), tok, tmp_path / "v300", metadata={})
    assert main(["finetune", "--model", str(pruned), "--teacher", str(other), "--steps", "3", "--out", "o3"]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "finished" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--model", str(pruned), "--steps", "0", "--out", "o4"])
    assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["config"]["steps"] == 3


def test_cli_resumes_an_interrupted_run(tmp_path, capsys, monkeypatch):
    import sparseland.training.finetune as ft
    from sparseland.cli import main
    from sparseland.runtime.checkpoint import save_sparse_checkpoint
    from tests.models.test_loader import _word_tokenizer

    student, teacher = _pair()
    pruned = save_sparse_checkpoint(student, _word_tokenizer(), tmp_path / "pruned", metadata={})
    dense = save_sparse_checkpoint(teacher, _word_tokenizer(), tmp_path / "dense", metadata={})
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i % 97}" for i in range(2000)))
    args = ["finetune", "--model", str(pruned), "--teacher", str(dense), "--text", str(text), "--seq-len", "16"]
    args += ["--steps", "4", "--batch-size", "2", "--save-every", "1", "--eval-windows", "0", "--no-progress"]
    args += ["--out", str(tmp_path / "out")]
    real = ft.batch_indices

    def interrupted(step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(ft, "batch_indices", interrupted)
    assert main(args) == 130
    monkeypatch.setattr(ft, "batch_indices", real)
    assert main([*args, "--no-resume"]) == 2
    assert "unfinished" in capsys.readouterr().err
    assert main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "out")["metadata"]["finetune"]["losses"]) == 4

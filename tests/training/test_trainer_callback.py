import torch
from transformers import Trainer, TrainingArguments

from sparseland.training import RigLConfig, SparsityCallback, SRSTEConfig
from sparseland.weights.masks import is_nm
from tests.training._helpers import tiny


def _run(tmp_path, config, steps=3):
    model = tiny()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(0, 64, (12,), generator=gen)), "labels": ids} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    cb = SparsityCallback(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    finally:
        torch.set_num_threads(threads)
    return model, cb.sparsifier


def test_trainer_callback_keeps_rigl_masks(tmp_path):
    model, sp = _run(tmp_path, RigLConfig(sparsity=0.8, update_every=2, total_steps=3))
    assert sp.t == 3
    sp.check()
    assert abs(sp.density() - 0.2) < 0.01
    assert any(u[1] > 0 for u in sp.last_update.values())  # the update at step 2 regrew weights


def test_trainer_callback_finalizes_srste(tmp_path):
    model, sp = _run(tmp_path, SRSTEConfig(pattern="2:4"))
    assert sp.final_masks is not None
    for name, p in model.named_parameters():
        if name in sp.params:
            assert is_nm(p.detach(), 2, 4)

"""Recovery of a MoE-fied model by distillation from its dense teacher, routers frozen.

The loss is the recovery fine-tune's (``sparseland.training.distill.distillation_loss``: KD on logits
plus SquareHead on every block's output, Kurtic et al. 2023) with its learning-rate schedule
(``training.finetune.lr_at``: warm-up then cosine). ``training.finetune.finetune`` itself requires a
pruned student (it keeps zero patterns); a MoE student has none, so this short loop drives the same
pieces. Every decoder weight trains except the routers (their selection is a hard top-k, so no
gradient reaches them, and the analytic router's rows stay those of the construction); the embeddings
and lm_head stay frozen as in ``finetune``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sparseland.errors import SparselandError
from sparseland.moe.module import moe_layers


@dataclass
class RecoveryResult:
    steps: int
    seconds: float
    losses: list[dict[str, float]]


def recover_(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    windows: torch.Tensor,
    steps: int,
    *,
    lr: float = 1e-4,
    batch_size: int = 2,
    feature_weight: float = 1.0,
    temperature: float = 2.0,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RecoveryResult:
    """Distil ``teacher`` into the MoE-fied ``student`` in place for ``steps`` AdamW steps (or until
    ``max_seconds``) on token windows (N, T)."""
    from sparseland.training.finetune import (
        FinetuneConfig,
        batch_indices,
        distill_batch,
        lr_at,
        trainable_parameters,
    )

    if not moe_layers(student):
        raise SparselandError("the student has no MoE MLPs; MoE-fy it first (sparsify_(model, MoEfyConfig(...)))")
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[1] < 2:
        raise SparselandError(f"windows must be a (N, T>=2) LongTensor of token ids; got {tuple(windows.shape)}")
    cfg = FinetuneConfig(
        steps=steps, lr=lr, batch_size=batch_size, temperature=temperature, feature_weight=feature_weight, seed=seed
    )
    params = {n: p for n, p in trainable_parameters(student).items() if ".router." not in n}
    was = {n: p.requires_grad for n, p in student.named_parameters()}
    for name, p in student.named_parameters():
        p.requires_grad_(name in params)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    losses: list[dict[str, float]] = []
    student.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="recover", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = distill_batch(student, teacher, windows[batch_indices(step, windows.shape[0], batch_size, seed)], cfg)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        losses.append({"step": step + 1, **loss.to_floats()})
        bar.set_postfix(loss=f"{losses[-1]['total']:.4f}")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    student.eval()
    for n, p in student.named_parameters():
        p.requires_grad_(was[n])
    return RecoveryResult(steps=len(losses), seconds=time.perf_counter() - t0, losses=losses)

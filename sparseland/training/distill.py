"""Distillation losses for recovering a pruned model from its dense teacher (pure tensor functions).

Paper: Kurtic et al., "Sparse Finetuning for Inference Acceleration of Large Language Models" (2023).
Rule: train the sparse student on ``kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (Hinton's
logit distillation) ``+ feature_weight * SquareHead`` (per layer, the teacher-normalised squared error
``MSE(h_s, h_t) / MSE(h_t, 0)``) ``+ ce_weight * CE(z_s, next token)``.

The paper sums SquareHead over layers; here it is averaged over layers so that its weight does not
grow with depth. The KD term covers every position (each one is a next-token distribution); the
cross-entropy covers positions 0..T-2 (position T-1 has no label inside the window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparseland.errors import SparselandError


@dataclass
class DistillLosses:
    """The weighted total (what to backpropagate) and its unweighted parts (what to report)."""

    total: torch.Tensor  # () scalar
    kd: torch.Tensor  # () KL(teacher || student) on softened logits, times T^2, mean over positions
    ce: torch.Tensor  # () next-token cross-entropy of the student (nats)
    feature: torch.Tensor  # () SquareHead, mean over layers (0 when no hidden states are given)

    def to_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "kd", "ce", "feature")}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over positions; logits (..., V)."""
    if student_logits.shape != teacher_logits.shape:
        raise SparselandError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ; the teacher must share the student's vocabulary"
        )
    vocab = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (N, V)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # (N, V)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="sum") / log_s.shape[0]
    return kl * temperature**2


def squarehead_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
    """SquareHead: mean over layers of ``MSE(h_s, h_t) / MSE(h_t, 0)``; each hidden state (B, T, D)."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise SparselandError(
            f"feature distillation needs one teacher hidden state per student layer; got "
            f"{len(student_hidden)} student and {len(teacher_hidden)} teacher hidden states"
        )
    terms = []
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
        if hs.shape != ht.shape:
            raise SparselandError(f"hidden state {i}: student {tuple(hs.shape)} != teacher {tuple(ht.shape)}")
        ht = ht.float()
        terms.append(F.mse_loss(hs.float(), ht) / ht.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    feature_weight: float = 0.0,
    student_hidden: Sequence[torch.Tensor] | None = None,
    teacher_hidden: Sequence[torch.Tensor] | None = None,
) -> DistillLosses:
    """Weighted KD + cross-entropy + SquareHead loss of a student against its teacher.

    ``student_logits``/``teacher_logits``: (B, T, V); ``input_ids``: (B, T), needed when ``ce_weight > 0``;
    hidden states: sequences of (B, T, D), needed when ``feature_weight > 0``.
    """
    if not temperature > 0:
        raise SparselandError(f"temperature={temperature!r} must be > 0; 1.0 is plain KL, 2.0 is typical")
    for name, w in (("kd_weight", kd_weight), ("ce_weight", ce_weight), ("feature_weight", feature_weight)):
        if not w >= 0:
            raise SparselandError(f"{name}={w!r} must be >= 0")
    zero = student_logits.new_zeros((), dtype=torch.float32)
    kd = kd_loss(student_logits, teacher_logits, temperature) if kd_weight > 0 else zero
    ce = zero
    if ce_weight > 0:
        if input_ids is None:
            raise SparselandError("ce_weight > 0 needs input_ids (the labels are the next tokens)")
        vocab = student_logits.shape[-1]
        ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1))
    feature = zero
    if feature_weight > 0:
        if student_hidden is None or teacher_hidden is None:
            raise SparselandError("feature_weight > 0 needs student_hidden and teacher_hidden")
        feature = squarehead_loss(student_hidden, teacher_hidden)
    total = kd_weight * kd + ce_weight * ce + feature_weight * feature
    return DistillLosses(total=total, kd=kd, ce=ce, feature=feature)

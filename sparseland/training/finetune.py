"""Recovery fine-tuning of a pruned causal LM by distillation from its dense teacher, mask kept exactly.

Paper: Kurtic et al., "Sparse Finetuning for Inference Acceleration of Large Language Models" (2023).
Rule: keep the pruned model's zero pattern fixed and train the remaining weights to match the dense
teacher (logit KD + per-layer SquareHead feature distillation, see ``distill.py``).

What trains: every parameter of the decoder blocks (the masked Linear weights and the norms) and the
final norm. The token embeddings and lm_head (tied in Llama-style models) stay frozen: they are
dense, not pruned, and freezing them saves their weight gradient (the largest matmul of the backward
pass for a 49k vocabulary) and ~340 MB of gradient and AdamW moments for SmolLM2-135M.

Optimizer: AdamW, linear warm-up then cosine decay to zero, gradient clipping, optional gradient
accumulation. Masks (``MaskSet``): gradients masked before each step, weights re-masked after it.

Run directory ``out_dir`` while training::

    finetune.json                   the run record (config, mask and data fingerprints, caller metadata)
    checkpoints/step-00000050/      renamed into place from a temporary dir when complete
        model/                      sparse checkpoint of the student (``save_sparse_checkpoint``)
        train_state.safetensors     AdamW moments and step per parameter, torch RNG state (no pickle)
        train_state.json            step, losses so far

When finished, ``out_dir`` itself is a sparse checkpoint (``load_model(out_dir)``) whose metadata holds
the config and the per-step losses; ``sparseland.json`` is moved in last and the checkpoints removed.
Batches depend only on ``(seed, step)``, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.errors import SparselandError
from sparseland.io import write_text_atomic
from sparseland.training.distill import distillation_loss
from sparseland.training.masking import MaskSet

RUN_FILE = "finetune.json"


@dataclasses.dataclass
class FinetuneConfig:
    """Hyper-parameters of a recovery fine-tune (validated on construction)."""

    steps: int
    lr: float = 1e-4
    batch_size: int = 4  # windows per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    warmup_steps: int | None = None  # default: 5% of steps, at least 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    feature_weight: float = 1.0
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SparselandError(f"{name}={value!r} must be a positive integer")
        if self.batch_size % self.grad_accum:
            raise SparselandError(
                f"batch_size={self.batch_size} is not divisible by grad_accum={self.grad_accum}; "
                "pass a grad_accum that divides the batch size"
            )
        if self.warmup_steps is None:
            self.warmup_steps = max(1, round(0.05 * self.steps))
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise SparselandError(f"warmup_steps={self.warmup_steps!r} must be an integer in [0, steps]")
        if not self.lr > 0:
            raise SparselandError(f"lr={self.lr!r} must be > 0 (1e-4 is a reasonable start)")
        if not self.temperature > 0:
            raise SparselandError(f"temperature={self.temperature!r} must be > 0 (2.0 is typical)")
        for name in ("weight_decay", "max_grad_norm", "kd_weight", "ce_weight", "feature_weight"):
            if not getattr(self, name) >= 0:
                raise SparselandError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.kd_weight == self.ce_weight == self.feature_weight == 0:
            raise SparselandError("kd_weight, ce_weight and feature_weight are all 0; nothing to train on")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    resumed_from: int  # 0 for a fresh run
    losses: list[dict[str, float]]  # one record per step: step, lr, total, kd, ce, feature
    density: float  # kept fraction of the masked weights
    seconds: float  # training time of this call (excludes earlier interrupted calls)


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))


def batch_indices(step: int, n_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of step ``step``: consecutive slices of seeded per-epoch permutations."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_windows)
        perm = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return torch.tensor(out)


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Everything but the token embeddings and lm_head (frozen: dense, tied, and costly to train)."""
    return {n: p for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n}


def _fingerprint(masks: MaskSet, windows: torch.Tensor) -> dict[str, str]:
    h = hashlib.sha256()
    for name in sorted(masks.masks):
        h.update(name.encode())
        h.update(masks.masks[name].numpy().tobytes())
    return {"mask_sha256": h.hexdigest(), "data_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}


def check_student_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> MaskSet:
    """Raise unless ``student`` is pruned and shares ``teacher``'s vocabulary; returns the student's masks."""
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise SparselandError(
            f"student vocabulary ({vs}) differs from teacher vocabulary ({vt}); distillation needs the "
            "teacher the student was pruned from (same tokenizer)"
        )
    masks = MaskSet.from_zeros(student)
    if masks.density() > 0.999:
        raise SparselandError(
            f"the student has almost no zero weights (density {masks.density():.4f}); prune it first, e.g. "
            "`sparseland prune --method sparsegpt --sparsity 0.5 --out DIR`, and fine-tune DIR"
        )
    return masks


def _check_windows(windows: torch.Tensor, vs: int) -> None:
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[1] < 2:
        raise SparselandError(
            f"calibration windows must be a (N, T>=2) LongTensor of token ids; got {windows.dtype} "
            f"{tuple(windows.shape)}"
        )
    if int(windows.max()) >= vs or int(windows.min()) < 0:
        raise SparselandError(f"calibration windows hold token ids outside [0, {vs}); wrong tokenizer?")


def _prepare_run(out_dir: Path, record: dict, resume: bool) -> None:
    """Create the run record, or check that an unfinished run in ``out_dir`` is this same run."""
    if (out_dir / "sparseland.json").is_file():
        raise SparselandError(f"{out_dir} already holds a finished fine-tune; choose a new output directory")
    run_file = out_dir / RUN_FILE
    if run_file.is_file():
        if not resume:
            raise SparselandError(f"{out_dir} holds an unfinished fine-tune; resume it or delete the directory")
        old = json.loads(run_file.read_text())
        for key in ("config", "fingerprint"):
            for field, value in record[key].items():
                if old[key].get(field) != value:
                    raise SparselandError(
                        f"{out_dir} holds a fine-tune with {field}={old[key].get(field)!r}, not {value!r}; "
                        "resume with the same settings and model, or choose a new output directory"
                    )
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SparselandError(f"{out_dir} exists and is not a fine-tune run; choose a new output directory")
    write_text_atomic(run_file, json.dumps(record, indent=1))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (temporary dirs of an interrupted save are ignored)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if ".tmp-" not in p.name and (p / "train_state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def save_train_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    losses: list[dict[str, float]],
) -> Path:
    """Write model + AdamW state + RNG as ``checkpoints/step-N`` (a temporary dir renamed), drop older ones."""
    from safetensors.torch import save_file

    from sparseland.runtime.checkpoint import save_sparse_checkpoint

    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
    try:
        save_sparse_checkpoint(model, None, tmp / "model", metadata={"step": step})
        names = {id(p): n for n, p in params.items()}
        tensors = {"rng.torch": torch.get_rng_state()}
        for p, state in optimizer.state.items():
            for key, value in state.items():  # AdamW: step (), exp_avg and exp_avg_sq (param's shape)
                tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().contiguous()
        save_file(tensors, str(tmp / "train_state.safetensors"), metadata={"format": "pt"})
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "losses": losses}))
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


@torch.no_grad()
def load_train_state(
    ck: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> tuple[int, list[dict[str, float]]]:
    """Restore weights (bit-exact), AdamW state and RNG from a checkpoint; returns (step, losses)."""
    from safetensors.torch import load_file

    from sparseland.runtime.checkpoint import WEIGHTS_FILE, decode_tensor, read_manifest

    manifest = read_manifest(ck / "model")
    store = load_file(str(ck / "model" / WEIGHTS_FILE))
    for name, p in model.named_parameters():
        src = manifest["aliases"].get(name, name)
        p.copy_(decode_tensor(src, manifest["tensors"][src], store))
    tensors = load_file(str(ck / "train_state.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    index = {name: i for i, name in enumerate(params)}  # the optimizer's packing order
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.removeprefix("optim.").rsplit(".", 1)
        state.setdefault(index[name], {})[field] = value
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    info = json.loads((ck / "train_state.json").read_text())
    return int(info["step"]), info["losses"]


def _publish(out_dir: Path, student: torch.nn.Module, tokenizer: Any, metadata: dict) -> None:
    """Write the final sparse checkpoint into ``out_dir`` (sparseland.json last), then drop checkpoints."""
    from sparseland.runtime.checkpoint import save_sparse_checkpoint

    staging = out_dir / "final"
    shutil.rmtree(staging, ignore_errors=True)
    save_sparse_checkpoint(student, tokenizer, staging, metadata=json.loads(json.dumps(metadata)))
    for f in sorted(staging.iterdir(), key=lambda f: f.name == "sparseland.json"):
        os.replace(f, out_dir / f.name)
    staging.rmdir()
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)


def _trainable_and_optimizer(student: torch.nn.Module, teacher: torch.nn.Module, cfg: FinetuneConfig):
    """``(trainable parameters, AdamW over them)``; everything else (and the teacher) frozen."""
    params = trainable_parameters(student)
    for name, p in student.named_parameters():
        p.requires_grad_(name in params)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return params, optimizer


def distill_batch(student, teacher, x: torch.Tensor, cfg: FinetuneConfig):
    """The distillation loss of one batch of windows ``x`` (b, T) with ``cfg``'s temperature and
    weights: the teacher's forward without gradients, the student's with them, hidden states only when
    the feature term is on (also MoE recovery's step, ``sparseland.moe.recover``)."""
    feat = cfg.feature_weight > 0
    with torch.no_grad():
        t_out = teacher(input_ids=x, output_hidden_states=feat, use_cache=False)
    s_out = student(input_ids=x, output_hidden_states=feat, use_cache=False)
    return distillation_loss(
        s_out.logits,
        t_out.logits,
        x,
        temperature=cfg.temperature,
        kd_weight=cfg.kd_weight,
        ce_weight=cfg.ce_weight,
        feature_weight=cfg.feature_weight,
        student_hidden=s_out.hidden_states[1:] if feat else None,  # block outputs (last one normed)
        teacher_hidden=t_out.hidden_states[1:] if feat else None,
    )


def _accumulate_gradients(student, teacher, windows: torch.Tensor, idx: torch.Tensor, cfg: FinetuneConfig):
    """One step's gradients: the distillation loss of the windows ``idx`` in ``grad_accum``
    micro-batches, each scaled by 1/grad_accum; returns the step's mean loss terms."""
    micro = cfg.batch_size // cfg.grad_accum
    parts: dict[str, float] = {"total": 0.0, "kd": 0.0, "ce": 0.0, "feature": 0.0}
    for chunk in idx.split(micro):
        loss = distill_batch(student, teacher, windows[chunk], cfg)
        (loss.total / cfg.grad_accum).backward()
        for k, v in loss.to_floats().items():
            parts[k] += v / cfg.grad_accum
    return parts


def finetune(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    calibration_windows: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    *,
    out_dir: str | Path,
    tokenizer: Any = None,
    resume: bool = True,
    progress: bool = True,
    metadata: dict | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune the pruned ``student`` in place by distillation from ``teacher`` on ``calibration_windows``
    (N, T), keeping its zero pattern; see the module docstring. ``options`` are further ``FinetuneConfig``
    fields; ``on_step(step, losses)`` runs after every step (and its checkpoint)."""
    cfg = FinetuneConfig(steps=steps, lr=lr, batch_size=batch_size, **options)
    masks = check_student_teacher(student, teacher)
    _check_windows(calibration_windows, student.config.vocab_size)
    out_dir = Path(out_dir).expanduser()
    record = {
        "config": cfg.to_dict(),
        "fingerprint": _fingerprint(masks, calibration_windows),
        "metadata": metadata or {},
    }
    _prepare_run(out_dir, record, resume)

    params, optimizer = _trainable_and_optimizer(student, teacher, cfg)
    start, losses = 0, []
    last = latest_checkpoint(out_dir)
    if last is not None:
        start, losses = load_train_state(last, student, optimizer, params)
        masks.check()

    student.train()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", disable=not progress)
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        idx = batch_indices(step, calibration_windows.shape[0], cfg.batch_size, cfg.seed)
        parts = _accumulate_gradients(student, teacher, calibration_windows, idx, cfg)
        masks.mask_grads_()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        masks.apply_()
        rec = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"], **parts}
        losses.append(rec)
        bar.set_postfix(loss=f"{parts['total']:.4f}", kd=f"{parts['kd']:.4f}", feat=f"{parts['feature']:.4f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            masks.check()
            save_train_checkpoint(out_dir, step + 1, student, optimizer, params, losses)
        if on_step is not None:
            on_step(step + 1, rec)
    bar.close()
    seconds = time.perf_counter() - t0
    student.eval()
    masks.check()
    meta = {
        **(metadata or {}),
        "finetune": {**record, "density": masks.density(), "losses": losses, "resumed_from": start},
    }
    _publish(out_dir, student, tokenizer, meta)
    return FinetuneResult(out_dir, cfg.steps, start, losses, masks.density(), seconds)


def update_metadata(out_dir: str | Path, extra: dict) -> None:
    """Merge ``extra`` into the metadata of the finished checkpoint in ``out_dir`` (atomically)."""
    path = Path(out_dir) / "sparseland.json"
    manifest = json.loads(path.read_text())
    manifest["metadata"].update(json.loads(json.dumps(extra)))
    write_text_atomic(path, json.dumps(manifest, indent=1, default=str))

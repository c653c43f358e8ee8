"""Train an adapter: attach the method's trainable deltas to a frozen model, run causal-LM training on
target-domain windows, and return an ``Adapter`` (the base model's bits are left untouched).

How each method enters the forward pass:

* element methods (SpIEL, SHiRA, LIFT, the sparse part of sparse + low-rank): a parametrization of the
  Linear's weight, ``W + scatter(indices, values)`` (``index_add``), so only ``values`` is trainable;
* S2FT: a forward hook adding ``x[..., cols] @ D.T`` -- the co-permuted dense slice: permuting the
  input channels so the chosen ones come first makes the update the dense block ``D``; gathering those
  channels is that permutation without moving the model's weights. No gradient of the full W is
  computed for these layers (the method's memory saving);
* LoRA: Hugging Face peft (``get_peft_model``), unloaded after training; its A and B go into the adapter.

On a pruned base (``keep_sparsity``), element indices are chosen among the nonzero weights only, S2FT
blocks are masked to them, and LoRA's merged update is masked to them (the masked-LoRA baseline).
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from sparseland.errors import SparselandError
from sparseland.peft.adapter import Adapter, LowRankDelta, TensorDelta
from sparseland.peft.configs import (
    LIFTConfig,
    LoRAConfig,
    PeftConfig,
    S2FTConfig,
    SHiRAConfig,
    SparseLoRAConfig,
    SpIELConfig,
)
from sparseland.peft.select import lift_indices, s2ft_columns, shira_indices, spiel_update
from sparseland.training.finetune import batch_indices, lr_at


# ----------------------------------------------------------------------------------------------- modules
class ElementDelta(torch.nn.Module):
    """Parametrization ``W -> W + scatter(idx, values)``; optionally accumulates the dense gradient of W."""

    def __init__(self, idx: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("idx", idx.clone())
        self.values = torch.nn.Parameter(torch.zeros(idx.numel(), dtype=dtype))
        self.grad_acc: torch.Tensor | None = None
        self.seed: int | None = None  # a fixed random index set: regenerated from this seed when loading

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        out = w.reshape(-1).index_add(0, self.idx, self.values).view_as(w)
        if self.grad_acc is not None and out.requires_grad:
            out.register_hook(self._accumulate)
        return out

    def _accumulate(self, g: torch.Tensor) -> None:
        self.grad_acc.add_(g.detach())


class ColumnDelta(torch.nn.Module):
    """S2FT's trainable dense block over input columns ``cols``; ``keep`` masks it to a pruned weight's nonzeros."""

    def __init__(self, cols: torch.Tensor, out_features: int, dtype: torch.dtype, keep: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("cols", cols.clone())
        self.values = torch.nn.Parameter(torch.zeros(out_features, cols.numel(), dtype=dtype))
        self.keep = keep

    def block(self) -> torch.Tensor:
        return self.values * self.keep if self.keep is not None else self.values

    def hook(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + F.linear(args[0].index_select(-1, self.cols), self.block())


# ----------------------------------------------------------------------------------------------- budget
def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model, shared (tied) tensors counted once."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


def budget_params(model: torch.nn.Module, config: PeftConfig) -> int:
    return config.n_params if config.n_params is not None else max(1, round(config.budget * parameter_count(model)))


def target_linears(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    """Linear layers whose name ends with one of ``targets`` (never lm_head), in model order."""
    out = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets and "lm_head" not in n
    }
    if not out:
        raise SparselandError(f"no Linear layer of this model is named like {list(targets)}; check --targets")
    return out


def is_pruned(model: torch.nn.Module, linears: dict[str, torch.nn.Linear]) -> bool:
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros > 0.05 * sum(m.weight.numel() for m in linears.values())


def split_budget(sizes: dict[str, int], n: int) -> dict[str, int]:
    """``n`` split over weights proportionally to ``sizes`` (largest remainders get the leftover)."""
    total = sum(sizes.values())
    if n > total:
        raise SparselandError(f"budget of {n} parameters exceeds the {total} trainable candidates; lower it")
    raw = {k: n * s / total for k, s in sizes.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - out[k], reverse=True)[: n - sum(out.values())]:
        out[k] += 1
    return out


# ----------------------------------------------------------------------------------------------- plans
def element_indices(
    linears: dict[str, torch.nn.Linear], config: PeftConfig, n: int, keep: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per-weight sorted flat indices for SpIEL (initial set), SHiRA, LIFT and the sparse part of sparse+LoRA,
    and the seeds of the fixed random sets (the adapter file then stores the seed instead of the indices)."""
    allowed = {name: (m.weight.detach() != 0) if keep else None for name, m in linears.items()}
    sizes = {
        name: int(a.sum()) if a is not None else m.weight.numel()
        for (name, m), a in zip(linears.items(), allowed.values(), strict=True)
    }
    ks = split_budget(sizes, n)
    out, seeds = {}, {}
    for i, (name, m) in enumerate(linears.items()):
        w, k, a = m.weight.detach(), ks[name], allowed[name]
        if k == 0:
            continue
        seed = config.seed * 1_000_003 + i
        if isinstance(config, LIFTConfig):
            out[name] = lift_indices(w, k, min(config.rank, min(w.shape)), a)
        elif isinstance(config, (SHiRAConfig, SparseLoRAConfig)):
            how = config.mask if isinstance(config, SHiRAConfig) else config.support
            out[name] = shira_indices(w, k, how, seed, a)
            if how == "random" and a is None:
                seeds[name] = seed
        else:  # SpIEL starts from a random set (the paper's initialisation), then prunes and regrows
            out[name] = shira_indices(w, k, "random", seed, a)
    return out, seeds


def s2ft_plan(
    model: torch.nn.Module, linears: dict[str, torch.nn.Linear], config: S2FTConfig, n: int, keep: bool
) -> dict[str, torch.Tensor]:
    """Columns per weight: heads of o_proj first (``head_share`` of the budget), then down_proj channels,
    taken in random (or norm) order over the whole model until the budget is spent. The cost of a group is
    its trainable entries (on a pruned weight: its nonzeros)."""
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    chosen: dict[str, list[torch.Tensor]] = {}
    spent = 0
    for kind, group, share in (("o_proj", head_dim, config.head_share), ("down_proj", 1, 1.0)):
        mods = {name: m for name, m in linears.items() if name.endswith(kind)}
        if not mods:
            continue
        limit = spent + (n - spent) * share if kind == "o_proj" else n
        cand = []  # (score, name, first column, cost)
        gen = torch.Generator().manual_seed(config.seed * 7919 + group)
        for name, m in mods.items():
            w = m.weight.detach()
            cols = s2ft_columns(w.shape[1], w.shape[1], group)  # all groups, in order
            cost = (w != 0).sum(0) if keep else torch.full((w.shape[1],), w.shape[0])
            norm = w.float().pow(2).sum(0)
            for g0 in cols.view(-1, group)[:, 0].tolist():
                cand.append((float(norm[g0 : g0 + group].sum()), name, g0, int(cost[g0 : g0 + group].sum())))
        order = (
            torch.randperm(len(cand), generator=gen).tolist()
            if config.select == "random"
            else sorted(range(len(cand)), key=lambda i: -cand[i][0])
        )
        for i in order:
            _, name, g0, cost = cand[i]
            if cost and spent + cost <= limit:
                chosen.setdefault(name, []).append(torch.arange(g0, g0 + group))
                spent += cost
    if spent == 0:
        raise SparselandError(f"a budget of {n} parameters buys no S2FT column; raise the budget")
    return {name: torch.cat(c).sort().values for name, c in chosen.items()}


def lora_rank(linears: dict[str, torch.nn.Linear], n: int) -> int:
    per_rank = sum(m.in_features + m.out_features for m in linears.values())
    if n < per_rank:
        raise SparselandError(f"a budget of {n} parameters is below one LoRA rank ({per_rank}); raise the budget")
    return n // per_rank


# ----------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    adapter: Adapter
    losses: list[dict[str, float]]
    seconds: float
    n_params: int
    budget: int
    peft_adapter_bytes: int | None = None  # LoRA: size of peft's own adapter_model.safetensors
    swaps: list[int] = dataclasses.field(default_factory=list)  # SpIEL: indices swapped per update


def _remap(old_idx: torch.Tensor, kept: torch.Tensor, new_idx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(t)
    out[torch.searchsorted(new_idx, old_idx[kept])] = t[kept]
    return out


@torch.no_grad()
def _spiel_step(
    deltas: dict[str, ElementDelta], allowed: dict[str, torch.Tensor | None], opt: torch.optim.Optimizer, frac: float
) -> int:
    swapped = 0
    for name, d in deltas.items():
        n_swap = int(round(frac * d.idx.numel()))
        new_idx, kept = spiel_update(d.idx, d.values, d.grad_acc, n_swap, allowed[name])
        if not bool(kept.all()):
            for key, value in opt.state.get(d.values, {}).items():
                if torch.is_tensor(value) and value.shape == d.values.shape:
                    opt.state[d.values][key] = _remap(d.idx, kept, new_idx, value)
            d.values.copy_(_remap(d.idx, kept, new_idx, d.values))
            d.idx.copy_(new_idx)
            swapped += int((~kept).sum())
        d.grad_acc = None
    return swapped


@dataclasses.dataclass
class _Attached:
    """The trainable parts attached to the model for one run: peft's LoRA model (if any), element
    deltas (parametrizations), column deltas (forward hooks) and the parameters AdamW steps."""

    linears: dict[str, torch.nn.Linear]
    keep: bool
    params: list[torch.nn.Parameter] = dataclasses.field(default_factory=list)
    elements: dict[str, ElementDelta] = dataclasses.field(default_factory=dict)
    columns: dict[str, ColumnDelta] = dataclasses.field(default_factory=dict)
    hooks: list = dataclasses.field(default_factory=list)
    peft_model: Any = None
    model_view: torch.nn.Module | None = None  # the model under peft's wrapper (or the model itself)
    n_lora: int = 0

    @property
    def n_trained(self) -> int:
        n = self.n_lora + sum(d.values.numel() for d in self.elements.values())
        return n + sum(int(d.keep.sum()) if d.keep is not None else d.values.numel() for d in self.columns.values())


def _check_training_args(windows: torch.Tensor, steps: int, batch_size: int) -> None:
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[1] < 2:
        raise SparselandError(
            f"training windows must be a (N, T>=2) LongTensor; got {windows.dtype} {tuple(windows.shape)}"
        )
    if steps <= 0 or batch_size <= 0:
        raise SparselandError(f"steps={steps} and batch_size={batch_size} must be positive")


def _attach_lora(model: torch.nn.Module, config: PeftConfig, n: int, att: _Attached) -> int:
    """Wrap the model with peft's LoRA (LoRA, or SparseLoRA's low-rank share); returns the budget left
    for sparse deltas."""
    if not isinstance(config, (LoRAConfig, SparseLoRAConfig)):
        att.model_view = model
        return n
    import peft  # Hugging Face peft (absolute import: the top-level package, not this one)

    lora_cfg = config if isinstance(config, LoRAConfig) else None
    lt = config.targets if lora_cfg else config.lora_targets
    lin = target_linears(model, lt)
    share = n if lora_cfg else int(n * config.lora_share)
    r = (lora_cfg.rank if lora_cfg and lora_cfg.rank else None) or lora_rank(lin, share)
    pc = peft.LoraConfig(r=r, lora_alpha=config.alpha_over_rank * r, target_modules=list(lt), lora_dropout=0.0)
    att.peft_model = peft.get_peft_model(model, pc)
    lora_params = [p for name, p in att.peft_model.named_parameters() if "lora_" in name]
    att.n_lora = sum(p.numel() for p in lora_params)
    att.params += lora_params
    att.model_view = att.peft_model.base_model.model
    return n - att.n_lora


def _attach_sparse(model: torch.nn.Module, config: PeftConfig, n_sparse: int, att: _Attached) -> None:
    """S2FT's column deltas (forward hooks) or the element deltas of the other sparse methods."""
    linears, keep = att.linears, att.keep
    if isinstance(config, S2FTConfig):
        plan = s2ft_plan(model, linears, config, n_sparse, keep)
        for name, cols in plan.items():
            m = linears[name]
            mask = (m.weight.detach()[:, cols] != 0) if keep else None
            d = ColumnDelta(cols, m.out_features, m.weight.dtype, mask)
            att.columns[name] = d
            att.hooks.append(m.register_forward_hook(d.hook))
            att.params.append(d.values)
    elif not isinstance(config, LoRAConfig):
        plan, seeds = element_indices(linears, config, n_sparse, keep)
        for name, idx in plan.items():
            m = linears[name]
            d = ElementDelta(idx, m.weight.dtype)
            d.seed = seeds.get(name)
            parametrize.register_parametrization(m, "weight", d, unsafe=True)
            att.elements[name] = d
            att.params.append(d.values)


def _train_step(step: int, steps: int, att: _Attached, runner, opt, sched, spiel, allowed, x) -> torch.Tensor:
    """One AdamW step (with SpIEL's gradient accumulation and index swaps on their schedule); returns the loss."""
    if spiel is not None and (step + spiel.accumulate) % spiel.update_every == 0 and step + 1 < steps:
        for name, d in att.elements.items():
            d.grad_acc = torch.zeros_like(att.linears[name].parametrizations.weight.original)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, sched)
    opt.zero_grad(set_to_none=True)
    loss = runner(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    for d in att.columns.values():  # pruned S2FT: masked entries get no gradient, so Adam never moves them
        if d.keep is not None and d.values.grad is not None:
            d.values.grad.mul_(d.keep)
    torch.nn.utils.clip_grad_norm_(att.params, 1.0)
    opt.step()
    return loss


def _train_loop(att: _Attached, config: PeftConfig, windows, steps: int, batch_size: int, progress: bool, on_step):
    """``(losses, swaps, seconds)`` of ``steps`` AdamW steps over the attached parameters."""
    allowed = {name: (att.linears[name].weight != 0) if att.keep else None for name in att.elements}
    opt = torch.optim.AdamW(att.params, lr=config.lr, weight_decay=0.0)
    sched = types.SimpleNamespace(lr=config.lr, steps=steps, warmup_steps=max(1, round(0.05 * steps)))
    spiel = config if isinstance(config, SpIELConfig) else None
    runner = att.peft_model if att.peft_model is not None else att.model_view
    runner.train()
    losses: list[dict[str, float]] = []
    swaps: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc=f"peft {config.method}", unit="step", disable=not progress)
    try:
        for step in range(steps):
            x = windows[batch_indices(step, windows.shape[0], batch_size, config.seed)]
            loss = _train_step(step, steps, att, runner, opt, sched, spiel, allowed, x)
            if spiel is not None and (step + 1) % spiel.update_every == 0 and step + 1 < steps:
                frac = spiel.swap_fraction * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
                swaps.append(_spiel_step(att.elements, allowed, opt, frac))
            rec = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "loss": float(loss.detach())}
            losses.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update(1)
            if on_step is not None:
                on_step(step + 1, rec)
    finally:
        bar.close()
        seconds = time.perf_counter() - t0
        runner.eval()
        for h in att.hooks:
            h.remove()
    return losses, swaps, seconds


def _detach_sparse(att: _Attached) -> dict[str, TensorDelta]:
    """The trained element and column deltas; the parametrizations removed (base weights' bits kept)."""
    deltas: dict[str, TensorDelta] = {}
    for name, d in att.elements.items():
        m = att.linears[name]
        deltas[name + ".weight"] = TensorDelta(
            tuple(m.weight.shape), d.values.detach().clone(), indices=d.idx.clone(), seed=d.seed
        )
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)  # the original tensor: base bits
    for name, d in att.columns.items():
        m = att.linears[name]
        deltas[name + ".weight"] = TensorDelta(tuple(m.weight.shape), d.block().detach().clone(), cols=d.cols.clone())
    return deltas


def _detach_lora(model: torch.nn.Module, config: PeftConfig, att: _Attached) -> tuple[dict, int | None]:
    """``(low-rank deltas, peft's adapter file bytes)``; peft's layers unloaded from the model."""
    low_rank: dict[str, LowRankDelta] = {}
    if att.peft_model is None:
        return low_rank, None
    peft_bytes = _peft_file_bytes(att.peft_model)
    lora_cfg = config if isinstance(config, LoRAConfig) else None
    mask = att.keep if (lora_cfg is None or lora_cfg.mask_merge is None) else lora_cfg.mask_merge
    for name, m in att.model_view.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            low_rank[name + ".weight"] = LowRankDelta(
                m.lora_A["default"].weight.detach().clone(),
                m.lora_B["default"].weight.detach().clone(),
                float(m.scaling["default"]),
                bool(mask),
            )
    base = att.peft_model.unload()  # the LoRA layers removed, base weights untouched
    if base is not model:
        raise SparselandError("peft returned a different model object on unload")  # pragma: no cover
    return low_rank, peft_bytes


def train_adapter(
    model: torch.nn.Module,
    config: PeftConfig,
    windows: torch.Tensor,
    steps: int,
    batch_size: int = 4,
    *,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``config``'s adapter on ``windows`` (N, T) token ids for ``steps`` AdamW steps (linear warm-up,
    cosine decay); returns the adapter. The model's own weights are never changed."""
    _check_training_args(windows, steps, batch_size)
    n = budget_params(model, config)
    linears = target_linears(model, config.targets)
    keep = is_pruned(model, linears) if config.keep_sparsity is None else config.keep_sparsity
    model.requires_grad_(False)
    att = _Attached(linears, keep)
    n_sparse = _attach_lora(model, config, n, att)
    _attach_sparse(model, config, n_sparse, att)
    n_trained = att.n_trained
    losses, swaps, seconds = _train_loop(att, config, windows, steps, batch_size, progress, on_step)
    deltas = _detach_sparse(att)
    low_rank, peft_bytes = _detach_lora(model, config, att)
    model.requires_grad_(False)
    meta = {"config": config.to_dict(), "n_params": n_trained, "budget_params": n, "keep_sparsity": bool(keep)}
    return TrainResult(Adapter(deltas, low_rank, meta), losses, seconds, n_trained, n, peft_bytes, swaps)


def _peft_file_bytes(peft_model) -> int:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))

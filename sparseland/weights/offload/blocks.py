"""The model skeleton on the meta device, one decoder block at a time on the CPU, and the workers that
hold calibration activations (on disk, double-buffered) and compute a block's input statistics."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from sparseland.errors import SparselandError
from sparseland.weights.pruner import InputStats, _Stop


def load_config(model_dir: str | Path):
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SparselandError(
            f"{model_dir} has no config.json; --offload needs a Hugging Face model directory "
            "(config.json + *.safetensors shards)"
        )
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


def build_shell(config) -> torch.nn.Module:
    """The model on the meta device (no memory), with real rotary tables so block inputs can be made."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inner = shell.model
    rot = getattr(inner, "rotary_emb", None)
    if rot is not None:
        inner.rotary_emb = type(rot)(config=config)
    return shell.eval()


def materialize(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a meta module real CPU float tensors from ``state`` (names relative to the module)."""
    module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    missing = [k for k in missing if k in dict(module.named_parameters())]
    if missing or unexpected:
        raise SparselandError(f"the shards do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def release(module: torch.nn.Module) -> None:
    module.to_empty(device="meta")


def _stats_tuple(st: InputStats) -> tuple:
    return (st.n, st.sum, st.sumsq, st.gram)


def sum_stats(parts: list[tuple[list[str], tuple] | None]) -> tuple[list[str], InputStats] | None:
    """Add the statistics of one group of Linears from several workers: every field is a sum."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    names = parts[0][0]
    if any(p[0] != names for p in parts):
        raise SparselandError(f"workers disagree on the Linears fed by one input: {[p[0] for p in parts]}")
    n, s, sq, gram = parts[0][1]
    st = InputStats(s.shape[0], False)
    st.n, st.sum, st.sumsq, st.gram = n, s, sq, gram
    if len(parts) > 1:  # summed in place below: copies, so that no worker's result is changed
        st.sum, st.sumsq = s.clone(), sq.clone()
        st.gram = None if gram is None else gram.clone()
    for _, (n, s, sq, gram) in parts[1:]:
        st.n += n
        st.sum += s
        st.sumsq += sq
        if gram is not None:
            st.gram += gram
    return names, st


class BlockWorker:
    """A share of the calibration windows, micro-batched, and the current block (its own, or shared with
    the driver's in-process shell). Activations live in ``buffer_dir/{0,1}/{j}.pt``: block i reads parity
    i % 2 and writes parity (i + 1) % 2."""

    def __init__(self, config_dict: dict[str, Any], buffer_dir: str, gram: bool, shell: torch.nn.Module | None = None):
        if shell is None:
            from transformers import AutoConfig

            cfg = dict(config_dict)
            shell = build_shell(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        self.shell = shell
        self.buffer = Path(buffer_dir)
        self.gram = gram
        self.n_batches = 0
        self.block: torch.nn.Module | None = None

    def _path(self, parity: int, j: int) -> Path:
        return self.buffer / str(parity) / f"{j:06d}.pt"

    def _write(self, parity: int, j: int, hidden: torch.Tensor, kwargs: dict) -> None:
        path = self._path(parity, j)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"hidden": hidden.contiguous(), "kwargs": kwargs}, tmp)
        os.replace(tmp, path)

    def _read(self, parity: int, j: int) -> tuple[torch.Tensor, dict]:
        d = torch.load(self._path(parity, j), weights_only=True)
        return d["hidden"], d["kwargs"]

    @torch.no_grad()
    def capture(self, calibration: torch.Tensor, micro: int, embed: torch.Tensor | None = None) -> int:
        """First block's inputs of each micro-batch of ``calibration`` into parity 0; returns the count."""
        inner = self.shell.model
        if embed is not None:
            materialize(inner.embed_tokens, {"weight": embed})
        layer0 = inner.layers[0]
        captured: list = []

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Stop

        handle = layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            for j, batch in enumerate(calibration.split(micro)):
                with contextlib.suppress(_Stop):
                    inner(input_ids=batch, use_cache=False)
                hidden, kwargs = captured.pop()
                self._write(0, j, hidden, kwargs)
        finally:
            handle.remove()
            if embed is not None:
                release(inner.embed_tokens)
        self.n_batches = -(-calibration.shape[0] // micro) if calibration.shape[0] else 0
        return self.n_batches

    def attach_batches(self, n_batches: int) -> None:
        """Resume: the activations are already on disk."""
        self.n_batches = n_batches

    def load_block(self, index: int, state: dict[str, torch.Tensor] | None) -> None:
        self.block = self.shell.model.layers[index]
        if state is not None:
            materialize(self.block, state)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for name, w in weights.items():
            self.block.get_submodule(name).weight.data.copy_(w)

    def drop_block(self, owned: bool) -> None:
        if owned and self.block is not None:
            release(self.block)
        self.block = None

    @torch.no_grad()
    def stage_stats(self, parity: int, linears: list[str], done: list[str]) -> tuple[list[str], tuple] | None:
        """``(names, (n, sum, sumsq, gram))``: the statistics of the first group of not yet pruned Linears
        (names relative to the block) fed by one input tensor, summed over this worker's micro-batches.
        Each forward stops at the first Linear fed by another tensor. None when no such Linear ran."""
        todo = [n for n in linears if n not in set(done)]
        group: list[str] = []
        cur: list = [None, None]  # this micro-batch's group input and the statistics it is added to
        acc: InputStats | None = None  # the sums over the micro-batches so far

        def make_hook(name):
            def hook(module, args):
                x = args[0]
                if cur[0] is None:
                    cur[0] = x
                    # added straight into the running sums (a per-micro-batch copy would be one more
                    # (in, in) float64 Gram matrix alive: 254 MB for a 5632-wide MLP input)
                    cur[1] = acc if acc is not None else InputStats(x.shape[-1], self.gram)
                    cur[1].add(x)
                elif x is not cur[0]:
                    raise _Stop
                if name not in group:
                    group.append(name)

            return hook

        handles = [self.block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in todo]
        try:
            for j in range(self.n_batches):
                hidden, kwargs = self._read(parity, j)
                cur[0] = cur[1] = None
                with contextlib.suppress(_Stop):
                    self.block(hidden, **kwargs)
                if acc is None:
                    acc = cur[1]
                cur[0] = cur[1] = None
        finally:
            for h in handles:
                h.remove()
        if acc is None:
            return None
        return [n for n in todo if n in group], _stats_tuple(acc)

    @torch.no_grad()
    def advance(self, parity: int) -> None:
        """Run the (pruned) block over every micro-batch; outputs become the next block's inputs."""
        for j in range(self.n_batches):
            hidden, kwargs = self._read(parity, j)
            y = self.block(hidden, **kwargs)
            self._write(1 - parity, j, y[0] if isinstance(y, tuple) else y, kwargs)

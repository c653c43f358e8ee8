"""Where in a model an SAE reads and writes: the site names, hooks that capture a site's activations,
and hooks that splice a replacement into the forward pass.

Sites of decoder layer ``L`` (Llama-style blocks, ``model.model.layers[L]``):

- ``resid``: the residual stream after block ``L`` (the block's output hidden state);
- ``mlp_in``: the MLP's input (after the post-attention norm), what a transcoder reads;
- ``mlp_out``: the MLP's output before it is added to the residual, what a transcoder writes;
- ``attn_out``: the attention block's output before it is added to the residual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from sparseland.errors import SparselandError

SITES = ("resid", "mlp_in", "mlp_out", "attn_out")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SparselandError(
            f"{type(model).__name__} has no model.layers; sparseland's SAEs need a Llama-style decoder "
            "(transformers' *ForCausalLM with model.layers)"
        )
    return layers


def check_site(model: torch.nn.Module, layer: int, site: str) -> None:
    if site not in SITES:
        raise SparselandError(f"site {site!r} is not one of {SITES}; pass --site resid (or mlp_in, mlp_out, attn_out)")
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise SparselandError(
            f"layer {layer} is outside [0, {n - 1}] for this {n}-layer model; pass --layer 0..{n - 1}"
        )


def _site_module(model: torch.nn.Module, layer: int, site: str) -> tuple[torch.nn.Module, bool]:
    """``(module, reads_input)``: the module whose output (or input, when ``reads_input``) is the site."""
    check_site(model, layer, site)
    block = decoder_layers(model)[layer]
    if site == "resid":
        return block, False
    if site == "attn_out":
        return block.self_attn, False
    return block.mlp, site == "mlp_in"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once the deepest needed site is read."""


@contextlib.contextmanager
def capture(
    model: torch.nn.Module, layer: int, sites: tuple[str, ...], stop: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward fills ``store[site]`` with that site's ``(B, T, d)`` activations.
    With ``stop``, the forward ends (``StopForward``) after block ``layer``: run it inside
    ``with contextlib.suppress(StopForward)``."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:
        module, reads_input = _site_module(model, layer, site)
        if reads_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, s=site: store.__setitem__(s, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, s=site: store.__setitem__(s, _first(out))))
    if stop:

        def _stop(m, a, out):
            raise StopForward

        handles.append(decoder_layers(model)[layer].register_forward_hook(_stop))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def splice(
    model: torch.nn.Module,
    layer: int,
    site: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    keep_first: bool = True,
    source_site: str | None = None,
) -> Iterator[None]:
    """Within the block, the activation at ``site`` is replaced by ``fn(a)`` where ``a`` is the activation
    at ``source_site`` (default: ``site`` itself; a transcoder reads ``mlp_in`` and writes ``mlp_out``).
    With ``keep_first``, position 0 keeps its original value (it is excluded from the cache too)."""
    source_site = source_site or site
    module, reads_input = _site_module(model, layer, site)
    src_module, src_reads_input = _site_module(model, layer, source_site)
    if src_module is not module:
        raise SparselandError(f"cannot splice {site} from {source_site}: they are not the same module's ends")

    def _apply(orig: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        new = fn(src).to(orig.dtype)
        if keep_first:
            new = torch.cat([orig[:, :1], new[:, 1:]], dim=1)
        return new

    if reads_input:

        def pre_hook(m, args):
            return (_apply(args[0], args[0]), *args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def hook(m, args, out):
            src = args[0] if src_reads_input else _first(out)
            return _replace_first(out, _apply(_first(out), src))

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()

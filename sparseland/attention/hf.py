"""The transformers integration: each method is an attention function registered with
``AttentionInterface`` *and* a mask function registered with ``AttentionMaskInterface``.

Registering only the attention function silently drops the causal mask: transformers then skips mask
creation and hands ``None`` (or the raw 2-D padding mask) to the attention function. Here the mask
function is transformers' ``sdpa_mask`` told never to skip, so a 4-D boolean mask always arrives, and
the attention function refuses a missing or 2-D mask with an error instead of guessing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sparseland.api import FilterFn, register
from sparseland.attention.configs import AttentionConfig
from sparseland.attention.methods import SparseAttention
from sparseland.errors import SparselandError
from sparseland.models.arch import describe

ATTR = "_sparseland_attention"
PREFIX = "sparseland_"


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    arch = describe(model)  # SparselandError naming an architecture sparseland does not know
    return [arch.attention(i) for i in range(len(arch.blocks))]


def dense_layers(model: torch.nn.Module) -> set[int]:
    """Layers a sparse attention method leaves dense: sliding-window layers (their window already bounds
    the keys) and soft-capped ones (Gemma 2; the methods' kernels do not cap scores)."""
    arch = describe(model)
    if arch.attn_softcap is not None:
        return set(range(len(arch.blocks)))
    return {i for i, w in enumerate(arch.windows) if w is not None}


def _masked_attention(query, key, value, mask: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Dense attention under a boolean mask, with the model's soft-capping: (1, H, T, D) -> (H, T, D)."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)[0]
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scores = torch.tanh((query @ k.transpose(-1, -2)) * scale / softcap) * softcap  # (1, H, T, S)
    return (torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v)[0]


def _is_causal(mask: torch.Tensor, T: int, S: int) -> bool:
    """True if a (1, 1, T, S) boolean mask is exactly causal for queries at the last T positions."""
    want = torch.ones(T, S, dtype=torch.bool, device=mask.device).tril(S - T)
    return mask.shape[-2:] == (T, S) and bool((mask.reshape(-1, T, S) == want).all())


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls per layer: query (1, H, T, D), key/value (1, KVH, S, D)."""
    state: SparseAttention | None = getattr(module, ATTR, None)
    if state is None:
        raise SparselandError("this attention module carries no sparse method; call sparsify_ or remove() first")
    B, H, T, Dh = query.shape
    if B != 1:
        raise SparselandError(f"sparse attention runs one sequence at a time (batch size 1); got batch {B}")
    S = key.shape[2]
    scale = scaling if scaling is not None else Dh**-0.5
    if attention_mask is None or attention_mask.dim() != 4:
        got = "no" if attention_mask is None else f"a {attention_mask.dim()}-D"
        raise SparselandError(
            f"got {got} attention mask: the causal mask function is not registered for "
            f"{module.config._attn_implementation!r} (register it with AttentionMaskInterface)"
        )
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask -> allowed positions
    if module.layer_idx in getattr(state, "arch_dense", ()):  # sliding-window / soft-capped layer: dense
        softcap = getattr(module.config, "attn_logit_softcapping", None)
        out = _masked_attention(query, key, value, attention_mask, scale, softcap)
    elif attention_mask is state.causal_mask_seen or _is_causal(attention_mask, T, S):
        state.causal_mask_seen = attention_mask  # one check per forward: layers share the mask object
        out = state.attend(module.layer_idx, query[0].float(), key[0].float(), value[0].float(), scale)
    else:  # padding or a custom pattern: the method cannot apply; attend densely under the given mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=True)[
            0
        ]
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous(), None  # (1, T, H, D)


def sparse_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """transformers' ``sdpa_mask``, but always a 4-D boolean mask (never ``None`` for "plain causal")."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register(name: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, sparse_attention_forward)
    AttentionMaskInterface.register(name, sparse_attention_mask)


def attention_method(model: torch.nn.Module) -> SparseAttention | None:
    """The sparse attention method the model carries, if any."""
    return getattr(model, ATTR, None)


@register(AttentionConfig)
def apply_attention(
    model: torch.nn.Module,
    config: AttentionConfig,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
) -> SparseAttention:
    """Attach ``config``'s method to every attention layer and switch transformers to it."""
    if filter_fn is not None:
        raise SparselandError("sparse attention applies to every layer; filter_fn is not supported")
    modules = _attention_modules(model)
    remove(model)
    state = SparseAttention(config, len(modules))
    state.arch_dense = dense_layers(model)
    name = PREFIX + config.kind
    _register(name)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise SparselandError(f"{type(model).__name__} cannot switch its attention implementation to {name!r}")
    state.previous_implementation = previous
    setattr(model, ATTR, state)
    for m in modules:
        setattr(m, ATTR, state)
    return state


def remove(model: torch.nn.Module) -> None:
    """Restore dense attention (the implementation the model had before ``sparsify_``)."""
    state = getattr(model, ATTR, None)
    if state is None:
        return
    model.set_attn_implementation(state.previous_implementation or "sdpa")
    for m in _attention_modules(model):
        if hasattr(m, ATTR):
            delattr(m, ATTR)
    delattr(model, ATTR)

"""One architecture layer: where a causal LM keeps its blocks, projections, norms, rotary, windows and
experts, described once for every family sparseland knows. Every other package reads it.

    arch = describe(model)                 # Arch; SparselandError for an unknown architecture
    arch.blocks                            # the decoder blocks (a ModuleList)
    arch.block_prefix(i)                   # "model.layers.3": the block's module name
    arch.linears(i)                        # {role: (name in the block, Linear)}, roles below
    arch.norm(block, "attn_in")            # a block's norm at a placement, or None

Roles of a block's Linears: ``q k v`` (separate) or ``qkv`` (fused: ``concat`` q|k|v as in Phi-3, or
``per_head`` [q_h k_h v_h] per head as in GPT-NeoX), ``o``; MLP ``gate up down`` (gated), ``gate_up``
(fused gated, Phi-3), ``up down`` (plain, GPT-NeoX's dense_h_to_4h / dense_4h_to_h); in an MoE block the
shared expert's ``shared_gate shared_up shared_down`` and ``shared_expert_gate``. The routed experts of
transformers 5 MoE blocks are 3-D parameters (``experts.gate_up_proj`` (E, 2I, C), ``experts.down_proj``
(E, C, I)), not Linears: ``arch.moe`` names them and the router, and the lean loop runs the block's own
forward (the router's top-k experts per token).

Norm placements: ``pre`` (Llama: attn_in, mlp_in), ``sandwich`` (Gemma 2/3: all four), ``post`` (OLMo 2:
attn_out, mlp_out); GPT-NeoX is pre-norm with an optional parallel residual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparseland.errors import SparselandError

NORM_SLOTS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
_PRE = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
_SANDWICH = {
    "attn_in": "input_layernorm",
    "attn_out": "post_attention_layernorm",
    "mlp_in": "pre_feedforward_layernorm",
    "mlp_out": "post_feedforward_layernorm",
}
_POST = {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}
_SEPARATE = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_GATED = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Family:
    """How one transformers model type lays out its modules (names relative to the parent module)."""

    base: str = "model"  # the CausalLM's inner model
    embed: str = "embed_tokens"
    final_norm: str = "norm"
    attn: str = "self_attn"
    attn_linears: dict[str, str] = field(default_factory=lambda: dict(_SEPARATE))
    qkv_layout: str = "separate"  # separate | concat | per_head
    mlp: str = "mlp"
    mlp_kind: str = "gated"  # gated | gated_fused | plain | moe
    mlp_linears: dict[str, str] = field(default_factory=lambda: dict(_GATED))
    norms: dict[str, str] = field(default_factory=lambda: dict(_PRE))
    placement: str = "pre"  # pre | sandwich | post
    qk_norm: str | None = None  # None | "head" (per head, Qwen3/Gemma 3) | "all" (over all heads, OLMo 2)
    rotary_by_layer_type: bool = False  # Gemma 3: rotary_emb(x, pos, layer_type)


_MOE_SHARED = {"shared_gate": "shared_expert.gate_proj", "shared_up": "shared_expert.up_proj"}
_MOE_SHARED |= {"shared_down": "shared_expert.down_proj", "shared_expert_gate": "shared_expert_gate"}

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm="head"),
    "gemma2": Family(norms=dict(_SANDWICH), placement="sandwich"),
    "gemma3_text": Family(norms=dict(_SANDWICH), placement="sandwich", qk_norm="head", rotary_by_layer_type=True),
    "phi3": Family(
        attn_linears={"qkv": "qkv_proj", "o": "o_proj"},
        qkv_layout="concat",
        mlp_kind="gated_fused",
        mlp_linears={"gate_up": "gate_up_proj", "down": "down_proj"},
    ),
    "qwen2_moe": Family(mlp_kind="moe", mlp_linears=dict(_MOE_SHARED)),
    "mixtral": Family(mlp_kind="moe", mlp_linears={}),
    "olmo2": Family(norms=dict(_POST), placement="post", qk_norm="all"),
    "gpt_neox": Family(
        base="gpt_neox",
        embed="embed_in",
        final_norm="final_layer_norm",
        attn="attention",
        attn_linears={"qkv": "query_key_value", "o": "dense"},
        qkv_layout="per_head",
        mlp_kind="plain",
        mlp_linears={"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    ),
}
_ALIASES = {"gemma3": "gemma3_text"}


@dataclass(frozen=True)
class MoE:
    """An MoE block's parts, names relative to the block: the router (top-k) and the routed experts."""

    router: str  # "mlp.gate" (a TopKRouter with weight (E, C))
    experts: str  # "mlp.experts" (3-D gate_up_proj / down_proj parameters)
    num_experts: int
    top_k: int


@dataclass
class Arch:
    """A loaded model's layout. Built by ``describe``; attribute names are the model's own."""

    model_type: str
    family: Family
    model: torch.nn.Module
    base: torch.nn.Module
    blocks: torch.nn.ModuleList
    blocks_path: str  # "model.layers"
    embed: torch.nn.Module
    final_norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    rotary_dim: int  # head_dim * partial_rotary_factor
    windows: tuple[int | None, ...]  # per layer: the sliding window (keys kept: q - window < k <= q), or None
    layer_types: tuple[str, ...]  # per layer: "full_attention" | "sliding_attention"
    attn_softcap: float | None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None  # logits -> cap * tanh(logits / cap) (Gemma 2/3)
    tied_embeddings: bool
    parallel_residual: bool  # GPT-NeoX: h + attn(ln1(h)) + mlp(ln2(h))
    biases: tuple[str, ...]  # roles whose Linear has a bias (in block 0)
    moe: MoE | None

    @property
    def name(self) -> str:
        return type(self.model).__name__

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def attention(self, i: int) -> torch.nn.Module:
        return self.blocks[i].get_submodule(self.family.attn)

    def mlp(self, i: int) -> torch.nn.Module:
        return self.blocks[i].get_submodule(self.family.mlp)

    def linears(self, i: int) -> dict[str, tuple[str, torch.nn.Module]]:
        """Block ``i``'s projections: role -> (name inside the block, module), attention first."""
        f, block = self.family, self.blocks[i]
        out = {r: (f"{f.attn}.{n}", block.get_submodule(f"{f.attn}.{n}")) for r, n in f.attn_linears.items()}
        out |= {r: (f"{f.mlp}.{n}", block.get_submodule(f"{f.mlp}.{n}")) for r, n in f.mlp_linears.items()}
        return out

    def linear_roles(self) -> dict[str, str]:
        """Full module name -> role for every block's projections."""
        out = {}
        for i in range(len(self.blocks)):
            out |= {f"{self.block_prefix(i)}.{n}": r for r, (n, _) in self.linears(i).items()}
        return out

    def router_names(self) -> set[str]:
        """In-block names of an MoE block's routing Linears/modules (left dense by weight pruning)."""
        if self.moe is None:
            return set()
        shared = self.family.mlp_linears.get("shared_expert_gate")
        return {self.moe.router} | ({f"{self.family.mlp}.{shared}"} if shared else set())

    def norm(self, block: torch.nn.Module, slot: str) -> torch.nn.Module | None:
        name = self.family.norms.get(slot)
        return None if name is None else block.get_submodule(name)

    def qk_norms(self, i: int) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        if self.family.qk_norm is None:
            return None
        attn = self.attention(i)
        return attn.q_norm, attn.k_norm

    def summary(self) -> dict:
        """The layout as JSON-able facts (for reports and ``--json``)."""
        return {
            "architecture": self.name,
            "model_type": self.model_type,
            "qkv": self.family.qkv_layout,
            "mlp": self.family.mlp_kind,
            "norms": self.family.placement,
            "qk_norm": self.family.qk_norm,
            "biases": list(self.biases),
            "rotary_dim": self.rotary_dim,
            "head_dim": self.head_dim,
            "sliding_window_layers": sum(w is not None for w in self.windows),
            "attn_softcap": self.attn_softcap,
            "final_softcap": self.final_softcap,
            "tied_embeddings": self.tied_embeddings,
            "parallel_residual": self.parallel_residual,
            "experts": None if self.moe is None else self.moe.num_experts,
        }


def _model_type(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None) or "?"
    return _ALIASES.get(mt, mt)


def is_known(model: torch.nn.Module) -> bool:
    """Whether ``describe`` knows the model's family (its model_type)."""
    return _model_type(model) in FAMILIES


def known() -> list[str]:
    """The transformers model types sparseland describes."""
    return sorted(FAMILIES)


def _unknown(model: torch.nn.Module, missing: str) -> SparselandError:
    return SparselandError(
        f"architecture {type(model).__name__} (model_type {_model_type(model)!r}) is not supported: {missing}. "
        f"sparseland knows the causal LMs {', '.join(known())}"
    )


def _get(model: torch.nn.Module, parent: torch.nn.Module, path: str, what: str) -> torch.nn.Module:
    try:
        return parent.get_submodule(path)
    except AttributeError:
        raise _unknown(model, f"it has no {what} at {path!r}") from None


def _windows(cfg, n: int) -> tuple[tuple[int | None, ...], tuple[str, ...]]:
    window = getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Mistral, Phi-3: every layer windowed when sliding_window is set
        on = window is not None and getattr(cfg, "use_sliding_window", True)
        types = ["sliding_attention" if on else "full_attention"] * n
    types = tuple(types[:n])
    return tuple(window if t == "sliding_attention" else None for t in types), types


def describe(model: torch.nn.Module) -> Arch:
    """The layout of ``model`` (a transformers causal LM); SparselandError naming the architecture and
    what is missing if sparseland does not know it. Checks that the modules it names exist."""
    mt = _model_type(model)
    fam = FAMILIES.get(mt)
    if fam is None:
        raise _unknown(model, "its layout (blocks, projections, norms) is not described in sparseland/models/arch.py")
    cfg = model.config
    base = _get(model, model, fam.base, "inner model")
    blocks = _get(model, base, "layers", "decoder blocks")
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise _unknown(model, f"{fam.base}.layers is not a non-empty ModuleList")
    lm_head = getattr(model, "lm_head", None) or getattr(model, "embed_out", None)
    if lm_head is None:
        raise _unknown(model, "it has no lm_head")
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None) or 1.0)
    windows, types = _windows(cfg, len(blocks))
    moe = None
    if fam.mlp_kind == "moe":
        mlp = _get(model, blocks[0], fam.mlp, "MoE block")
        for part in ("gate", "experts"):
            _get(model, mlp, part, f"MoE {part}")
        n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        moe = MoE(f"{fam.mlp}.gate", f"{fam.mlp}.experts", int(n_exp), int(cfg.num_experts_per_tok))
    arch = Arch(
        model_type=mt,
        family=fam,
        model=model,
        base=base,
        blocks=blocks,
        blocks_path=f"{fam.base}.layers",
        embed=_get(model, base, fam.embed, "token embedding"),
        final_norm=_get(model, base, fam.final_norm, "final norm"),
        lm_head=lm_head,
        rotary=_get(model, base, "rotary_emb", "rotary embedding"),
        hidden=cfg.hidden_size,
        n_heads=n_heads,
        n_kv=n_kv,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        windows=windows,
        layer_types=types,
        attn_softcap=getattr(cfg, "attn_logit_softcapping", None) or None,
        final_softcap=getattr(cfg, "final_logit_softcapping", None) or None,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)),
        biases=(),
        moe=moe,
    )
    for i, block in enumerate(blocks):  # every named module exists (a config variant may drop one)
        for slot in NORM_SLOTS:
            if fam.norms.get(slot):
                _get(model, block, fam.norms[slot], f"block {i} {slot} norm")
        _checked_linears(arch, i)
        if fam.qk_norm is not None:
            for n in ("q_norm", "k_norm"):
                _get(model, block, f"{fam.attn}.{n}", f"block {i} {n}")
    arch.biases = tuple(r for r, (_, m) in arch.linears(0).items() if getattr(m, "bias", None) is not None)
    return arch


def _checked_linears(arch: Arch, i: int) -> dict[str, tuple[str, torch.nn.Module]]:
    try:
        return arch.linears(i)
    except AttributeError as e:
        raise _unknown(arch.model, f"block {i} lacks a projection ({e})") from None


def router_names(model: torch.nn.Module) -> set[str]:
    """In-block names of the routers of a known MoE family (empty otherwise)."""
    return describe(model).router_names() if is_known(model) else set()


def decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module path, blocks) of any causal LM: the described layout for a known family, else the common
    Llama-style ``model.layers`` (weight pruning needs only the blocks and their Linears);
    SparselandError when there are none."""
    if is_known(model):
        arch = describe(model)
        return arch.blocks_path, arch.blocks
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
        return "model.layers", blocks
    raise _unknown(model, "it has no decoder blocks at model.layers")

"""Loading a model for serving and building the uvicorn server around the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparseland.errors import SparselandError


def require_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise SparselandError(
            f"`sparseland serve` needs FastAPI and uvicorn ({exc.name} is missing): pip install 'sparseland[serve]'"
        ) from None


def load_for_serving(
    spec: str, sparse_runtime: bool = True, format: str = "auto", value_dtype: str = "float32"
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, info)``: the model of ``spec`` (anything ``load_model`` takes), its Linear
    layers on sparseland's kernels unless ``sparse_runtime`` is False; ``info`` says what runs (the
    runtime formats, the attention and activation methods the model carries)."""
    from sparseland.activations.sites import get_state
    from sparseland.models import load_model
    from sparseland.runtime.generate import LeanDecoder
    from sparseland.runtime.modules import to_sparse_runtime_

    model, tok = load_model(spec)
    if tok is None:
        raise SparselandError(f"{spec} has no tokenizer; save the checkpoint with its tokenizer to serve it")
    LeanDecoder(model, 1)  # a model the lean loop cannot run fails here, with its reason
    info: dict[str, Any] = {"source": str(spec), "sparse_runtime": sparse_runtime}
    if sparse_runtime:
        rep = to_sparse_runtime_(model, format=format, value_dtype=value_dtype, lm_head_dtype="float32")
        info["runtime_formats"] = rep.formats
        info["weight_bytes_ratio"] = round(rep.ratio, 4)
    attn = getattr(model, "_sparseland_attention", None)
    info["attention_method"] = type(getattr(attn, "config", None)).__name__ if attn is not None else None
    act = get_state(model)
    info["activation_method"] = act.config if act is not None else None
    return model, tok, info


def model_name(spec: str) -> str:
    """The id clients send as ``model``: the directory or file name, or the known name itself."""
    p = Path(spec).expanduser()
    return p.name if p.name and (p.exists() or "/" in spec) else spec


def make_server(app, host: str, port: int, log_level: str = "warning"):
    """A ``uvicorn.Server`` for ``app`` (call ``.run()``, or run it on a thread and poll ``.started``)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
    return uvicorn.Server(config)

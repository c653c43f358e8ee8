"""Model loading: the embedded default model, local directories, cached hub ids, GGUF files."""

from sparseland.models.loader import KNOWN_MODELS, load_model, locate_embedded_gguf, model_context_length

__all__ = ["KNOWN_MODELS", "load_model", "locate_embedded_gguf", "model_context_length"]

"""``sparseland serve``: an OpenAI-compatible HTTP server on the lean decode loop and the sparse runtime.

``load_for_serving`` loads a model as the server runs it, ``Engine`` decodes requests on one worker
thread, ``build_app`` is the FastAPI app over an engine. FastAPI and uvicorn are the ``serve`` extra
(``pip install 'sparseland[serve]'``); importing this package does not need them.
"""

from sparseland.serve.engine import Engine, GenRequest, PromptCache, QueueFull
from sparseland.serve.server import load_for_serving, make_server

__all__ = ["Engine", "GenRequest", "PromptCache", "QueueFull", "load_for_serving", "make_server"]

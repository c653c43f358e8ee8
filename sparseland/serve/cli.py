"""``sparseland serve``: the OpenAI-compatible HTTP server from the command line."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from sparseland.cli import add_model_args, positive_int
from sparseland.cliargs import bounded
from sparseland.errors import SparselandError


def _passive_openmp(args: argparse.Namespace) -> None:
    """Re-run this command with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (libgomp reads it
    once, when it loads, so it cannot change in a running process). With the default policy OpenMP's
    threads spin at every barrier of the fused step (several per layer); when the cores are shared (with
    other processes, or with this server's own HTTP thread) a spinning thread holds the core its
    descheduled partner needs, and decode with 2 threads on 2 busy cores fell to 1.5-18 tok/s where
    PASSIVE (sleep at barriers) gave 24-35 (results.md, Serving). Set OMP_WAIT_POLICY=ACTIVE to spin."""
    argv = getattr(args, "process_argv", None)
    if argv is None or "OMP_WAIT_POLICY" in os.environ:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "sparseland.cli", *argv], env)


def _serve_command(args: argparse.Namespace) -> int:
    from sparseland.models.loader import model_context_length
    from sparseland.serve.server import load_for_serving, make_server, model_name, require_serve_extra

    require_serve_extra()
    _passive_openmp(args)
    from sparseland.serve.app import build_app
    from sparseland.serve.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, info = load_for_serving(args.model, not args.no_sparse_runtime, args.format, args.value_dtype)
    limit = model_context_length(model) or args.context
    context = min(args.context, limit)
    name = args.model_name or model_name(args.model)
    engine = Engine(
        model,
        tok,
        context=context,
        max_active=args.max_active,
        max_queue=args.max_queue,
        prompt_cache_bytes=int(args.prompt_cache_mb * 2**20),
        batch=args.batch,
        batch_min=args.batch_min,
    )
    info.update(context=context, threads=torch.get_num_threads(), batch=args.batch, batch_min=args.batch_min)
    app = build_app(engine, name, info)
    formats = info.get("runtime_formats") or "off"
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    batching = f"from {args.batch_min} decoding requests" if args.batch else "off"
    print(
        f"sparseland serve: model {name!r} ({args.model}), runtime formats {formats}, context {context}, "
        f"{torch.get_num_threads()} threads (OMP_WAIT_POLICY={policy}), batching {batching}; "
        f"OpenAI API at http://{args.host}:{args.port}/v1",
        flush=True,
    )
    try:
        make_server(app, args.host, args.port, args.log_level).run()
    finally:
        engine.close()
    return 0


_nonnegative_mb = bounded(float, lo=0, name="megabytes", hint="0 turns the prompt cache off")
_port = bounded(int, lo=1, hi=65535, name="port", hint="use 1-65535")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions) on the sparse runtime",
        description="Serve a model over OpenAI's HTTP API: /v1/models, /v1/completions, /v1/chat/completions "
        "(streaming or not), /health and /metrics (Prometheus). Greedy at temperature 0 equals "
        "`sparseland generate`. Needs the serve extra: pip install 'sparseland[serve]'.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch/kernel threads (default: torch's)")
    p.add_argument("--model-name", default=None, help="the id clients send as `model` (default: the directory name)")
    p.add_argument("--no-sparse-runtime", action="store_true", help="run Linear layers with torch, not our kernels")
    p.add_argument("--format", default="auto", help="runtime weight format (as `sparseland generate`; default auto)")
    p.add_argument("--value-dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight values")
    p.add_argument(
        "--context", type=positive_int, default=4096, help="most tokens per sequence, prompt + answer, capped by the "
        "model's own context (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--max-active", type=positive_int, default=4, help="requests decoded at once, taking turns token by token "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--batch", action=argparse.BooleanOptionalAction, default=False, help="continuous batching: the requests "
        "that are decoding take their next tokens in one step, each weight read once for all of them (the "
        "Python step with several rows). Off by default: under load it changed aggregate tok/s by -1 to +4%% on the "
        "135M model, and its several-row kernels round differently, so greedy answers of a quantized model "
        "can differ from `sparseland generate` (results.md, Serving). --no-batch: one fused step per request",
    )  # fmt: skip
    p.add_argument(
        "--batch-min", type=positive_int, default=3, help="batch only when at least this many requests are "
        "decoding; fewer take their fused steps (the batched step's Python overhead outweighs the shared weight "
        "reads at 2 rows on the 135M model: results.md, Serving) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=positive_int, default=32, help="requests that may wait for a slot; more get 503 "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--prompt-cache-mb", type=_nonnegative_mb, default=256.0, help="memory cap of the KV cache kept for prompt "
        "prefixes; 0 turns prompt caching off (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=_serve_command)


__all__ = ["add_commands", "SparselandError"]

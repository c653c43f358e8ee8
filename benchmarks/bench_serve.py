"""Load test of ``sparseland serve``: N concurrent streaming clients for M minutes against a 50% sparse
checkpoint and the dense model (and llama.cpp's ``llama-server`` on the shipped GGUF when its binary is
there), the servers measured in alternating phases of one run.

    flock /tmp/sparseland-heavy.lock python benchmarks/bench_serve.py --clients 4 --minutes 2
        [--sparse DIR] [--max-tokens 64] [--threads 2] [--llama-server /work/llamacpp/build/bin/llama-server]
    -> benchmarks/results/serve.{json,md}

Servers: every server is started once (its own process, ``--threads`` threads, the same port layout)
and stays up; the load runs against one at a time, in phases ordered A B C ... C B A (each server gets
``--minutes`` in total, half per phase) so that a drift in the machine's load falls on all of them.
Ours: ``sparseland serve --model smollm2-135m`` (dense, the sparse runtime's dense kernel) and
``sparseland serve --model SPARSE`` (the 50% checkpoint on the bitmask kernel; with no ``--sparse``,
Wanda 50% unstructured on 32 x 512 calibration tokens is built into ``--work-dir`` first).
llama.cpp: ``llama-server -m <shipped Q4_1 GGUF> -t THREADS --parallel CLIENTS`` (continuous batching
over its slots). Its binary is looked up at ``--llama-server``; missing, the table says so.

Clients: each loops until the phase's deadline, then finishes the request in flight; every request is
a streamed ``/v1/completions`` with a prompt cut from the embedded text's evaluation part (64-256 of
the model's tokens, seeded: each phase sends the same sequence), ``max_tokens`` answer tokens with
``ignore_eos`` (every answer the same length, on both engines), temperature 0. Per request: time to
first token (request sent -> first text chunk), tokens (the usage the server reports in the last
chunk), complete or not (a final chunk with a finish_reason, then ``[DONE]``). Per server: requests
sent, completed, failed (an HTTP error or a broken stream: lost), p50/p95 TTFT, aggregate tok/s
(answer tokens of all requests / phase wall time), and per-request decode tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LLAMA_SERVER = Path("/work/llamacpp/build/bin/llama-server")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, cmd: list[str], port: int, model_id: str) -> None:
        self.name, self.cmd, self.port, self.model_id = name, cmd, port, model_id
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{name}.log", "w")  # noqa: SIM115
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}  # every server alike
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not come up in {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def prompt_ids(tok, n: int, seed: int) -> list[list[int]]:
    """``n`` token windows of 64-256 tokens from the embedded text's evaluation part, at seeded offsets
    (also ``bench_batch_decode.py``'s prompts)."""
    import sparseland as sl

    ev = sl.load_corpus(tok).eval
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(64, 256)
        start = rng.randrange(len(ev) - length)
        out.append(ev[start : start + length].tolist())
    return out


def prompts(n: int, seed: int) -> list[str]:
    """``prompt_ids`` as texts."""
    import sparseland as sl

    _, tok = sl.load_model("smollm2-135m")
    return [tok.decode(ids) for ids in prompt_ids(tok, n, seed)]


async def one_request(http: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": server.model_id,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    rec = {"ttft": None, "tokens": 0, "complete": False, "error": None, "seconds": None}
    finish, done = None, False
    try:
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["error"] = str(obj["error"])[:200]
                    break
                for ch in obj.get("choices") or []:
                    if ch.get("text") and rec["ttft"] is None:
                        rec["ttft"] = time.perf_counter() - t0
                    finish = ch.get("finish_reason") or finish
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    rec["seconds"] = time.perf_counter() - t0
    rec["complete"] = done and finish is not None and rec["error"] is None and rec["tokens"] == max_tokens
    if not rec["complete"] and rec["error"] is None:
        rec["error"] = f"incomplete stream: done={done} finish={finish} tokens={rec['tokens']}"
    return rec


async def phase(server: Server, texts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    deadline = time.perf_counter() + seconds
    records: list[dict] = []
    counter = iter(range(10**9))

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            records.append(await one_request(http, server, texts[i % len(texts)], max_tokens))

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return {"wall_seconds": time.perf_counter() - t0, "records": records}


def summarize(name: str, phases: list[dict]) -> dict:
    recs = [r for p in phases for r in p["records"]]
    wall = sum(p["wall_seconds"] for p in phases)
    ok = [r for r in recs if r["complete"]]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    per_req = [(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in ok if r["tokens"] > 1 and r["ttft"] is not None]

    def pct(xs: list[float], q: float) -> float | None:
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None

    return {
        "server": name,
        "requests": len(recs),
        "completed": len(ok),
        "failed": len(recs) - len(ok),
        "errors": sorted({r["error"] for r in recs if r["error"]})[:5],
        "ttft_p50_s": pct(ttft, 0.5),
        "ttft_p95_s": pct(ttft, 0.95),
        "aggregate_tok_s": sum(r["tokens"] for r in recs) / wall if wall else None,
        "per_request_decode_tok_s_median": statistics.median(per_req) if per_req else None,
        "answer_tokens": sum(r["tokens"] for r in recs),
        "wall_seconds": wall,
    }


def build_sparse(work: Path) -> Path:
    """Wanda 50% unstructured on the embedded model (32 x 512 calibration tokens), saved once."""
    import sparseland as sl

    out = work / "wanda50"
    if out.exists():
        return out
    model, tok = sl.load_model("smollm2-135m")
    calib = sl.load_corpus(tok).calibration(n_samples=32, seq_len=512, seed=0)
    sl.sparsify_(model, sl.WandaConfig(sparsity=0.5), calibration=calib)
    sl.save_sparse_checkpoint(model, tok, out, metadata={"method": "wanda", "sparsity": 0.5})
    return out


def engine_parts(server: Server) -> dict[str, dict[str, float]]:
    """The server's ``sparseland_engine_*_total{part=...}`` counters: where its worker's time went."""
    out: dict[str, dict[str, float]] = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("sparseland_engine_") and 'part="' in line:
            name = line.split("{", 1)[0].removeprefix("sparseland_engine_").removesuffix("_total")
            part = line.split('part="', 1)[1].split('"', 1)[0]
            out.setdefault(part, {})[name] = float(line.rsplit(" ", 1)[1])
    return out


def engine_markdown(engine: dict[str, dict[str, dict[str, float]]]) -> str:
    if not engine:
        return ""
    lines = [
        "",
        "Where our servers' worker time went (`/metrics` `sparseland_engine_*`, the whole run with its warm-up; "
        "prefill: prompt chunks, decode: one request's token by the fused step, batched_decode: several "
        "requests' tokens in one step, detokenize: the answer's text, stop strings and the event):",
        "",
        "| server | part | seconds | tokens | calls | ms / call | tokens / s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, parts in engine.items():
        for part, v in sorted(parts.items()):
            sec, tok, calls = v.get("seconds", 0.0), v.get("tokens", 0.0), v.get("calls", 0.0)
            per_call = 1000 * sec / calls if calls else 0.0
            tps = tok / sec if sec else 0.0
            lines.append(f"| {name} | {part} | {sec:.1f} | {tok:.0f} | {calls:.0f} | {per_call:.1f} | {tps:.1f} |")
    return "\n".join(lines) + "\n"


SERVER_KINDS = ("dense", "sparse", "int4", "llama")


def make_servers(args: argparse.Namespace, sparse: Path) -> tuple[list[Server], str | None]:
    """The servers of ``--servers``: dense / sparse / int4 (ours; ``:nobatch`` appended runs it with
    ``--no-batch``) and llama (llama-server on the shipped GGUF, if its binary is there)."""
    from sparseland.models.loader import locate_embedded_gguf

    py = [sys.executable, "-m", "sparseland.cli", "serve", "--threads", str(args.threads)]
    py += ["--max-active", str(args.clients), "--max-queue", str(4 * args.clients)]
    models = {"dense": "smollm2-135m", "sparse": str(sparse), "int4": args.int4}
    labels = {"dense": "dense", "sparse": "50% sparse", "int4": "int4-g32"}
    servers, skipped = [], None
    for spec in args.servers.split(","):
        kind, _, flag = spec.partition(":")
        if kind not in SERVER_KINDS or flag not in ("", "nobatch"):
            raise SystemExit(f"--servers: {spec!r} is not one of {SERVER_KINDS} (optionally with ':nobatch')")
        p = free_port()
        if kind == "llama":
            llama = Path(args.llama_server)
            if not (llama.is_file() and os.access(llama, os.X_OK)):
                skipped = f"skipped: no llama-server binary at {llama} (build llama.cpp, then pass --llama-server PATH)"
                print(skipped, flush=True)
                continue
            gguf = locate_embedded_gguf("smollm2-135m")
            cmd = [str(llama), "-m", str(gguf), "--port", str(p), "-t", str(args.threads), "-tb", str(args.threads)]
            cmd += ["--parallel", str(args.clients), "-c", str(args.clients * 1024), "--no-webui"]
            servers.append(Server(f"llama.cpp llama-server ({gguf.name})", cmd, p, "smollm2"))
            continue
        if models[kind] is None:
            raise SystemExit(f"--servers {kind}: pass the checkpoint with --{kind} DIR")
        name = f"sparseland {labels[kind]}" + (" --no-batch" if flag else " --batch")
        cmd = [*py, "--model", models[kind], "--port", str(p), "--no-batch" if flag else "--batch"]
        servers.append(Server(name, cmd, p, Path(models[kind]).name if kind != "dense" else models[kind]))
    return servers, skipped


def markdown(
    args: argparse.Namespace,
    rows: list[dict],
    skipped: str | None,
    command: str,
    sparse: dict,
    load: dict | None = None,
) -> str:
    lines = [
        "# `sparseland serve` under load",
        "",
        f"Command: `{command}`",
        "",
        f"{args.clients} concurrent streaming clients, {args.minutes} min per server (two phases, order A B ... B A), "
        f"{args.max_tokens} answer tokens per request (`ignore_eos`), prompts of 64-256 tokens from the embedded "
        f"text, temperature 0, {args.threads} threads per server (`OMP_WAIT_POLICY=PASSIVE` for all, as "
        "`sparseland serve` sets it), one server loaded at a time.",
        "",
        f"Sparse checkpoint: `{sparse['path']}`, its metadata {sparse['metadata']}; the dense server runs the "
        "embedded model (`smollm2-135m`) on the runtime's dense float32 kernel."
        + (f" int4 checkpoint: `{args.int4}` (`sparseland quantize --scheme int4-g32`)." if args.int4 else "")
        + " `--batch`: continuous batching of the decoding requests' steps; `--no-batch`: one fused step each.",
        "",
        "| server | requests | completed | failed | TTFT p50 (s) | TTFT p95 (s) | aggregate tok/s | "
        "per-request decode tok/s (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r['server']} | {r['requests']} | {r['completed']} | {r['failed']} | {f(r['ttft_p50_s'])} | "
            f"{f(r['ttft_p95_s'])} | {f(r['aggregate_tok_s'], '.1f')} | "
            f"{f(r['per_request_decode_tok_s_median'], '.1f')} |"
        )
    if skipped:
        lines += ["", f"llama.cpp: {skipped}"]
    if load:
        lines += ["", f"Machine load average (1/5/15 min) before: {load['before']}, after: {load['after']}."]
    errs = [f"- {r['server']}: {e}" for r in rows for e in r["errors"]]
    if errs:
        lines += ["", "Errors (first five distinct per server):", *errs]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default: 4)")
    ap.add_argument("--minutes", type=float, default=2.0, help="load per server, in two phases (default: 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="answer tokens per request (default: 64)")
    ap.add_argument("--threads", type=int, default=2, help="threads per server (default: 2)")
    ap.add_argument("--sparse", default=None, help="the 50%% sparse checkpoint (default: build Wanda 50%%)")
    ap.add_argument("--int4", default=None, help="an int4-g32 checkpoint (sparseland quantize) for --servers int4")
    ap.add_argument(
        "--servers", default="dense,sparse,llama", help="comma-separated, loaded in phases A B ... B A: dense, "
        "sparse, int4, llama; ':nobatch' after one of ours runs it with --no-batch (default: %(default)s)",
    )  # fmt: skip
    ap.add_argument("--work-dir", default="/tmp/sparseland-bench-serve", help="where a built checkpoint goes")
    ap.add_argument("--llama-server", default=str(LLAMA_SERVER), help="llama-server binary (skipped if absent)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="results directory (default: benchmarks/results)")
    ap.add_argument("--stem", default="serve", help="results file stem (default: serve)")
    args = ap.parse_args()
    command = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])

    from sparseland.io import write_results

    sparse = Path(args.sparse) if args.sparse else build_sparse(Path(args.work_dir))
    texts = prompts(500, args.seed)
    servers, skipped = make_servers(args, sparse)
    load_before = os.getloadavg()
    try:
        for s in servers:
            s.wait_ready()
            print(f"{s.name}: up at {s.url}", flush=True)
            warm = {"model": s.model_id, "prompt": texts[-1], "max_tokens": 4, "temperature": 0}
            httpx.post(s.url + "/v1/completions", json=warm, timeout=600)  # warm-up, not measured
        order = servers + servers[::-1]  # A B C C B A
        results: dict[str, list[dict]] = {s.name: [] for s in servers}
        half = args.minutes * 60 / 2
        for s in order:
            print(f"phase: {s.name}, {half:.0f} s, {args.clients} clients", flush=True)
            res = asyncio.run(phase(s, texts, args.clients, half, args.max_tokens))
            results[s.name].append(res)
            done = sum(r["complete"] for r in res["records"])
            print(f"  {len(res['records'])} requests, {done} complete", flush=True)
        engine = {s.name: engine_parts(s) for s in servers if s.name.startswith("sparseland")}
    finally:
        for s in servers:
            s.stop()
    rows = [summarize(name, phases) for name, phases in results.items()]
    meta = json.loads((sparse / "sparseland.json").read_text()).get("metadata", {})
    method = meta.get("method")  # sparseland prune writes a dict (and a per-layer report, left out here)
    if isinstance(method, dict):
        meta = {k: method[k] for k in ("kind", "sparsity", "pattern") if k in method}
    else:
        meta = {k: meta[k] for k in ("method", "sparsity") if k in meta}
    info = {"path": str(sparse), "metadata": meta}
    data = {"command": command, "args": vars(args), "sparse_checkpoint": info, "llama_cpp": skipped or "measured"}
    data["rows"] = rows
    data["engine_parts"] = engine  # our servers' worker time by part over the whole run (warm-up included)
    data["load_average"] = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-minute, of the machine
    md = markdown(args, rows, skipped, command, info, data["load_average"]) + engine_markdown(engine)
    write_results(Path(args.out), args.stem, data, md)
    print(md)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

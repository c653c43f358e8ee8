"""``sparseland sae``: sparse autoencoders and transcoders on a model's activations.

sparseland sae harvest --model smollm2-135m --layer 15 --site resid --tokens 2000000 --out cache/
sparseland sae train --cache cache/ --arch topk --width 9216 --k 32 --out sae-topk/
sparseland sae eval --sae sae-topk/ --json
sparseland sae sweep --cache cache/ --archs topk,batchtopk --ks 16,32,64 --width 2304 --out sweep/
sparseland sae browse --sae sae-topk/ --out features.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparseland.cli import add_model_args, positive_int
from sparseland.errors import SparselandError


def _sites(text: str) -> tuple[str, ...]:
    from sparseland.sae.sites import SITES

    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise argparse.ArgumentTypeError(f"site(s) {bad or text!r} not in {SITES}; e.g. resid or mlp_in,mlp_out")
    return sites


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass positive integers such as 16,32,64")
    return values


def _harvest_command(args: argparse.Namespace) -> int:
    from sparseland.models import load_model
    from sparseland.sae.cache import harvest

    model, tokenizer = load_model(args.model)
    stats = harvest(
        model,
        tokenizer,
        args.out,
        model_name=args.model,
        layer=args.layer,
        sites=args.site,
        text=args.text,
        tokens=args.tokens,
        eval_tokens=args.eval_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    for split, s in stats.items():
        resumed = f" (resumed after {s.resumed_shards} shards)" if s.resumed_shards else ""
        print(
            f"{split:6s} {s.tokens} new tokens in {s.seconds:.1f} s ({s.tokens_per_second:.0f} tokens/s), "
            f"{s.shards} shards{resumed}"
        )
    print(f"cache  {args.out}")
    return 0


def build_config(arch: str, args: argparse.Namespace):
    """The SAEConfig of ``arch`` from the CLI flags (flags the method does not have are ignored)."""
    import dataclasses

    from sparseland.sae import ARCHS

    if arch not in ARCHS:
        raise SparselandError(f"--arch {arch!r} is not one of {sorted(ARCHS)}")
    cls = ARCHS[arch].config_type
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"width": args.width, "transcoder": args.transcoder}
    for name in ("k", "l1_coeff", "l0_coeff", "aux_k"):
        value = getattr(args, name, None)
        if name in fields and value is not None:
            kwargs[name] = value
    return cls(**kwargs)


def _train_one(cache, config, args, out: Path, progress: bool = True) -> dict:
    from sparseland.sae.train import save_sae, sites_for, train_sae

    in_site, out_site = sites_for(config, args.site, cache)
    sae, res = train_sae(
        cache,
        config,
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        site=args.site,
        seed=args.seed,
        progress=progress,
    )
    meta = {
        "cache": str(cache.path.resolve()),
        "model": cache.manifest["model"],
        "layer": cache.layer,
        "in_site": in_site,
        "out_site": out_site,
        "train": res.to_dict(),
    }
    save_sae(sae, out, meta)
    return meta


def _train_command(args: argparse.Namespace) -> int:
    from sparseland.cli import check_new_dir
    from sparseland.sae.cache import ActivationCache

    config = build_config(args.arch, args)
    check_new_dir(args.out)
    cache = ActivationCache(args.cache)
    meta = _train_one(cache, config, args, Path(args.out))
    t = meta["train"]
    print(
        f"trained {config.arch} width {config.width} on {t['tokens']} tokens in {t['seconds']:.1f} s "
        f"({t['tokens_per_second']:.0f} tokens/s)"
    )
    print(f"last batch: mse {t['final_mse']:.4f} (normalized units), L0 {t['final_l0']:.1f}")
    print(f"saved   {args.out}")
    return 0


def _eval_one(sae_dir: str, args: argparse.Namespace, model=None, tokenizer=None) -> dict:
    from sparseland.sae.cache import ActivationCache
    from sparseland.sae.evaluate import evaluate_sae
    from sparseland.sae.train import load_sae

    sae, meta = load_sae(sae_dir)
    cache = ActivationCache(args.cache or meta["cache"])
    if model is None and not args.no_splice:
        from sparseland.models import load_model

        model, tokenizer = load_model(meta["model"])
    res = evaluate_sae(
        sae,
        meta,
        cache.split("eval"),
        model=None if args.no_splice else model,
        tokenizer=tokenizer,
        ce_text=args.ce_text,
        ce_windows=args.ce_windows,
        seq_len=args.seq_len,
        progress=not args.json,
    )
    return {"sae": str(sae_dir), "arch": sae.config.arch, **res}


def _eval_command(args: argparse.Namespace) -> int:
    res = _eval_one(args.sae, args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"FVU            {res['fvu']:.4f}  (eval split, {res['eval_tokens']} tokens, its own mean)")
    print(f"L0             {res['l0']:.2f}  (realised at inference)")
    print(f"dead           {res['dead_fraction'] * 100:.2f}%  (no firing over {res['dead_over_tokens']} tokens)")
    if res["delta_ce_nats"] is not None:
        print(
            f"delta CE       {res['delta_ce_nats']:.4f} nats  "
            f"(clean {res['ce_clean']:.4f}, spliced {res['ce_spliced']:.4f})"
        )
        print(f"KL             {res['kl_nats']:.4f} nats")
        print(
            f"CE recovered   {res['ce_recovered']:.4f} vs mean ablation, "
            f"{res['ce_recovered_zero_ablation']:.4f} vs zero ablation"
        )
        print(f"splice text    {res['ce_text']}")
    return 0


def _sweep_command(args: argparse.Namespace) -> int:
    from sparseland.sae.cache import ActivationCache
    from sparseland.sae.sweep import run_sweep

    configs = {}
    for arch in args.archs.split(","):
        for k in args.ks:
            ns = argparse.Namespace(**{**vars(args), "k": k})
            configs[f"{arch}-k{k}"] = build_config(arch.strip(), ns)
    cache = ActivationCache(args.cache)
    model = tokenizer = None
    if not args.no_splice:
        from sparseland.models import load_model

        model, tokenizer = load_model(cache.manifest["model"])
    rows = run_sweep(
        cache,
        configs,
        args.out,
        tokens=args.tokens,
        batch_size=args.batch_size,
        model=model,
        tokenizer=tokenizer,
        ce_windows=args.ce_windows,
        ce_text=args.ce_text,
        seq_len=args.seq_len,
    )
    for r in rows:
        dce = "-" if r["delta_ce_nats"] is None else f"{r['delta_ce_nats']:.4f}"
        print(
            f"{r['name']:20s} L0 {r['l0']:7.2f}  FVU {r['fvu']:.4f}  dead {r['dead_fraction'] * 100:5.2f}%  dCE {dce}"
        )
    print(f"report  {Path(args.out) / 'report.html'}")
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from sparseland.sae.cache import ActivationCache
    from sparseland.sae.report import feature_browser
    from sparseland.sae.train import load_sae

    sae, meta = load_sae(args.sae)
    cache = ActivationCache(args.cache or meta["cache"])
    from sparseland.models import load_model

    model, tokenizer = load_model(meta["model"])
    path = feature_browser(
        sae, cache.split("eval"), meta["in_site"], tokenizer, model=model, n_features=args.features, out=args.out
    )
    print(f"feature browser  {path}")
    return 0


def add_eval_args(p: argparse.ArgumentParser, with_cache: bool = True) -> None:
    if with_cache:
        p.add_argument(
            "--cache",
            default=None,
            help="cache whose eval split to use (default: the one it was trained on)",
        )
    p.add_argument(
        "--ce-text", default="embedded", help="text for delta CE / KL: embedded, stdlib or a file (eval part)"
    )
    p.add_argument(
        "--ce-windows", type=positive_int, default=16, help="windows spliced for delta CE (default: %(default)s)"
    )
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per splice window (default: %(default)s)")
    p.add_argument("--no-splice", action="store_true", help="skip delta CE / KL (no model load)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="activation cache written by `sparseland sae harvest`")
    p.add_argument("--width", type=positive_int, default=9216, help="latents (default: %(default)s)")
    p.add_argument(
        "--k", type=positive_int, default=None, help="active latents per token (k-sparse methods; default 32)"
    )
    p.add_argument("--l1-coeff", type=float, default=None, help="L1 weight (relu)")
    p.add_argument("--l0-coeff", type=float, default=None, help="L0 weight (jumprelu)")
    p.add_argument("--aux-k", type=int, default=None, help="AuxK dead latents used (topk, batchtopk; 0: off)")
    p.add_argument("--transcoder", action="store_true", help="map mlp_in to mlp_out (cache needs both sites)")
    p.add_argument("--site", default=None, help="cache site to reconstruct (default: its first)")
    p.add_argument(
        "--tokens", type=positive_int, default=None, help="training tokens (default: one pass over the cache)"
    )
    p.add_argument("--batch-size", type=positive_int, default=4096, help="tokens per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 2e-4 / sqrt(width / 16384))")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")


def add_commands(subparsers) -> None:
    from sparseland.cli import ArgumentParser

    top = subparsers.add_parser("sae", help="sparse autoencoders and transcoders: harvest, train, eval, sweep, browse")
    sub = top.add_subparsers(dest="sae_command", required=True, metavar="SAE_COMMAND", parser_class=ArgumentParser)

    p = sub.add_parser("harvest", help="cache a site's activations (fp16 shards, resumable)")
    add_model_args(p)
    p.add_argument("--layer", type=int, required=True, help="decoder block index, e.g. 15")
    p.add_argument("--site", type=_sites, default=("resid",), help="resid, mlp_in, mlp_out, attn_out, or a comma list")
    p.add_argument("--text", default="stdlib", help="stdlib (default), embedded, or a UTF-8 file")
    p.add_argument("--tokens", type=positive_int, default=1_000_000, help="training tokens (default: %(default)s)")
    p.add_argument("--eval-tokens", type=positive_int, default=65_536, help="evaluation tokens (default: %(default)s)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--out", required=True, help="cache directory (an existing one with the same settings resumes)")
    p.set_defaults(func=_harvest_command)

    p = sub.add_parser("train", help="train one SAE or transcoder on a cache")
    p.add_argument("--arch", default="topk", help="topk, batchtopk, relu, jumprelu, ... (default: %(default)s)")
    add_train_args(p)
    p.add_argument("--out", required=True, help="new directory for sae.safetensors + sae.json")
    p.set_defaults(func=_train_command)

    p = sub.add_parser("eval", help="FVU, L0, dead latents, delta CE / KL of a trained SAE")
    p.add_argument("--sae", required=True, help="directory written by `sparseland sae train`")
    add_eval_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_eval_command)

    p = sub.add_parser("sweep", help="architectures x k on one cache (resumable), with the FVU/dCE-vs-L0 report")
    p.add_argument("--archs", default="topk,batchtopk", help="comma list of architectures (default: %(default)s)")
    p.add_argument("--ks", type=_int_list, default=[16, 32, 64], help="comma list of k (default: 16,32,64)")
    add_train_args(p)
    add_eval_args(p, with_cache=False)
    p.add_argument("--out", required=True, help="sweep directory (re-running it resumes)")
    p.set_defaults(func=_sweep_command)

    p = sub.add_parser("browse", help="HTML feature browser of a trained SAE: top contexts and top logits per latent")
    p.add_argument("--sae", required=True, help="directory written by `sparseland sae train`")
    p.add_argument("--cache", default=None, help="cache whose eval split to read (default: the training one)")
    p.add_argument("--features", type=positive_int, default=24, help="latents shown, most frequent first")
    p.add_argument("--out", default="features.html", help="HTML file to write (default: %(default)s)")
    p.set_defaults(func=_report_command)

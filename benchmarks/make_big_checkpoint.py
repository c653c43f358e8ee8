"""Write a random-weight Llama-shaped model directory in safetensors shards (config.json, shards, index).

Random weights (normal, std 0.02, Llama's init) say nothing about quality; they let the out-of-core
pruner prove its memory and time on shapes that do not fit in memory. Shapes:

- ``llama2-7b``:  32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000: 6.74 B parameters, 13.5 GB bf16
- ``tinyllama``:  22 layers, hidden 2048, MLP 5632, 32 heads (4 KV heads), vocab 32000: 1.10 B, 2.2 GB bf16
- ``tiny``:       4 layers, hidden 256, MLP 688 (for a smoke run)

Each tensor is generated and written one shard at a time, so memory stays at one shard (~2 GB).

    python benchmarks/make_big_checkpoint.py --shape llama2-7b --out /work/big/llama2-7b-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4),
}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True, help="model directory to create (must not exist)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=2.0, help="approximate shard size in GB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fill",
        choices=("randn", "tile"),
        default="randn",
        help="randn: every weight drawn independently; tile: slices of one 16M-value random pool at random "
        "offsets (memory-bound, minutes faster on a loaded machine; as good for measuring memory and time)",
    )
    return p


def main(argv=None) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    args = _parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pass a new directory")
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, dtype=args.dtype, **SHAPES[args.shape])  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    h, m, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h // cfg.num_attention_heads * cfg.num_key_value_heads
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(L):
        p_ = f"model.layers.{i}."
        names += [
            (p_ + "input_layernorm.weight", (h,)),
            (p_ + "self_attn.q_proj.weight", (h, h)),
            (p_ + "self_attn.k_proj.weight", (kv, h)),
            (p_ + "self_attn.v_proj.weight", (kv, h)),
            (p_ + "self_attn.o_proj.weight", (h, h)),
            (p_ + "post_attention_layernorm.weight", (h,)),
            (p_ + "mlp.gate_proj.weight", (m, h)),
            (p_ + "mlp.up_proj.weight", (m, h)),
            (p_ + "mlp.down_proj.weight", (h, m)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    limit = args.shard_gb * 1e9
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(args.seed)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(dtype) if args.fill == "tile" else None
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=dtype)
            elif pool is not None:
                numel = torch.Size(shape).numel()
                reps = -(-numel // pool.numel()) + 1
                start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
                t = pool.repeat(reps)[start : start + numel].view(shape).clone() if reps > 2 else None
                if t is None:
                    t = torch.cat([pool[start:], pool, pool])[:numel].view(shape).clone()
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
        print(
            f"{file}: {len(group)} tensors, {total / 1e9:.2f} GB so far, {time.perf_counter() - t0:.0f} s", flush=True
        )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.save_pretrained(tmp)
    tmp.rename(out)
    params = sum(torch.Size(s).numel() for _, s in names)
    print(f"wrote {out}: {params / 1e9:.3f} B parameters, {total / 1e9:.2f} GB in {len(groups)} shards")


if __name__ == "__main__":
    main()

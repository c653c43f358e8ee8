"""Chat-formatted text: the tokenizer's chat template, and "self-calibration" data the dense model
generates for itself.

An instruct model is used through its chat template, so calibrating (and judging) a compressed copy
on raw reference text measures the wrong thing. ``self_chat`` asks the model a fixed, varied set of
instructions (templates x topics, below; greedy, no sampling), keeps its answers, and caches them on
disk (keyed by the model's weights, the instructions and the answer budget). The instructions come in
two disjoint parts by topic: ``"calib"`` (for calibration and distillation) and ``"eval"`` (for
judging agreement on chat text), so a model is never judged on the conversations it was calibrated on.

``chat_tokens`` turns conversations into one token stream (each conversation formatted with the chat
template, end to end); ``mix_calibration`` draws calibration windows from several such streams.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparseland.errors import SparselandError

SPLITS = ("calib", "eval")

TEMPLATES = (
    "Explain {t} in simple terms.",
    "Give three short facts about {t}.",
    "Write a short paragraph about {t}.",
    "What is the most important thing to know about {t}?",
    "Summarize {t} for a beginner in two sentences.",
    "List the main steps or parts of {t}.",
    "Why does {t} matter? Answer briefly.",
    "Ask me two quiz questions about {t}, then give the answers.",
)
TOPICS_CALIB = (
    "the water cycle",
    "photosynthesis",
    "Python lists",
    "the French Revolution",
    "how a bicycle works",
    "healthy sleep",
    "the solar system",
    "compound interest",
    "recursion in programming",
    "volcanoes",
    "the human heart",
    "writing a good email",
    "the Roman Empire",
    "electric circuits",
    "machine learning",
    "baking bread",
    "prime numbers",
    "the internet",
    "climate and weather",
    "learning a new language",
)
TOPICS_EVAL = (
    "honeybees",
    "Python dictionaries",
    "the Moon",
    "saving money",
    "earthquakes",
    "the printing press",
    "sorting algorithms",
    "drinking enough water",
    "rainbows",
    "chess openings",
)
# instructions that are not of the templated kinds: code, rewriting, arithmetic, translation, lists
EXTRA_CALIB = (
    "Write a Python function that reverses a string.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is 17 times 23? Show your working.",
    "Rewrite this sentence politely: 'Give me the report now.'",
    "Write a haiku about autumn.",
    "Give me a packing list for a weekend hiking trip.",
    "What does the Python expression len('hello') return, and why?",
    "Suggest three names for a coffee shop.",
)
EXTRA_EVAL = (
    "Write a Python function that counts the vowels in a string.",
    "What is 12 plus 45 minus 8?",
    "Write a limerick about a cat.",
    "Give me three tips for a job interview.",
)


def instructions(split: str) -> list[str]:
    """The fixed instructions of ``split`` ("calib" or "eval"): every topic of the split with one of the
    templates (rotating), then the split's extra instructions; deterministic, no two alike."""
    if split not in SPLITS:
        raise SparselandError(f"unknown chat split {split!r}; choose from {', '.join(SPLITS)}")
    topics, extra = (TOPICS_CALIB, EXTRA_CALIB) if split == "calib" else (TOPICS_EVAL, EXTRA_EVAL)
    out = []
    for rep in range(len(TEMPLATES) // 2):  # each topic with 4 different templates
        for i, topic in enumerate(topics):
            out.append(TEMPLATES[(i + 2 * rep) % len(TEMPLATES)].format(t=topic))
    return out + list(extra)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages(prompt: str, system: str | None = None, answer: str | None = None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    out.append({"role": "user", "content": prompt})
    if answer is not None:
        out.append({"role": "assistant", "content": answer})
    return out


def format_chat(tokenizer, prompt: str, system: str | None = None, answer: str | None = None) -> str:
    """``prompt`` (and ``answer``) through the tokenizer's chat template; without ``answer`` the text ends
    with the assistant's turn opened (the generation prompt). ``system`` None keeps the template's own."""
    if not has_chat_template(tokenizer):
        raise SparselandError("the tokenizer has no chat template; use raw text (e.g. `generate --raw`)")
    return tokenizer.apply_chat_template(
        messages(prompt, system, answer), tokenize=False, add_generation_prompt=answer is None
    )


def chat_ids(tokenizer, prompt: str, system: str | None = None) -> torch.Tensor:
    """``(1, T)`` token ids of ``prompt`` as a chat turn ready for the assistant's answer."""
    text = format_chat(tokenizer, prompt, system)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


@dataclass
class Conversation:
    prompt: str
    answer: str


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights (sums of a few tensors): changes when the weights change."""
    h = hashlib.sha256()
    params = list(model.named_parameters())
    for name, p in params[:3] + params[-3:]:
        h.update(name.encode())
        h.update(repr((tuple(p.shape), round(float(p.detach().double().sum()), 6))).encode())
    return h.hexdigest()[:16]


def cache_path(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> Path:
    from sparseland.models.loader import cache_root

    h = hashlib.sha256(
        json.dumps(
            [model_fingerprint(model), list(prompts), max_new_tokens, getattr(tokenizer, "chat_template", None)]
        ).encode()
    )
    return cache_root() / "chat" / f"selfchat-{h.hexdigest()[:20]}.json"


@torch.inference_mode()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 160,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
) -> list[Conversation]:
    """The model's greedy answers to ``prompts`` through the chat template (batched, left-padded)."""
    if max_new_tokens <= 0 or batch_size <= 0:
        raise SparselandError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be positive")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: list[Conversation] = []
    model.eval()
    bar = tqdm(total=len(prompts), desc="self-chat", unit="answer", disable=not progress, leave=False)
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        rows = [chat_ids(tokenizer, p, system)[0] for p in chunk]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for j, r in enumerate(rows):  # left padding: every prompt ends where the answers start
            ids[j, T - len(r) :] = r
            mask[j, T - len(r) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for p, row in zip(chunk, gen[:, T:], strict=True):
            out.append(Conversation(p, tokenizer.decode(row, skip_special_tokens=True).strip()))
        bar.update(len(chunk))
    bar.close()
    return out


def self_chat(
    model: torch.nn.Module,
    tokenizer,
    split: str = "calib",
    max_new_tokens: int = 160,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    cache: bool = True,
) -> list[Conversation]:
    """The model's own answers to the instructions of ``split``, from the on-disk cache when this model
    (same weights), instructions and budget were asked before."""
    prompts = instructions(split)[:limit]
    path = cache_path(model, tokenizer, prompts, max_new_tokens)
    if cache and path.is_file():
        return [Conversation(**c) for c in json.loads(path.read_text())["conversations"]]
    convs = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    if cache:
        from sparseland.io import write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"split": split, "max_new_tokens": max_new_tokens, "conversations": [asdict(c) for c in convs]}
        write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    return convs


def chat_tokens(tokenizer, conversations: Sequence[Conversation], system: str | None = None) -> torch.Tensor:
    """One 1-D token stream: every conversation through the chat template, end to end."""
    if not conversations:
        raise SparselandError("no conversations to format; generate some with self_chat")
    ids: list[int] = []
    for c in conversations:
        text = format_chat(tokenizer, c.prompt, system, c.answer)
        ids += tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def mix_calibration(
    sources: Sequence[tuple[torch.Tensor, float]], n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """``(n_samples, seq_len)`` calibration windows drawn from several 1-D token streams, each given with
    its share (shares are normalised; counts rounded so they sum to ``n_samples``); the windows of each
    source at seeded random offsets (``calibration_windows``), then shuffled together."""
    from sparseland.data.text import calibration_windows

    sources = [(t, float(w)) for t, w in sources if float(w) > 0]
    if not sources:
        raise SparselandError("calibration mixture has no source with a positive share")
    total = sum(w for _, w in sources)
    exact = [n_samples * w / total for _, w in sources]
    counts = [int(e) for e in exact]  # largest remainders get the windows left over
    for k in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[: n_samples - sum(counts)]:
        counts[k] += 1
    parts = [
        calibration_windows(t, c, seq_len, seed + k)
        for k, ((t, _), c) in enumerate(zip(sources, counts, strict=True))
        if c > 0
    ]
    windows = torch.cat(parts)
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows[perm]

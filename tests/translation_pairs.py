"""A tiny learnable translation task: English words to their Spanish ones, 1 to 3 per pair."""

from __future__ import annotations

import json
import random
from pathlib import Path

from clusterlm.cli import main as cli

WORDS = {"house": "casa", "dog": "perro", "cat": "gato", "sun": "sol", "moon": "luna",
         "water": "agua", "fire": "fuego", "earth": "tierra"}  # fmt: skip
MBART = {"model.flavour": "mbart"}


def prepare_pairs(root: Path, count: int = 400, separate_vocab: bool = False) -> Path:
    """``count`` pairs as JSONL, prepared with char tokenizers into ``root / "task"`` (one for
    both sides, or one per side)."""
    rng = random.Random(0)
    lines = []
    for _ in range(count):
        english = rng.sample(sorted(WORDS), rng.randint(1, 3))
        pair = {"src": " ".join(english), "tgt": " ".join(WORDS[w] for w in english)}
        lines.append(json.dumps(pair) + "\n")
    (root / "pairs.jsonl").write_text("".join(lines))
    task = root / "task"
    vocab = ["--separate-vocab"] if separate_vocab else []
    argv = ["prepare", "--task", f"translation-jsonl:{root / 'pairs.jsonl'}", "--out", str(task)]
    assert cli([*argv, *vocab]) == 0
    return task


# A run of a few seconds on them: one block a side, fp32, nothing written but its checkpoint.
TINY_TRANSLATION = {
    **MBART, "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 24,
    "training.micro_batch_size": 8, "training.steps": 16, "training.eval_interval": 0,
    "training.eval_batches": 1, "optim.lr": 3e-3, "optim.warmup_steps": 3,
    "checkpoint.interval": 0, "metrics.progress": "none", "metrics.tensorboard": False,
    "metrics.plot": False, "training.precision": "fp32",
}  # fmt: skip

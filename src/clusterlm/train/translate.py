"""Translating text with a trained encoder–decoder (`clusterlm translate`).

A checkpoint of a translation run carries what translating needs besides the weights: the target
tokenizer (``tokenizer.json``, in every checkpoint), the source's when the vocabularies are
separate (``source_tokenizer.json``, its sha256 recorded in the trainer state), the end-of-text id
and where the target's ids start (``target_offset``). A line is encoded with the source tokenizer,
cut to the run's sequence length as in training, and decoded exactly as `clusterlm eval` decodes a
split: rows padded to the sequence length, greedy or beam search, the same text from the ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clusterlm.checkpoint.resume import Verified
from clusterlm.data.special_tokens import PAD
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import SOURCE_TOKENIZER_NAME, TranslationManifest
from clusterlm.errors import UserError
from clusterlm.models.seq2seq import SEQ2SEQ_FLAVOUR
from clusterlm.parallel import ParallelModel
from clusterlm.train.decoding import Search

TRANSLATION_STATE = "translation"  # the trainer state's entry a translation run adds


def translation_state(manifest: TranslationManifest) -> dict[str, Any]:
    """What a translation run's checkpoints record for `clusterlm translate`."""
    source = manifest.source_tokenizer
    return {
        "eot_id": manifest.eot_id,
        "target_offset": manifest.target_offset,
        "source_tokenizer_sha256": None if source is None else source.sha256,
    }


@dataclass(frozen=True)
class Translator:
    source: Tokenizer
    target: Tokenizer
    eot_id: int
    target_offset: int


def check_translation_run(found: Verified) -> None:
    """Refuse, before loading any weight, a checkpoint that is not an encoder–decoder."""
    saved = found.state["config"]
    task = saved.get("finetune", {}).get("task")
    flavour = saved.get("model", {}).get("flavour")
    if task:
        raise UserError(
            f"{found.path} is a classifier fine-tuned on {task}, which does not translate; "
            f"translate with a run of model.flavour = {SEQ2SEQ_FLAVOUR} trained on translation"
        )
    if flavour == SEQ2SEQ_FLAVOUR and TRANSLATION_STATE not in found.state:
        raise UserError(
            f"{found.path} was saved before checkpoints carried the tokenizers and ids translate "
            "needs; resume the run (checkpoint.resume = auto) to save a checkpoint that has them"
        )
    if flavour != SEQ2SEQ_FLAVOUR and TRANSLATION_STATE in found.state:
        raise UserError(
            f"{found.path} is a decoder-only {flavour} model trained on a translation task; "
            f"translate takes runs of model.flavour = {SEQ2SEQ_FLAVOUR}: score this one with "
            "`clusterlm eval --split test`"
        )
    if flavour != SEQ2SEQ_FLAVOUR:
        raise UserError(
            f"{found.path} is a {flavour} model, not an encoder-decoder trained on a translation "
            f"task; translate with a run of model.flavour = {SEQ2SEQ_FLAVOUR} "
            "(sample from a decoder with `clusterlm generate`)"
        )


def load_translator(found: Verified) -> Translator:
    """The tokenizers and ids a translation checkpoint carries (``check_translation_run`` first)."""
    state = found.state[TRANSLATION_STATE]
    target = Tokenizer.load(Path(found.path) / "tokenizer.json")
    source = target
    if state["source_tokenizer_sha256"] is not None:
        payload = (Path(found.path) / SOURCE_TOKENIZER_NAME).read_bytes()
        if hashlib.sha256(payload).hexdigest() != state["source_tokenizer_sha256"]:
            raise UserError(
                f"{SOURCE_TOKENIZER_NAME} in {found.path} is not the source tokenizer the run "
                "trained with; use another checkpoint of the run"
            )
        source = Tokenizer(payload.decode("utf-8"))
    return Translator(source, target, state["eot_id"], state["target_offset"])


def target_text(tokenizer: Tokenizer, row: torch.Tensor, eot_id: int, target_offset: int) -> str:
    """The target text of ``row``'s ids (a source-side id a translation may hold has none)."""
    ids = row[(row >= target_offset) & (row != eot_id)] - target_offset
    return tokenizer.decode(ids.tolist())


@dataclass(frozen=True)
class Translations:
    texts: list[str]
    cut: int  # lines longer than the sequence length, cut to it


def translate_lines(
    model: ParallelModel,
    translator: Translator,
    lines: list[str],
    search: Search,
    seq_len: int,
    max_length: int,
    batch_size: int,
) -> Translations:
    """Each line's translation, ``batch_size`` lines at a time, at most ``max_length`` tokens.
    A line that encodes to no token translates to an empty line."""
    encoded = translator.source.encode_batch(lines)
    texts = [""] * len(lines)
    todo = [i for i, ids in enumerate(encoded) if ids]
    device = next(model.parts[0].parameters()).device
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        rows = torch.full((len(chunk), seq_len), PAD, dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = encoded[index][:seq_len]
            rows[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        with model.precision.autocast():
            out = search.decode(
                model.parts[0], rows.to(device), translator.eot_id, max_length, lambda done: done
            )
        for row, index in enumerate(chunk):
            texts[index] = target_text(
                translator.target, out[row].cpu(), translator.eot_id, translator.target_offset
            )
    return Translations(texts, sum(len(ids) > seq_len for ids in encoded))

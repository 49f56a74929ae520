"""Preparing a translation task (`clusterlm prepare --task translation:...`): sentence pairs in,
a checksummed translation directory out (``clusterlm.data.translation``).

The pairs come from ``clusterlm.data.pair_sources``: the English–Spanish Bible split by book,
misaligned chapters dropped and listed, or a user's JSONL or two text files. The tokenizer (char,
bpe, or a given tokenizer.json) is one vocabulary for both sides, or one per side
(``--separate-vocab``), fitted on the training split only; with char tokenizers a held-out pair
holding a character the training split lacks is left out (and counted among the dropped).

As with every prepare, the checks run before the output directory is touched, files are staged
and renamed into place with the manifest last, and an identical re-run does nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
from fsspec import AbstractFileSystem

from clusterlm.data.manifest import (
    MANIFEST_NAME,
    TOKENIZER_NAME,
    TokenizerInfo,
)
from clusterlm.data.manifest import token_dtype as smallest_token_dtype
from clusterlm.data.pair_sources import Pair, Pairs, read_pairs
from clusterlm.data.prepare import (
    DEFAULT_BPE_VOCAB,
    discard,
    entry_names,
    fit_tokenizer,
    up_to_date,
)
from clusterlm.data.storage import StagedDir
from clusterlm.data.store_errors import output_location
from clusterlm.data.task import TASK_SPLITS
from clusterlm.data.task_prepare import (
    BIBLE_TASK,
    TRANSLATION_JSONL_PREFIX,
    TRANSLATION_TEXT_PREFIX,
    TaskOptions,
    existing_manifest,
    files_intact,
)
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import (
    SOURCE_TOKENIZER_NAME,
    TRANSLATION_FILE,
    TRANSLATION_FORMAT_VERSION,
    TRANSLATION_KIND,
    TranslationManifest,
    write_pairs,
)
from clusterlm.errors import UserError
from clusterlm.files import disk_errors


def is_translation_task(task: str) -> bool:
    return task == BIBLE_TASK or task.startswith(
        (TRANSLATION_JSONL_PREFIX, TRANSLATION_TEXT_PREFIX)
    )


def prepare_translation(opts: TaskOptions) -> TranslationManifest:
    """Prepare ``opts.task`` in ``opts.out`` (or find it up to date) and return its manifest."""
    given = None if opts.tokenizer in ("char", "bpe") else Tokenizer.load(opts.tokenizer)
    found = read_pairs(opts)
    fingerprint = _fingerprint(opts, found, given)
    fs, root = output_location(opts.out)
    existing = existing_manifest(fs, root, TranslationManifest)
    if up_to_date(fs, root, opts.out, existing, fingerprint, files_intact, opts.force):
        assert existing is not None  # its fingerprint matched
        return existing
    source, target = _tokenizers(opts, found, given)
    offset = source.vocab_size if opts.separate_vocab else 0
    if target.eot_id is None:
        raise UserError(
            f"tokenizer {opts.tokenizer} has no <|endoftext|> token to end a translation; "
            "use char, bpe or a tokenizer.json built by `clusterlm prepare`"
        )
    eot = offset + target.eot_id
    pairs, dropped = _encodable(found, source, target, opts.tokenizer == "char" and not given)
    dtype = smallest_token_dtype(offset + target.vocab_size)
    encoded = {
        split: _encode([p for p in pairs if p.split == split], source, target, offset, eot, dtype)
        for split in TASK_SPLITS
    }
    for split, (src, _) in encoded.items():
        if not src:
            raise UserError(
                f"the {split} split of {opts.task} is empty; give it pairs "
                '(a "split" field, or lower/raise --val-fraction and --test-fraction)'
            )
    kind = "file" if given else opts.tokenizer
    fields = dict(
        format_version=TRANSLATION_FORMAT_VERSION,
        fingerprint=fingerprint,
        kind=TRANSLATION_KIND,
        source=opts.task,
        sources=found.sources,
        dtype=dtype.name,
        vocab_size=offset + target.vocab_size,
        eot_id=eot,
        tokenizer=TokenizerInfo(kind, TOKENIZER_NAME, target.sha256),
        source_tokenizer=(
            TokenizerInfo(kind, SOURCE_TOKENIZER_NAME, source.sha256) if offset else None
        ),
        target_offset=offset,
        split_rule=found.split_rule,
        dropped=dropped,
    )
    manifest = _write(fs, root, source, target, encoded, fields)
    _report(opts.out, manifest)
    return manifest


def _tokenizers(
    opts: TaskOptions, found: Pairs, given: Tokenizer | None
) -> tuple[Tokenizer, Tokenizer]:
    """The source's and the target's tokenizer (one and the same unless ``separate_vocab``),
    fitted on the training pairs."""
    train = [p for p in found.pairs if p.split == "train"]
    if not opts.separate_vocab:
        shared = given or fit_tokenizer(
            opts.tokenizer, DEFAULT_BPE_VOCAB, [t for p in train for t in (p.src, p.tgt)]
        )
        return shared, shared
    if given is not None:
        raise UserError(
            "--separate-vocab fits a char or bpe tokenizer to each side; "
            "pass --tokenizer char or bpe, or drop --separate-vocab to use that file"
        )
    return (
        fit_tokenizer(opts.tokenizer, DEFAULT_BPE_VOCAB, [p.src for p in train]),
        fit_tokenizer(opts.tokenizer, DEFAULT_BPE_VOCAB, [p.tgt for p in train]),
    )


def _report(out: str, manifest: TranslationManifest) -> None:
    counts = ", ".join(f"{s.pairs:,} {name}" for name, s in manifest.splits.items())
    print(f"prepared {out}: {counts} pairs, vocabulary {manifest.vocab_size}")
    if manifest.dropped:
        print(f"left out {len(manifest.dropped)}:")
    for what, why in manifest.dropped.items():
        print(f"  {what}: {why}")


def _encodable(
    found: Pairs, source: Tokenizer, target: Tokenizer, char: bool
) -> tuple[list[Pair], dict[str, str]]:
    """The pairs char tokenizers fitted on the training split can encode, and what was left out."""
    dropped = dict(found.dropped)
    if not char:
        return found.pairs, dropped

    def known(tokenizer: Tokenizer, texts: list[str]) -> set[str]:
        return {ch for ch in set("".join(texts)) if tokenizer.token_id(ch) is not None}

    known_src = known(source, [p.src for p in found.pairs])
    known_tgt = known(target, [p.tgt for p in found.pairs])
    kept: list[Pair] = []
    unseen: dict[str, set[str]] = {}
    for pair in found.pairs:
        missing = (set(pair.src) - known_src) | (set(pair.tgt) - known_tgt)
        if missing:
            unseen.setdefault(pair.split, set()).update(missing)
        else:
            kept.append(pair)
    for split, chars in unseen.items():
        lost = sum(p.split == split for p in found.pairs) - sum(p.split == split for p in kept)
        why = f"characters unseen in training: {''.join(sorted(chars))!r}"
        dropped[f"{lost} {split} pairs"] = why
    return kept, dropped


def _encode(
    pairs: list[Pair],
    source: Tokenizer,
    target: Tokenizer,
    offset: int,
    eot: int,
    dtype: np.dtype,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The pairs' source ids, and their target ids (shifted by ``offset``) ended by ``eot``."""
    src = source.encode_batch([p.src for p in pairs])
    tgt = target.encode_batch([p.tgt for p in pairs])
    return (
        [np.asarray(ids, dtype=dtype) for ids in src],
        [np.asarray([*(i + offset for i in ids), eot], dtype=dtype) for ids in tgt],
    )


def _fingerprint(opts: TaskOptions, found: Pairs, given: Tokenizer | None) -> str:
    tokenizer = {"kind": "file", "sha256": given.sha256} if given else {"kind": opts.tokenizer}
    payload = {
        "format_version": TRANSLATION_FORMAT_VERSION,
        "kind": TRANSLATION_KIND,
        "task": opts.task,
        "sources": [asdict(i) for i in found.sources],
        "tokenizer": tokenizer,
        "bpe_vocab_size": DEFAULT_BPE_VOCAB,
        "split_rule": found.split_rule,
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "test_fraction": opts.test_fraction,
        "separate_vocab": opts.separate_vocab,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _write(
    fs: AbstractFileSystem,
    root: str,
    source: Tokenizer,
    target: Tokenizer,
    encoded: dict[str, tuple[list[np.ndarray], list[np.ndarray]]],
    fields: dict,
) -> TranslationManifest:
    """Stage every file, then publish them with the manifest last."""
    dtype = np.dtype(fields["dtype"])
    with disk_errors(root, "--out"):
        created = not fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        staged = StagedDir(fs, root)
        try:
            splits = {
                split: write_pairs(staged, split, src, tgt, dtype)
                for split, (src, tgt) in encoded.items()
            }
            manifest = TranslationManifest(**fields, splits=splits)
            with staged.open(TOKENIZER_NAME) as f:
                f.write(target.to_json().encode("utf-8"))
            if manifest.source_tokenizer is not None:
                with staged.open(SOURCE_TOKENIZER_NAME) as f:
                    f.write(source.to_json().encode("utf-8"))
            with staged.open(MANIFEST_NAME) as f:
                f.write(manifest.to_json().encode("utf-8"))
            staged.commit(
                last=MANIFEST_NAME,
                remove=[
                    n
                    for n in entry_names(fs, root)
                    if TRANSLATION_FILE.match(n) or n == SOURCE_TOKENIZER_NAME
                ],
            )
        except BaseException:
            discard(fs, root, staged, created)
            raise
    return manifest

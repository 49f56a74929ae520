"""Preparing a translation task (`clusterlm prepare --task translation:...`): sentence pairs in,
a checksummed translation directory out (``clusterlm.data.translation``).

The pairs come from ``clusterlm.data.pair_sources``: the English–Spanish Bible split by book,
misaligned chapters dropped and listed, or a user's JSONL or two text files. The tokenizer (char, bpe, or a given tokenizer.json) is one
vocabulary for both sides, fitted on the training split only; with a char tokenizer a held-out
pair holding a character the training split lacks is left out (and counted among the dropped).

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
    build_typed,
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
from clusterlm.data.storage import StagedDir, is_local, join, url_to_fs
from clusterlm.data.task import TASK_SPLITS
from clusterlm.data.task_prepare import (
    BIBLE_TASK,
    TRANSLATION_JSONL_PREFIX,
    TRANSLATION_TEXT_PREFIX,
    TaskOptions,
)
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.data.translation import (
    TRANSLATION_FILE,
    TRANSLATION_FORMAT_VERSION,
    TRANSLATION_KIND,
    TranslationManifest,
    write_pairs,
)
from clusterlm.errors import UserError
from clusterlm.files import check_output_path, disk_errors


def is_translation_task(task: str) -> bool:
    return task == BIBLE_TASK or task.startswith(
        (TRANSLATION_JSONL_PREFIX, TRANSLATION_TEXT_PREFIX)
    )


def prepare_translation(opts: TaskOptions) -> TranslationManifest:
    """Prepare ``opts.task`` in ``opts.out`` (or find it up to date) and return its manifest."""
    given = None if opts.tokenizer in ("char", "bpe") else Tokenizer.load(opts.tokenizer)
    found = read_pairs(opts)
    fingerprint = _fingerprint(opts, found, given)
    fs, root = url_to_fs(opts.out)
    if is_local(fs):
        check_output_path(root, "--out")
    existing = _existing(fs, root)
    if up_to_date(fs, root, opts.out, existing, fingerprint, _intact, opts.force):
        assert existing is not None  # its fingerprint matched
        return existing
    train = [p for p in found.pairs if p.split == "train"]
    tokenizer = given or fit_tokenizer(
        opts.tokenizer, DEFAULT_BPE_VOCAB, [t for p in train for t in (p.src, p.tgt)]
    )
    eot = tokenizer.eot_id
    if eot is None:
        raise UserError(
            f"tokenizer {opts.tokenizer} has no <|endoftext|> token to end a translation; "
            "use char, bpe or a tokenizer.json built by `clusterlm prepare`"
        )
    pairs, dropped = _encodable(found, tokenizer, opts.tokenizer == "char" and given is None)
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    encoded = {split: _encode(pairs, split, tokenizer, eot, dtype) for split in TASK_SPLITS}
    for split, (src, _) in encoded.items():
        if not src:
            raise UserError(
                f"the {split} split of {opts.task} is empty; give it pairs "
                '(a "split" field, or lower/raise --val-fraction and --test-fraction)'
            )
    fields = dict(
        format_version=TRANSLATION_FORMAT_VERSION,
        fingerprint=fingerprint,
        kind=TRANSLATION_KIND,
        source=opts.task,
        sources=found.sources,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        eot_id=eot,
        tokenizer=TokenizerInfo(
            "file" if given else opts.tokenizer, TOKENIZER_NAME, tokenizer.sha256
        ),
        split_rule=found.split_rule,
        dropped=dropped,
    )
    manifest = _write(fs, root, tokenizer, encoded, fields)
    _report(opts.out, manifest)
    return manifest


def _report(out: str, manifest: TranslationManifest) -> None:
    counts = ", ".join(f"{s.pairs:,} {name}" for name, s in manifest.splits.items())
    print(f"prepared {out}: {counts} pairs, vocabulary {manifest.vocab_size}")
    if manifest.dropped:
        print(f"left out {len(manifest.dropped)}:")
    for what, why in manifest.dropped.items():
        print(f"  {what}: {why}")


def _encodable(found: Pairs, tokenizer: Tokenizer, char: bool) -> tuple[list[Pair], dict[str, str]]:
    """The pairs a char tokenizer fitted on the training split can encode, and what was left out."""
    dropped = dict(found.dropped)
    if not char:
        return found.pairs, dropped
    seen = {ch for pair in found.pairs for ch in pair.src + pair.tgt}
    known = {ch for ch in seen if tokenizer.token_id(ch) is not None}
    kept: list[Pair] = []
    unseen: dict[str, set[str]] = {}
    for pair in found.pairs:
        missing = set(pair.src + pair.tgt) - known
        if missing:
            unseen.setdefault(pair.split, set()).update(missing)
        else:
            kept.append(pair)
    for split, chars in unseen.items():
        lost = sum(1 for p in found.pairs if p.split == split) - sum(
            1 for p in kept if p.split == split
        )
        dropped[f"{lost} {split} pairs"] = (
            f"characters unseen in training: {''.join(sorted(chars))!r}"
        )
    return kept, dropped


def _encode(
    pairs: list[Pair], split: str, tokenizer: Tokenizer, eot: int, dtype: np.dtype
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The split's source ids, and its target ids ended by the end-of-text token."""
    chosen = [p for p in pairs if p.split == split]
    src = tokenizer.encode_batch([p.src for p in chosen])
    tgt = tokenizer.encode_batch([p.tgt for p in chosen])
    return (
        [np.asarray(ids, dtype=dtype) for ids in src],
        [np.asarray([*ids, eot], dtype=dtype) for ids in tgt],
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
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _existing(fs: AbstractFileSystem, root: str) -> TranslationManifest | None:
    if fs.isfile(root):
        raise UserError(f"output {root} is a file; choose a directory for --out")
    try:
        raw = json.loads(fs.cat_file(join(root, MANIFEST_NAME)).decode("utf-8"))
        return build_typed(TranslationManifest, raw, "manifest")
    except (OSError, ValueError, RecursionError):
        return None


def _intact(fs: AbstractFileSystem, root: str, manifest: TranslationManifest) -> bool:
    return all(
        fs.isfile(join(root, f.file)) and (f.bytes < 0 or fs.size(join(root, f.file)) == f.bytes)
        for f in manifest.files
    )


def _write(
    fs: AbstractFileSystem,
    root: str,
    tokenizer: Tokenizer,
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
                f.write(tokenizer.to_json().encode("utf-8"))
            with staged.open(MANIFEST_NAME) as f:
                f.write(manifest.to_json().encode("utf-8"))
            staged.commit(
                last=MANIFEST_NAME,
                remove=[n for n in entry_names(fs, root) if TRANSLATION_FILE.match(n)],
            )
        except BaseException:
            discard(fs, root, staged, created)
            raise
    return manifest

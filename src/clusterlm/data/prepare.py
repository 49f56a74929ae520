"""Preparing a dataset (`clusterlm prepare`): text in, checksummed token shards and a manifest out.

Steps: resolve the inputs; read each one (in ``--nproc`` processes), checking it is UTF-8, that no
line is over ``--max-line-bytes`` and that there is text at all; fingerprint inputs and options
(equal to the existing manifest's: nothing to do); when cleaning, keep the documents that pass the
filters and deduplication (``clusterlm.data.curation``); fit the tokenizer; tokenize in a process
pool (``clusterlm.data.encode``); split; write shards under temporary names; rename them into place,
the manifest last. Bad input fails before the output directory is touched. Inputs are streamed
(``clusterlm.data.documents``) and a long document's ids wait for their split on a temporary file,
so memory stays bounded by the shard size and the tokenizer whatever the input (a document with no
line break between two non-space characters is tokenized in one piece). A disk that is full or read-
only fails with one line, the temporary files removed and the previous data intact.

Split rule ("seeded-span"): a document of n tokens gives its v = round(val_fraction * n)
consecutive tokens starting at an offset drawn from ``numpy.random.default_rng([seed, d])`` (d is
the document's position among those kept) to val, and the rest to train. Every contiguous piece of
a document is followed by the end-of-text token in its split. The same inputs and options always
give byte-identical output, whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem
from tqdm import tqdm

from clusterlm.data.corpus import embedded_corpus
from clusterlm.data.curation import REPORT_NAME, curate, report_json, scan_sources, summary
from clusterlm.data.documents import Document
from clusterlm.data.encode import encode_documents, pieces
from clusterlm.data.encode import split_text as split_text  # re-exported: part of this module's API
from clusterlm.data.lines import DEFAULT_MAX_LINE_BYTES
from clusterlm.data.manifest import (
    DATA_FILE_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    Manifest,
    SourceInfo,
    SplitInfo,
    TokenizerInfo,
    token_dtype,
)
from clusterlm.data.quality import CleaningOptions
from clusterlm.data.shards import DocumentIds, ShardWriter
from clusterlm.data.storage import StagedDir, join, resolve_sources
from clusterlm.data.store_errors import output_location, store_errors, store_failures
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.errors import UserError
from clusterlm.files import disk_errors

SPLIT_RULE = "seeded-span"
DEFAULT_BPE_VOCAB = 4096
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 ids
# Long documents are tokenized in pieces of about this many characters (clusterlm.data.encode), so
# one big file still spreads over the workers and the tokenizer's working memory stays small
# (encoding a piece costs a few hundred bytes a character); piecewise encoding equals whole
# encoding.
PIECE_CHARS = 1 << 16
# A document's ids beyond this many (or the shard size, if smaller) wait for its split on a file.
HELD_TOKENS = 1 << 24


@dataclass(frozen=True)
class PrepareOptions:
    inputs: tuple[str, ...]  # empty: the embedded corpus
    out: str
    tokenizer: str = (
        "char"  # "char", "bpe", the path of a tokenizer.json, or hf:DIR (its tokenizer.json)
    )
    vocab_size: int | None = None  # bpe only
    val_fraction: float = 0.1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    workers: int = 1
    seed: int = 0
    force: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer input line is refused
    cleaning: CleaningOptions = CleaningOptions()  # normalisation, filters, deduplication

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(
                f"--val-fraction {self.val_fraction} is out of range; use a value in [0, 1)"
            )
        for flag, value in (
            ("--shard-tokens", self.shard_tokens),
            ("--nproc/--workers", self.workers),
            ("--max-line-bytes", self.max_line_bytes),
        ):
            if value < 1:
                raise UserError(f"{flag} {value} must be positive; use 1 or more")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed} is negative; use 0 or more")
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise UserError("--vocab-size applies only to --tokenizer bpe; drop it or use bpe")

    @property
    def bpe_vocab_size(self) -> int:
        return self.vocab_size or DEFAULT_BPE_VOCAB


def prepare(opts: PrepareOptions) -> Manifest:
    """Prepare ``opts.out`` (or find it up to date) and return its manifest."""
    fs, root = output_location(opts.out)  # before the inputs are read: the store may refuse
    sources = resolve_sources(opts.inputs) if opts.inputs else embedded_corpus()
    given_tokenizer = None if opts.tokenizer in ("char", "bpe") else Tokenizer.load(opts.tokenizer)
    cleaning = opts.cleaning if opts.cleaning.active else None
    documents = scan_sources(sources, opts.max_line_bytes, cleaning, opts.workers)
    infos = tuple(d.info for d in documents)
    fingerprint = _fingerprint(opts, infos, given_tokenizer)

    existing = _existing_manifest(fs, root)
    if up_to_date(fs, root, opts.out, existing, fingerprint, _intact, opts.force):
        assert existing is not None  # its fingerprint matched
        return existing

    documents, report = curate(documents, cleaning) if cleaning else (documents, None)
    if report is not None:
        print(summary(report))
    tokenizer = given_tokenizer or fit_tokenizer(
        opts.tokenizer, opts.bpe_vocab_size, fitting_texts(opts.tokenizer, documents)
    )
    dtype = token_dtype(tokenizer.vocab_size)  # before anything is written: a misfit writes nothing
    with disk_errors(opts.out, "--out"), store_errors(f"writing {opts.out}", fs, opts.out):
        created = not fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        staged = StagedDir(fs, root)
        try:
            splits = _write_shards(staged, tokenizer, dtype, documents, opts)
            manifest = Manifest(
                format_version=FORMAT_VERSION,
                fingerprint=fingerprint,
                dtype=dtype.name,
                vocab_size=tokenizer.vocab_size,
                eot_id=tokenizer.eot_id,
                tokenizer=TokenizerInfo(
                    kind="file" if given_tokenizer else opts.tokenizer,
                    file=TOKENIZER_NAME,
                    sha256=tokenizer.sha256,
                ),
                sources=infos,
                split_rule=SPLIT_RULE,
                val_fraction=opts.val_fraction,
                seed=opts.seed,
                shard_tokens=opts.shard_tokens,
                splits=splits,
            )
            extra = {REPORT_NAME: report_json(report)} if report is not None else {}
            _publish(staged, {TOKENIZER_NAME: tokenizer.to_json(), **extra}, manifest)
        except BaseException:
            discard(fs, root, staged, created)
            raise
    shards = sum(len(s.shards) for s in splits.values())
    print(
        f"prepared {opts.out}: {splits['train'].tokens:,} train and "
        f"{splits['val'].tokens:,} val tokens in {shards} shards, "
        f"vocabulary {tokenizer.vocab_size} ({dtype.name})"
    )
    return manifest


def _publish(staged: StagedDir, files: dict[str, str], manifest: Manifest) -> None:
    """Write ``files`` and the manifest, then publish them with the staged shards, the manifest
    last; data files of an earlier dataset, and its cleaning report, go."""
    for name, text in {**files, MANIFEST_NAME: manifest.to_json()}.items():
        with staged.open(name) as f:
            f.write(text.encode("utf-8"))
    stale = [
        name
        for name in entry_names(staged.fs, staged.root)
        if DATA_FILE_NAME.match(name) or name == REPORT_NAME
    ]
    staged.commit(last=MANIFEST_NAME, remove=stale)


def discard(fs: AbstractFileSystem, root: str, staged: StagedDir, created: bool) -> None:
    """After a failed write: remove the temporary files, and ``root`` if this run made it."""
    # A read-only disk or a store that went away refuses even this; the first error is the one.
    with suppress(*store_failures()):
        staged.discard()
        if created and not fs.ls(root):
            fs.rmdir(root)


def fitting_texts(kind: str, documents: list[Document]) -> Iterable[str]:
    """What a tokenizer of ``kind`` is fitted on: the characters the scan collected (char), or the
    texts in the pieces they are tokenized in, across which BPE merges nothing."""
    if kind == "char":
        return (d.alphabet for d in documents)
    return (piece.text for piece in pieces((d.text() for d in documents), PIECE_CHARS))


def _fingerprint(
    opts: PrepareOptions, infos: tuple[SourceInfo, ...], given: Tokenizer | None
) -> str:
    """Hash of everything the output depends on (not --nproc, which changes nothing)."""
    if given is not None:
        tokenizer: dict[str, object] = {"kind": "file", "sha256": given.sha256}
    elif opts.tokenizer == "bpe":
        tokenizer = {"kind": "bpe", "vocab_size": opts.bpe_vocab_size}
    else:
        tokenizer = {"kind": "char"}
    payload = {
        "format_version": FORMAT_VERSION,
        "sources": [asdict(i) for i in infos],
        "tokenizer": tokenizer,
        "split_rule": SPLIT_RULE,
        "val_fraction": opts.val_fraction,
        "seed": opts.seed,
        "shard_tokens": opts.shard_tokens,
    }
    if opts.cleaning.active:  # absent otherwise: data prepared before cleaning existed stays valid
        payload["cleaning"] = asdict(opts.cleaning)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def fit_tokenizer(kind: str, bpe_vocab_size: int, texts: Iterable[str]) -> Tokenizer:
    """A new tokenizer of ``kind`` ("char" or "bpe") fitted on ``texts``."""
    if kind == "bpe":
        print(f"training a byte-level BPE tokenizer with {bpe_vocab_size} tokens")
        return Tokenizer.bpe(texts, bpe_vocab_size)
    return Tokenizer.char(texts)


# --- the output directory as it is before this run


def entry_names(fs: AbstractFileSystem, root: str) -> list[str]:
    return [path.rstrip("/").rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)]


def up_to_date(
    fs: AbstractFileSystem,
    root: str,
    out: str,
    existing: Any,
    fingerprint: str,
    intact: Callable[[AbstractFileSystem, str, Any], bool],
    force: bool,
) -> bool:
    """Whether ``out`` already holds this very output, intact (nothing to do). Refuses, unless
    ``force``, a directory that holds anything else; ``existing`` is its manifest, if any."""
    same = existing is not None and existing.fingerprint == fingerprint
    if same and intact(fs, root, existing):
        print(f"{out} is up to date; nothing to do")
        return True
    if not same and not force and holds_files(fs, root):
        what = "other prepared data" if existing else "other files"
        raise UserError(
            f"{out} already holds {what}; pass --force to replace it, or choose another --out"
        )
    return False


def holds_files(fs: AbstractFileSystem, root: str) -> bool:
    """Whether ``root`` holds anything but hidden files (such as a crashed run's temporaries)."""
    return fs.isdir(root) and any(not name.startswith(".") for name in entry_names(fs, root))


def _existing_manifest(fs: AbstractFileSystem, root: str) -> Manifest | None:
    """The manifest already in the output directory, or None if there is none or it is malformed."""
    if fs.isfile(root):
        raise UserError(f"output {root} is a file; choose a directory for --out")
    path = join(root, MANIFEST_NAME)
    if not fs.isfile(path):
        return None
    try:
        return Manifest.from_json(fs.cat_file(path).decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _intact(fs: AbstractFileSystem, root: str, manifest: Manifest) -> bool:
    """Every listed file is present with its recorded size (hashes are `verify_shards`' job)."""
    itemsize = np.dtype(manifest.dtype).itemsize
    sizes = {
        s.file: s.tokens * itemsize for split in manifest.splits.values() for s in split.shards
    }
    return fs.isfile(join(root, manifest.tokenizer.file)) and all(
        fs.isfile(join(root, name)) and fs.size(join(root, name)) == size
        for name, size in sizes.items()
    )


# --- tokenizing and writing


def _write_shards(
    staged: StagedDir,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    documents: list[Document],
    opts: PrepareOptions,
) -> dict[str, SplitInfo]:
    eot = np.array([] if tokenizer.eot_id is None else [tokenizer.eot_id], dtype=dtype)
    total_chars = sum(d.chars for d in documents)
    held_tokens = min(opts.shard_tokens, HELD_TOKENS)
    with (
        ExitStack() as stack,
        tqdm(total=total_chars, unit="char", unit_scale=True, desc="tokenizing") as bar,
    ):
        writers = {
            name: stack.enter_context(ShardWriter(staged, name, dtype, opts.shard_tokens))
            for name in ("train", "val")
        }
        held = DocumentIds(dtype, held_tokens)
        stack.callback(lambda: held.close())
        encoded = encode_documents(tokenizer, documents, dtype, opts.workers, PIECE_CHARS)
        for piece in encoded:
            bar.update(piece.chars)
            held.append(piece.ids)
            if not piece.last:
                continue
            for name, spans in zip(
                ("train", "val"), _split(held.count, piece.document, opts), strict=True
            ):
                for start, stop in spans:
                    for chunk in held.read(start, stop):
                        writers[name].write(chunk)
                    writers[name].write(eot)
            held.close()
            held = DocumentIds(dtype, held_tokens)
        splits = {name: writer.finish() for name, writer in writers.items()}
    if splits["train"].tokens == 0:
        raise UserError(
            f"no tokens are left for training with --val-fraction {opts.val_fraction}; "
            "lower it or add text"
        )
    return splits


Span = tuple[int, int]


def _split(n: int, document: int, opts: PrepareOptions) -> tuple[list[Span], list[Span]]:
    """(train, val) spans of a document of n tokens by the seeded-span rule (module docstring)."""
    held_out = round(opts.val_fraction * n)
    if held_out == 0:
        return [(0, n)], []
    start = int(np.random.default_rng([opts.seed, document]).integers(0, n - held_out + 1))
    train = [(a, b) for a, b in ((0, start), (start + held_out, n)) if b > a]
    return train, [(start, start + held_out)]

"""Preparing a labelled task (`clusterlm prepare --task`): examples in, a checksummed task
directory out.

``play-classification``: passages of the embedded plays, each labelled with its play, split by scene
(``clusterlm.data.plays``). The default char tokenizer is fitted on the whole embedded corpus
exactly as `clusterlm prepare` fits it, so its tokenizer.json is the same file and a model
pretrained on that corpus reads this task. ``jsonl:PATH``: a user's examples
(``clusterlm.data.jsonl_task``), split by their "split" fields or else by label like the scenes;
char and bpe tokenizers are fitted on the examples' texts.

As with `prepare`, every check runs before the output directory is touched, files are staged and
renamed into place with the manifest last, and an identical re-run (same fingerprint) does nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
from fsspec import AbstractFileSystem

from clusterlm.data.corpus import embedded_corpus
from clusterlm.data.curation import scan_sources
from clusterlm.data.jsonl_task import Record, read_jsonl
from clusterlm.data.lines import DEFAULT_MAX_LINE_BYTES, Reading, bounded_lines, open_source
from clusterlm.data.manifest import (
    DATA_FILE_NAME,
    MANIFEST_NAME,
    TASK_KIND,
    TOKENIZER_NAME,
    SourceInfo,
    TokenizerInfo,
    build_typed,
)
from clusterlm.data.manifest import token_dtype as smallest_token_dtype
from clusterlm.data.plays import plays, scene_passages
from clusterlm.data.prepare import (
    DEFAULT_BPE_VOCAB,
    discard,
    entry_names,
    fit_tokenizer,
    up_to_date,
)
from clusterlm.data.storage import SourceFile, StagedDir, join, resolve_sources
from clusterlm.data.store_errors import output_location
from clusterlm.data.task import (
    TASK_FORMAT_VERSION,
    TASK_SPLITS,
    TaskManifest,
    group_splits,
    write_split,
)
from clusterlm.data.tokenizer import Tokenizer
from clusterlm.errors import UserError
from clusterlm.files import disk_errors

M = TypeVar("M")

PLAY_TASK = "play-classification"
JSONL_PREFIX = "jsonl:"
BIBLE_TASK = "translation:bible-en-es"  # clusterlm.data.translation_prepare
TRANSLATION_JSONL_PREFIX = "translation-jsonl:"
TRANSLATION_TEXT_PREFIX = "translation-text:"  # SRC,TGT: one sentence per line on each side
SPLIT_RULE = "seeded-group"  # clusterlm.data.task.group_splits; JSONL "split" fields: "given"

Examples = dict[str, list[tuple[np.ndarray, str | int]]]  # split -> (token ids, label) in order


@dataclass(frozen=True)
class TaskOptions:
    task: str  # "play-classification" or "jsonl:PATH"
    out: str
    tokenizer: str = "char"  # "char", "bpe", the path of a tokenizer.json, or hf:DIR
    seed: int = 0
    passage_tokens: int = 64  # play-classification only
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    force: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer line of the JSONL file is refused
    separate_vocab: bool = False  # translation tasks: a tokenizer per side

    def __post_init__(self) -> None:
        prefixed = any(
            self.task.startswith(prefix) and len(self.task) > len(prefix)
            for prefix in (JSONL_PREFIX, TRANSLATION_JSONL_PREFIX, TRANSLATION_TEXT_PREFIX)
        )
        if self.task not in (PLAY_TASK, BIBLE_TASK) and not prefixed:
            raise UserError(
                f"unknown --task {self.task!r}; use {PLAY_TASK}, {JSONL_PREFIX}PATH (a JSONL "
                f"file), {BIBLE_TASK}, {TRANSLATION_JSONL_PREFIX}PATH or "
                f"{TRANSLATION_TEXT_PREFIX}SRC,TGT"
            )
        for flag, value in (
            ("--val-fraction", self.val_fraction),
            ("--test-fraction", self.test_fraction),
        ):
            if not 0 <= value < 1:
                raise UserError(f"{flag} {value} is out of range; use a value in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise UserError(
                "--val-fraction plus --test-fraction leave nothing to train on; "
                "make their sum below 1"
            )
        if self.passage_tokens < 1 or self.seed < 0:
            raise UserError(
                "--passage-tokens must be positive and --seed not negative; use e.g. 64 and 0"
            )
        if self.max_line_bytes < 1:
            raise UserError(
                f"--max-line-bytes {self.max_line_bytes} must be positive; use 1 or more"
            )


def prepare_task(opts: TaskOptions) -> TaskManifest:
    """Prepare ``opts.task`` in ``opts.out`` (or find it up to date) and return its manifest."""
    given = None if opts.tokenizer in ("char", "bpe") else Tokenizer.load(opts.tokenizer)
    if opts.task == PLAY_TASK:
        sources = embedded_corpus()
        documents = scan_sources(sources, opts.max_line_bytes)
        infos = tuple(d.info for d in documents)
        texts = ["".join(d.text()) for d in documents]
        records: list[Record] = []
    else:
        sources = _jsonl_source(opts.task.removeprefix(JSONL_PREFIX))
        infos, records = _read_jsonl_source(sources[0], opts.max_line_bytes)
        texts = [r.text for r in records]
    fingerprint = _fingerprint(opts, infos, given)
    fs, root = output_location(opts.out)
    existing = existing_manifest(fs, root, TaskManifest)
    if up_to_date(fs, root, opts.out, existing, fingerprint, files_intact, opts.force):
        assert existing is not None  # its fingerprint matched
        return existing

    tokenizer = given or fit_tokenizer(opts.tokenizer, DEFAULT_BPE_VOCAB, texts)
    dtype = smallest_token_dtype(tokenizer.vocab_size)
    if records:
        examples, rule = _jsonl_examples(records, sources[0].name, tokenizer, dtype, opts)
    else:
        examples, rule = _play_examples(sources, texts, tokenizer, dtype, opts), SPLIT_RULE
    labels = _check_splits(examples, opts.task)
    manifest = _write(
        fs,
        root,
        tokenizer,
        examples,
        labels,
        dict(
            format_version=TASK_FORMAT_VERSION,
            fingerprint=fingerprint,
            kind=TASK_KIND,
            source=opts.task,
            sources=infos,
            dtype=dtype.name,
            vocab_size=tokenizer.vocab_size,
            eot_id=tokenizer.eot_id,
            tokenizer=TokenizerInfo(
                "file" if given else opts.tokenizer, TOKENIZER_NAME, tokenizer.sha256
            ),
            labels=labels,
            split_rule=rule,
            seed=opts.seed,
            val_fraction=opts.val_fraction,
            test_fraction=opts.test_fraction,
            passage_tokens=opts.passage_tokens if opts.task == PLAY_TASK else None,
        ),
    )
    counts = ", ".join(f"{s.examples:,} {name}" for name, s in manifest.splits.items())
    vocab = tokenizer.vocab_size
    print(f"prepared {opts.out}: {len(labels)} labels, {counts} examples, vocabulary {vocab}")
    return manifest


def _jsonl_source(path: str) -> list[SourceFile]:
    sources = resolve_sources([path])
    if len(sources) != 1:
        raise UserError(
            f"--task {JSONL_PREFIX}{path} names {len(sources)} files; name one JSONL file"
        )
    return sources


def _read_jsonl_source(
    source: SourceFile, max_line_bytes: int
) -> tuple[tuple[SourceInfo, ...], list[Record]]:
    """The records of a JSONL file read line by line, and its size and hash."""
    with open_source(source) as stream:
        reading = Reading(stream)
        records = read_jsonl(source.name, bounded_lines(reading, source.name, max_line_bytes))
    return (SourceInfo(source.name, reading.size, reading.hexdigest()),), records


def _fingerprint(opts: TaskOptions, infos: tuple[SourceInfo, ...], given: Tokenizer | None) -> str:
    """Hash of everything the output depends on."""
    tokenizer = {"kind": "file", "sha256": given.sha256} if given else {"kind": opts.tokenizer}
    payload = {
        "format_version": TASK_FORMAT_VERSION,
        "kind": TASK_KIND,
        "task": opts.task,
        "sources": [asdict(i) for i in infos],
        "tokenizer": tokenizer,
        "bpe_vocab_size": DEFAULT_BPE_VOCAB,
        "split_rule": SPLIT_RULE,
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "test_fraction": opts.test_fraction,
        "passage_tokens": opts.passage_tokens if opts.task == PLAY_TASK else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _play_examples(
    sources, texts: list[str], tokenizer: Tokenizer, dtype: np.dtype, opts: TaskOptions
) -> Examples:
    """Every play's passages, labelled with the play, its scenes split by ``group_splits``."""
    examples: Examples = {name: [] for name in TASK_SPLITS}
    found = sorted(plays(sources, texts), key=lambda p: p.name)
    for group, play in enumerate(found):
        splits = group_splits(
            len(play.scenes), group, opts.seed, opts.val_fraction, opts.test_fraction
        )
        if splits is None:
            raise UserError(
                f"play {play.name} has only {len(play.scenes)} scenes; "
                "lower --val-fraction and --test-fraction"
            )
        for split, passages in zip(
            splits, scene_passages(play, tokenizer, opts.passage_tokens, dtype), strict=True
        ):
            examples[split] += [(ids, play.name) for ids in passages]
    return examples


def _jsonl_examples(
    records: list[Record], name: str, tokenizer: Tokenizer, dtype: np.dtype, opts: TaskOptions
) -> tuple[Examples, str]:
    """The records' token ids in their given splits, else split by label with ``group_splits``."""
    ids = [np.asarray(e, dtype=dtype) for e in tokenizer.encode_batch([r.text for r in records])]
    given = [r.split for r in records if r.split is not None]
    if given:  # on every line or on none (``read_jsonl``)
        splits, rule = given, "given"
    else:
        labels = sorted({r.label for r in records})
        by_label = {
            label: [i for i, r in enumerate(records) if r.label == label] for label in labels
        }
        splits, rule = [""] * len(records), SPLIT_RULE
        for group, (label, members) in enumerate(by_label.items()):
            chosen = group_splits(
                len(members), group, opts.seed, opts.val_fraction, opts.test_fraction
            )
            if chosen is None:
                raise UserError(
                    f"label {label!r} has only {len(members)} examples in {name}; "
                    "give every label at least 3 "
                    '(one per split), or give every line a "split"'
                )
            for i, split in zip(members, chosen, strict=True):
                splits[i] = split
    examples: Examples = {split: [] for split in TASK_SPLITS}
    for record, split, example in zip(records, splits, ids, strict=True):
        examples[split].append((example, record.label))
    return examples, rule


def _check_splits(examples: Examples, task: str) -> tuple[str | int, ...]:
    """The sorted labels, after checking every split has examples of every label."""
    for split, items in examples.items():
        if not items:
            raise UserError(
                f"the {split} split of {task} is empty; give it examples of every label"
            )
    seen = {split: {label for _, label in items} for split, items in examples.items()}
    labels = tuple(sorted(set().union(*seen.values())))
    missing = [
        f"the {split} split lacks {', '.join(map(repr, sorted(set(labels) - s)))}"
        for split, s in seen.items()
        if s != set(labels)
    ]
    if missing:
        raise UserError(
            f"the label set differs between the splits of {task} ({'; '.join(missing)}); "
            "give every split examples of every label"
        )
    return labels


def existing_manifest(fs: AbstractFileSystem, root: str, kind: type[M]) -> M | None:
    """The manifest of kind ``kind`` in the output directory ``root``, if one is readable."""
    if fs.isfile(root):
        raise UserError(f"output {root} is a file; choose a directory for --out")
    path = join(root, MANIFEST_NAME)
    try:
        return build_typed(kind, json.loads(fs.cat_file(path).decode("utf-8")), "manifest")
    except (OSError, ValueError, RecursionError):
        return None


def files_intact(fs: AbstractFileSystem, root: str, manifest: Any) -> bool:
    """Every file a task manifest lists is present with its recorded size (hashes are checked
    when the task is loaded)."""
    return all(
        fs.isfile(join(root, f.file)) and (f.bytes < 0 or fs.size(join(root, f.file)) == f.bytes)
        for f in manifest.files
    )


def _write(
    fs: AbstractFileSystem,
    root: str,
    tokenizer: Tokenizer,
    examples: Examples,
    labels: tuple[str | int, ...],
    fields: dict,
) -> TaskManifest:
    """Stage every file, then publish them with the manifest (``fields`` plus the splits) last."""
    index = {label: i for i, label in enumerate(labels)}
    dtype = np.dtype(fields["dtype"])
    with disk_errors(root, "--out"):
        created = not fs.exists(root)
        fs.makedirs(root, exist_ok=True)
        staged = StagedDir(fs, root)
        try:
            splits = {
                split: write_split(
                    staged,
                    split,
                    [ids for ids, _ in items],
                    np.array([index[label] for _, label in items], dtype=np.int64),
                    dtype,
                    len(labels),
                )
                for split, items in examples.items()
            }
            manifest = TaskManifest(**fields, splits=splits)
            with staged.open(TOKENIZER_NAME) as f:
                f.write(tokenizer.to_json().encode("utf-8"))
            with staged.open(MANIFEST_NAME) as f:
                f.write(manifest.to_json().encode("utf-8"))
            staged.commit(
                last=MANIFEST_NAME,
                remove=[n for n in entry_names(fs, root) if DATA_FILE_NAME.match(n)],
            )
        except BaseException:
            discard(fs, root, staged, created)
            raise
    return manifest

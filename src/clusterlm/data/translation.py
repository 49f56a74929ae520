"""A translation task: pairs of token sequences (source, target), its on-disk format and reader.

A translation directory holds ``tokenizer.json`` (one vocabulary shared by both sides; with
separate vocabularies, the target's, and ``source_tokenizer.json`` the source's), per split
and side ``{split}_{side}_tokens.bin`` (every sequence's ids, concatenated; raw little-endian in
the manifest's dtype) and ``{split}_{side}_offsets.bin`` (int64, n + 1 offsets: sequence i is
``tokens[offsets[i]:offsets[i + 1]]``), and ``manifest.json``, written last, with
``kind = "translation"``, every file's size and sha256, and every chapter (or group) dropped while
preparing, with its reason. Nothing is pickled.

Separate vocabularies are one id space for the model: the source tokenizer's ids, then the
target tokenizer's shifted by ``target_offset`` (the source vocabulary's size; 0 when shared), so
the encoder and the decoder never share a token's row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from clusterlm.data.manifest import TOKEN_DTYPES, SourceInfo, TokenizerInfo, build_typed
from clusterlm.data.storage import StagedDir, join, url_to_fs
from clusterlm.data.task import TASK_SPLITS, FileInfo, raw_manifest
from clusterlm.errors import UserError

TRANSLATION_KIND = "translation"
TRANSLATION_FORMAT_VERSION = 1
SIDES = ("src", "tgt")
TRANSLATION_FILE = re.compile(r"^(train|val|test)_(src|tgt)_(tokens|offsets)\.bin$")
SOURCE_TOKENIZER_NAME = "source_tokenizer.json"
_INDEX_DTYPE = np.dtype("<i8")
_PREPARE_HINT = (
    "`clusterlm prepare --task translation:bible-en-es|translation-jsonl:PATH --out DIR`"
)


@dataclass(frozen=True)
class SideInfo:
    tokens: int
    token_file: FileInfo
    offset_file: FileInfo


@dataclass(frozen=True)
class PairSplitInfo:
    pairs: int
    src: SideInfo
    tgt: SideInfo


@dataclass(frozen=True)
class TranslationManifest:
    format_version: int
    fingerprint: str  # hash of inputs and options: equal fingerprints mean identical output
    kind: str  # always "translation"
    source: str  # "translation:bible-en-es" or "translation-jsonl:PATH"
    sources: tuple[SourceInfo, ...]
    dtype: str
    vocab_size: int  # of both sides together
    eot_id: int  # ends every target sequence, and starts the decoder's input
    tokenizer: TokenizerInfo  # the target's (the only one when shared)
    source_tokenizer: TokenizerInfo | None  # the source's, when the vocabularies are separate
    target_offset: int  # added to the target tokenizer's ids (0: one shared vocabulary)
    split_rule: str  # "book" (the Bible) or "given" / "seeded-group" (JSONL)
    dropped: dict[str, str]  # chapter (or group) -> why its pairs were left out
    splits: dict[str, PairSplitInfo]

    def __post_init__(self) -> None:
        if self.format_version != TRANSLATION_FORMAT_VERSION or self.kind != TRANSLATION_KIND:
            raise ValueError(
                f"format {self.format_version}/{self.kind}, "
                f"expected {TRANSLATION_FORMAT_VERSION}/{TRANSLATION_KIND}"
            )
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if tuple(self.splits) != TASK_SPLITS:
            raise ValueError(f"splits must be {', '.join(TASK_SPLITS)}")
        itemsize = np.dtype(self.dtype).itemsize
        for name, split in self.splits.items():
            for side in (split.src, split.tgt):
                if (
                    side.token_file.bytes != side.tokens * itemsize
                    or side.offset_file.bytes != (split.pairs + 1) * _INDEX_DTYPE.itemsize
                ):
                    raise ValueError(f"split {name!r}: its counts and file sizes disagree")

    @property
    def files(self) -> list[FileInfo]:
        """Every file the manifest vouches for, besides itself."""
        tokenizers = [self.tokenizer, *filter(None, [self.source_tokenizer])]
        files = [FileInfo(t.file, -1, t.sha256) for t in tokenizers]  # sizes: not recorded
        sides = [side for split in self.splits.values() for side in (split.src, split.tgt)]
        return [*files, *(f for side in sides for f in (side.token_file, side.offset_file))]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


@dataclass(frozen=True)
class Sequences:
    """One side of one split: sequence i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class PairSplit:
    src: Sequences
    tgt: Sequences

    def __len__(self) -> int:
        return len(self.src)


@dataclass(frozen=True)
class TranslationTask:
    manifest: TranslationManifest
    splits: dict[str, PairSplit]


def is_translation_dir(directory: str) -> bool:
    """Whether ``directory`` holds a manifest that says it is a translation task."""
    raw = raw_manifest(directory)
    return raw is not None and raw.get("kind") == TRANSLATION_KIND


def write_pairs(
    staged: StagedDir, split: str, src: list[np.ndarray], tgt: list[np.ndarray], dtype: np.dtype
) -> PairSplitInfo:
    """Stage one split's four files: each side's concatenated tokens and offsets."""
    sides = []
    for side, sequences in zip(SIDES, (src, tgt), strict=True):
        tokens = np.concatenate(sequences) if sequences else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences], dtype=np.int64)])
        files = []
        for part, array in (
            ("tokens", tokens.astype(dtype.newbyteorder("<"))),
            ("offsets", offsets.astype(_INDEX_DTYPE)),
        ):
            data, file = array.tobytes(), f"{split}_{side}_{part}.bin"
            with staged.open(file) as f:
                f.write(data)
            files.append(FileInfo(file, len(data), hashlib.sha256(data).hexdigest()))
        sides.append(SideInfo(len(tokens), *files))
    return PairSplitInfo(len(src), *sides)


def load_translation(directory: str, verify: bool = True) -> TranslationTask:
    """The translation task in ``directory``; ``verify`` checks every file's sha256."""
    raw = raw_manifest(directory)
    if raw is None or raw.get("kind") != TRANSLATION_KIND:
        raise UserError(f"no translation task at {directory}; run {_PREPARE_HINT}")
    try:
        manifest = build_typed(TranslationManifest, raw, "manifest")
    except ValueError as err:
        raise UserError(
            f"manifest.json in {directory} is not a valid translation manifest ({err}); "
            f"rebuild it with {_PREPARE_HINT} --force"
        ) from err
    fs, root = url_to_fs(directory)
    contents = {}
    for info in manifest.files:
        path = join(root, info.file)
        data = fs.cat_file(path) if fs.isfile(path) else b""
        if (
            not fs.isfile(path)
            or (info.bytes >= 0 and len(data) != info.bytes)
            or (verify and hashlib.sha256(data).hexdigest() != info.sha256)
        ):
            raise UserError(
                f"{info.file} in {directory} is missing or corrupt; rebuild it with "
                f"`clusterlm prepare --task {manifest.source} --out {directory} --force`"
            )
        contents[info.file] = data
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    splits = {}
    for name, info in manifest.splits.items():
        sides = []
        for side in (info.src, info.tgt):
            tokens = np.frombuffer(contents[side.token_file.file], dtype=dtype)
            offsets = np.frombuffer(contents[side.offset_file.file], dtype=_INDEX_DTYPE)
            if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
                raise UserError(
                    f"the {name} split in {directory} is corrupt (offsets out of range); "
                    f"rebuild it with {_PREPARE_HINT} --force"
                )
            sides.append(Sequences(tokens.astype(dtype.newbyteorder("=")), offsets.astype("=i8")))
        splits[name] = PairSplit(*sides)
    return TranslationTask(manifest, splits)

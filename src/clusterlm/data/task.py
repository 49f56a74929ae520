"""A labelled task (text classification): its on-disk format, its reader and its split writer.

A task directory holds ``tokenizer.json``, per split ``{split}_tokens.bin`` (every example's token
ids, concatenated; raw little-endian in the manifest's dtype), ``{split}_offsets.bin`` (int64,
n + 1 offsets: example i is ``tokens[offsets[i]:offsets[i + 1]]``) and ``{split}_labels.bin``
(int64, n indices into the manifest's sorted ``labels``), and ``manifest.json``, written last, with
``kind = "classification"`` and every file's size and sha256. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from clusterlm.data.manifest import (
    MANIFEST_NAME,
    TASK_KIND,
    TOKEN_DTYPES,
    SourceInfo,
    TokenizerInfo,
    build_typed,
    check_listed_file,
)
from clusterlm.data.storage import StagedDir, join, url_to_fs
from clusterlm.errors import UserError

TASK_FORMAT_VERSION = 1
TASK_SPLITS = ("train", "val", "test")
_INDEX_DTYPE = np.dtype("<i8")
_PREPARE_HINT = "`clusterlm prepare --task play-classification|jsonl:PATH --out DIR`"


@dataclass(frozen=True)
class FileInfo:
    file: str
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_listed_file(self.file, self.sha256)


@dataclass(frozen=True)
class TaskSplitInfo:
    examples: int
    tokens: int
    label_counts: tuple[int, ...]  # examples per label, in the order of TaskManifest.labels
    token_file: FileInfo
    offset_file: FileInfo
    label_file: FileInfo

    @property
    def files(self) -> tuple[FileInfo, ...]:
        return (self.token_file, self.offset_file, self.label_file)


@dataclass(frozen=True)
class TaskManifest:
    format_version: int
    fingerprint: str  # hash of inputs and options: equal fingerprints mean identical output
    kind: str  # always "classification"; tells a task from a language-modelling corpus
    source: str  # "play-classification" or "jsonl:PATH"
    sources: tuple[SourceInfo, ...]
    dtype: str
    vocab_size: int
    eot_id: int | None
    tokenizer: TokenizerInfo
    labels: tuple[str | int, ...]  # sorted; all str or all int
    split_rule: str
    seed: int
    val_fraction: float
    test_fraction: float
    passage_tokens: int | None  # play-classification only
    splits: dict[str, TaskSplitInfo]

    def __post_init__(self) -> None:
        if self.format_version != TASK_FORMAT_VERSION or self.kind != TASK_KIND:
            raise ValueError(
                f"format {self.format_version}/{self.kind}, "
                f"expected {TASK_FORMAT_VERSION}/{TASK_KIND}"
            )
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if len({type(label) for label in self.labels}) > 1 or list(self.labels) != sorted(
            set(self.labels)
        ):
            raise ValueError("labels must be unique, sorted and of one type")
        if tuple(self.splits) != TASK_SPLITS:
            raise ValueError(f"splits must be {', '.join(TASK_SPLITS)}")
        itemsize = np.dtype(self.dtype).itemsize
        for name, split in self.splits.items():
            consistent = (
                len(split.label_counts) == len(self.labels)
                and sum(split.label_counts) == split.examples
                and split.token_file.bytes == split.tokens * itemsize
                and split.offset_file.bytes == (split.examples + 1) * _INDEX_DTYPE.itemsize
                and split.label_file.bytes == split.examples * _INDEX_DTYPE.itemsize
            )
            if not consistent:
                raise ValueError(f"split {name!r}: its counts and file sizes disagree")

    @property
    def files(self) -> list[FileInfo]:
        """Every file the manifest vouches for, besides itself."""
        tokenizer = FileInfo(self.tokenizer.file, -1, self.tokenizer.sha256)  # size: not recorded
        return [tokenizer, *(f for split in self.splits.values() for f in split.files)]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TaskManifest:
        """Parse and validate; raises ValueError naming what is wrong."""
        return build_typed(cls, json.loads(text), "manifest")


@dataclass(frozen=True)
class TaskSplit:
    tokens: np.ndarray  # every example's token ids, concatenated (manifest dtype)
    offsets: np.ndarray  # int64 [n + 1]: example i is tokens[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64 [n]: index into Task.labels

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class Task:
    manifest: TaskManifest
    splits: dict[str, TaskSplit]

    @property
    def labels(self) -> tuple[str | int, ...]:
        return self.manifest.labels


def raw_manifest(directory: str) -> dict | None:
    """The parsed manifest.json of ``directory``, or None if there is none or it is not JSON."""
    fs, root = url_to_fs(directory)
    path = join(root, MANIFEST_NAME)
    if not fs.isfile(path):
        return None
    try:
        raw = json.loads(fs.cat_file(path).decode("utf-8"))
    except (ValueError, RecursionError):  # not JSON (or UTF-8), or nested too deeply to parse
        return None
    return raw if isinstance(raw, dict) else None


def is_task_dir(directory: str) -> bool:
    """Whether ``directory`` holds a manifest that says it is a labelled task."""
    raw = raw_manifest(directory)
    return raw is not None and raw.get("kind") == TASK_KIND


def load_task(directory: str, verify: bool = True) -> Task:
    """The task in ``directory`` (local path or URL); ``verify`` checks every file's sha256."""
    raw = raw_manifest(directory)
    if raw is None:
        raise UserError(
            f"no labelled task at {directory} (no readable {MANIFEST_NAME}); run {_PREPARE_HINT}"
        )
    if "kind" not in raw and "shard_tokens" in raw:
        raise UserError(
            f"{directory} is a language-modelling corpus, not a labelled task; run {_PREPARE_HINT} "
            "and pass that directory"
        )
    try:
        manifest = build_typed(TaskManifest, raw, "manifest")
    except ValueError as err:
        raise UserError(
            f"{MANIFEST_NAME} in {directory} is not a valid task manifest ({err}); "
            f"rebuild it with {_PREPARE_HINT} --force"
        ) from err
    fs, root = url_to_fs(directory)
    contents: dict[str, bytes] = {}
    for info in manifest.files:
        path = join(root, info.file)
        data = fs.cat_file(path) if fs.isfile(path) else None
        problem = (
            "it is missing"
            if data is None
            else "its size differs from the manifest"
            if info.bytes >= 0 and len(data) != info.bytes
            else "its sha256 differs from the manifest"
            if verify and hashlib.sha256(data).hexdigest() != info.sha256
            else None
        )
        if problem:
            raise UserError(
                f"{info.file} in {directory} is corrupt: {problem}; rebuild it with "
                f"`clusterlm prepare --task {manifest.source} --out {directory} --force`"
            )
        assert data is not None  # a missing file was a problem, raised above
        contents[info.file] = data
    token_dtype = np.dtype(manifest.dtype).newbyteorder("<")
    splits = {
        name: _split_arrays(
            directory,
            name,
            len(manifest.labels),
            *(
                np.frombuffer(
                    bytearray(contents[f.file]), dtype=dtype
                )  # writable, for torch.from_numpy
                for f, dtype in zip(
                    info.files, (token_dtype, _INDEX_DTYPE, _INDEX_DTYPE), strict=True
                )
            ),
        )
        for name, info in manifest.splits.items()
    }
    return Task(manifest, splits)


def _split_arrays(
    directory: str,
    name: str,
    n_labels: int,
    tokens: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
) -> TaskSplit:
    """One split's arrays in native byte order, after checking offsets and labels are in range."""
    sane = (
        offsets[0] == 0
        and offsets[-1] == len(tokens)
        and bool(np.all(np.diff(offsets) >= 0))
        and (len(labels) == 0 or (labels.min() >= 0 and labels.max() < n_labels))
    )
    if not sane:
        raise UserError(
            f"the {name} split in {directory} is corrupt (offsets or labels out of range); "
            f"rebuild it with {_PREPARE_HINT} --force"
        )
    native = [a.astype(a.dtype.newbyteorder("="), copy=False) for a in (tokens, offsets, labels)]
    return TaskSplit(*native)


def write_split(
    staged: StagedDir,
    name: str,
    examples: list[np.ndarray],
    labels: np.ndarray,
    dtype: np.dtype,
    n_labels: int,
) -> TaskSplitInfo:
    """Stage one split's three files; ``labels`` are indices into the task's label list."""
    tokens = np.concatenate(examples) if examples else np.zeros(0, dtype)
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in examples], dtype=np.int64)])
    arrays = {
        "tokens": tokens.astype(dtype.newbyteorder("<")),
        "offsets": offsets.astype(_INDEX_DTYPE),
        "labels": np.asarray(labels).astype(_INDEX_DTYPE),
    }
    files = []
    for part, array in arrays.items():
        data = array.tobytes()
        file = f"{name}_{part}.bin"
        with staged.open(file) as f:
            f.write(data)
        files.append(FileInfo(file, len(data), hashlib.sha256(data).hexdigest()))
    counts = np.bincount(arrays["labels"], minlength=n_labels)
    return TaskSplitInfo(len(examples), len(tokens), tuple(int(c) for c in counts), *files)


def group_splits(
    n: int, group: int, seed: int, val_fraction: float, test_fraction: float
) -> list[str] | None:
    """The split of each of the n units (scenes, lines) of one group (a label).

    By the "seeded-group" rule: the units are shuffled by
    ``numpy.random.default_rng([seed, group])``; the first round(val_fraction * n) (at least 1) go
    to val, the next round(test_fraction * n) (at least 1) to test, the rest to train. None when n
    is too small to give train a unit too.
    """
    n_val, n_test = max(1, round(val_fraction * n)), max(1, round(test_fraction * n))
    if n_val + n_test >= n:
        return None
    splits = ["train"] * n
    for rank, unit in enumerate(
        np.random.default_rng([seed, group]).permutation(n)[: n_val + n_test]
    ):
        splits[unit] = "val" if rank < n_val else "test"
    return splits

"""The manifest of a prepared data directory, and the checks readers run before trusting it.

A prepared directory holds ``tokenizer.json``, token shards ``train_00000.bin``, ``val_00000.bin``,
... (raw little-endian token ids) and ``manifest.json``, which is written last and records what
every other file must contain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np

from clusterlm.data.storage import join, sha256_of_file, url_to_fs
from clusterlm.data.store_errors import check_bucket, store_errors
from clusterlm.errors import UserError
from clusterlm.files import is_plain_name, is_sha256

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "val")
# The "kind" of a labelled task's manifest (clusterlm.data.task); a corpus manifest has no kind.
TASK_KIND = "classification"
# The data files of a corpus (token shards) or a task (clusterlm.data.task), removed when --force
# replaces one dataset with another.
DATA_FILE_NAME = re.compile(r"^(train|val|test)_(\d{5}|tokens|offsets|labels)\.bin$")
# Smallest first: shards use the first that holds every token id.
TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int, candidates: Sequence[str] = TOKEN_DTYPES) -> np.dtype:
    """The smallest unsigned dtype among ``candidates`` that holds ids ``0 .. vocab_size - 1``."""
    for name in candidates:
        if vocab_size - 1 <= np.iinfo(name).max:
            return np.dtype(name)
    largest = np.iinfo(candidates[-1]).max + 1
    raise UserError(
        f"a vocabulary of {vocab_size} tokens does not fit in {candidates[-1]} token ids; "
        f"use a tokenizer with at most {largest} tokens"
    )


def check_listed_file(file: str, sha256: str) -> None:
    """A file a manifest lists: a plain name inside the directory (``clusterlm.files.plain_name``)
    and a sha256 of 64 hex digits (it names cached copies); raises ValueError."""
    if not is_plain_name(file):
        raise ValueError(
            f"it names the file {file!r}, which is not a plain name inside the directory "
            "(no /, \\, .., NUL or absolute path)"
        )
    if not is_sha256(sha256):
        raise ValueError(f"the sha256 {sha256!r} of {file} is not 64 lowercase hex digits")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    tokens: int
    sha256: str

    def __post_init__(self) -> None:
        check_listed_file(self.file, self.sha256)


@dataclass(frozen=True)
class SplitInfo:
    tokens: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class SourceInfo:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str  # "char", "bpe" or "file" (an existing tokenizer.json)
    file: str
    sha256: str

    def __post_init__(self) -> None:
        check_listed_file(self.file, self.sha256)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    fingerprint: str  # hash of inputs and options: equal fingerprints mean identical output
    dtype: str
    vocab_size: int
    eot_id: int | None
    tokenizer: TokenizerInfo
    sources: tuple[SourceInfo, ...]
    split_rule: str
    val_fraction: float
    seed: int
    shard_tokens: int
    splits: dict[str, SplitInfo]

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format version {self.format_version}, expected {FORMAT_VERSION}")
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        for name, split in self.splits.items():
            if name not in SPLITS or split.tokens != sum(s.tokens for s in split.shards):
                raise ValueError(f"split {name!r} is unknown or its token counts disagree")

    @property
    def files(self) -> list[str]:
        """Every file the manifest vouches for, besides itself."""
        shards = [shard.file for split in self.splits.values() for shard in split.shards]
        return [self.tokenizer.file, *shards]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate; raises ValueError naming what is wrong."""
        return build_typed(cls, json.loads(text), "manifest")


def load_manifest(data_dir: str | os.PathLike[str]) -> Manifest:
    """The manifest of a prepared directory (local path or URL), checked to be well-formed."""
    fs, root = url_to_fs(data_dir)
    path = join(root, MANIFEST_NAME)
    with store_errors(f"reading {data_dir}", fs, str(data_dir)):
        if not fs.isfile(path):
            check_bucket(fs, root, str(data_dir))
            raise UserError(
                f"no prepared data at {data_dir}; run `clusterlm prepare --out {data_dir}`"
            )
        stored = fs.cat_file(path)
    try:
        raw = json.loads(stored.decode("utf-8"))
        if isinstance(raw, dict) and raw.get("kind") == TASK_KIND:
            raise UserError(
                f"{data_dir} is a labelled task, not a language-modelling corpus; "
                f"fine-tune on it with `clusterlm finetune --task {data_dir}`, "
                "or set data.dir to a directory made by `clusterlm prepare` without --task"
            )
        return build_typed(Manifest, raw, "manifest")
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested too deeply to parse
        raise UserError(
            f"{MANIFEST_NAME} in {data_dir} is malformed ({err}); "
            f"run `clusterlm prepare --out {data_dir} --force` to rebuild it"
        ) from err


def verify_shards(data_dir: str | os.PathLike[str]) -> Manifest:
    """Check every file the manifest lists against its sha256; returns the manifest."""
    manifest = load_manifest(data_dir)
    fs, root = url_to_fs(data_dir)
    expected = {manifest.tokenizer.file: manifest.tokenizer.sha256}
    expected |= {s.file: s.sha256 for split in manifest.splits.values() for s in split.shards}
    for name, sha256 in expected.items():
        path = join(root, name)
        problem = (
            "it is missing"
            if not fs.isfile(path)
            else "its sha256 differs from the manifest"
            if sha256_of_file(fs, path) != sha256
            else None
        )
        if problem:
            raise _corrupt(name, data_dir, problem)
    return manifest


def check_files_present(data_dir: str | os.PathLike[str]) -> Manifest:
    """Check that every file the manifest lists is there, each shard at its recorded size
    (quick: nothing is hashed); returns the manifest."""
    manifest = load_manifest(data_dir)
    fs, root = url_to_fs(data_dir)
    itemsize = np.dtype(manifest.dtype).itemsize
    sizes: dict[str, int | None] = {manifest.tokenizer.file: None}
    sizes |= {
        s.file: s.tokens * itemsize for split in manifest.splits.values() for s in split.shards
    }
    with store_errors(f"reading {data_dir}", fs, str(data_dir)):
        for name, size in sizes.items():
            path = join(root, name)
            if not fs.isfile(path):
                raise _corrupt(name, data_dir, "it is missing")
            if size is not None and fs.size(path) != size:
                stored = fs.size(path)
                raise _corrupt(
                    name, data_dir, f"it holds {stored} bytes where the manifest records {size}"
                )
    return manifest


def _corrupt(name: str, data_dir: str | os.PathLike[str], problem: str) -> UserError:
    return UserError(
        f"{name} in {data_dir} is corrupt: {problem}; "
        f"run `clusterlm prepare --out {data_dir} --force` to rebuild it"
    )


def build_typed(kind: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as type ``kind`` (a dataclass of JSON types).

    Raises ValueError at the first mismatch.
    """
    origin, args = get_origin(kind), get_args(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        if not isinstance(value, dict) or set(value) != set(hints):
            raise ValueError(f"{where} must be an object with keys {', '.join(hints)}")
        return kind(**{k: build_typed(t, value[k], f"{where}.{k}") for k, t in hints.items()})
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return build_typed(option, value, where)
            except ValueError:
                pass
        raise ValueError(f"{where} has the wrong type")
    if origin is tuple and isinstance(value, list):
        return tuple(build_typed(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return {k: build_typed(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if kind is type(None) and value is None:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise ValueError(f"{where} has the wrong type")

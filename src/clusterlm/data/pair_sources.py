"""Where a translation task's pairs come from (``clusterlm.data.translation_prepare``): the
English–Spanish Bible split by book, a JSONL file of ``{"src", "tgt"[, "split"]}`` lines, or two
text files whose line i is a pair. Bad input raises UserError naming the line or the file."""

from __future__ import annotations

from dataclasses import dataclass

from clusterlm.data.bible import book_split, read_bible
from clusterlm.data.jsonl_task import json_object
from clusterlm.data.lines import Reading, bounded_lines, open_source
from clusterlm.data.manifest import SourceInfo
from clusterlm.data.storage import resolve_sources
from clusterlm.data.task import TASK_SPLITS, group_splits
from clusterlm.data.task_prepare import (
    BIBLE_TASK,
    TRANSLATION_JSONL_PREFIX,
    TRANSLATION_TEXT_PREFIX,
    TaskOptions,
)
from clusterlm.errors import UserError

_FIX = 'write one JSON object per line: {"src": "...", "tgt": "...", optional "split"}'


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str
    split: str


@dataclass(frozen=True)
class Pairs:
    pairs: list[Pair]
    dropped: dict[str, str]
    sources: tuple[SourceInfo, ...]
    split_rule: str


def read_pairs(opts: TaskOptions) -> Pairs:
    """The pairs ``opts.task`` names, each with its split."""
    if opts.task == BIBLE_TASK:
        return _bible_pairs()
    if opts.task.startswith(TRANSLATION_TEXT_PREFIX):
        return _text_pairs(opts)
    return _jsonl_pairs(opts)


def _bible_pairs() -> Pairs:
    bible = read_bible()
    pairs = [Pair(p.english, p.spanish, book_split(p.book)) for p in bible.pairs]
    return Pairs(pairs, bible.dropped, bible.sources, "book")


def _jsonl_pairs(opts: TaskOptions) -> Pairs:
    path = opts.task.removeprefix(TRANSLATION_JSONL_PREFIX)
    sources = resolve_sources([path])
    if len(sources) != 1:
        raise UserError(f"--task {opts.task} names {len(sources)} files; name one JSONL file")
    with open_source(sources[0]) as stream:
        reading = Reading(stream)
        rows = [
            (number, json_object(f"{sources[0].name} line {number}", raw, _FIX))
            for number, raw in enumerate(
                bounded_lines(reading, sources[0].name, opts.max_line_bytes), start=1
            )
            if raw.strip()
        ]
    info = SourceInfo(sources[0].name, reading.size, reading.hexdigest())
    if not rows:
        raise UserError(f"{sources[0].name} holds no pairs; {_FIX}")
    for number, row in rows:
        where = f"{sources[0].name} line {number}"
        for key in ("src", "tgt"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise UserError(f'{where} has no "{key}" (a non-empty string); {_FIX}')
        if row.get("split", "train") not in TASK_SPLITS or ("split" in row) != (
            "split" in rows[0][1]
        ):
            raise UserError(
                f'{where}: give every line a "split" of {", ".join(TASK_SPLITS)}, or none'
            )
    if "split" in rows[0][1]:
        pairs = [Pair(row["src"], row["tgt"], row["split"]) for _, row in rows]
        return Pairs(pairs, {}, (info,), "given")
    texts = [(row["src"], row["tgt"]) for _, row in rows]
    return Pairs(_drawn_splits(texts, sources[0].name, opts), {}, (info,), "seeded-group")


def _drawn_splits(texts: list[tuple[str, str]], name: str, opts: TaskOptions) -> list[Pair]:
    """``texts`` split by the seeded-group rule over all of them (``group_splits``)."""
    drawn = group_splits(len(texts), 0, opts.seed, opts.val_fraction, opts.test_fraction)
    if drawn is None:
        raise UserError(f"{name} has too few pairs to split; give at least 3")
    return [Pair(src, tgt, split) for (src, tgt), split in zip(texts, drawn, strict=True)]


def _text_pairs(opts: TaskOptions) -> Pairs:
    """Line i of the source file with line i of the target file; a pair with an empty side is
    left out (and counted)."""
    paths = opts.task.removeprefix(TRANSLATION_TEXT_PREFIX).split(",")
    if len(paths) != 2 or not all(paths):
        raise UserError(
            f"--task {opts.task} must name two files, {TRANSLATION_TEXT_PREFIX}SRC,TGT "
            "(one sentence per line, line i of each a pair)"
        )
    sides = [_text_lines(path, opts.max_line_bytes) for path in paths]
    (src, src_info), (tgt, tgt_info) = sides
    if len(src) != len(tgt):
        raise UserError(
            f"{src_info.name} has {len(src)} lines but {tgt_info.name} has {len(tgt)}; "
            "give both sides one sentence per line, line i of each a pair"
        )
    texts = [(s, t) for s, t in zip(src, tgt, strict=True) if s and t]
    lost = len(src) - len(texts)
    dropped = {f"{lost} lines": "an empty side"} if lost else {}
    pairs = _drawn_splits(texts, src_info.name, opts)
    return Pairs(pairs, dropped, (src_info, tgt_info), "seeded-group")


def _text_lines(path: str, max_line_bytes: int) -> tuple[list[str], SourceInfo]:
    """The stripped lines of one UTF-8 text file, and its size and hash."""
    sources = resolve_sources([path])
    if len(sources) != 1:
        raise UserError(f"{path} names {len(sources)} files; name one text file per side")
    name, lines = sources[0].name, []
    with open_source(sources[0]) as stream:
        reading = Reading(stream)
        for number, raw in enumerate(bounded_lines(reading, name, max_line_bytes), start=1):
            try:
                lines.append(raw.decode("utf-8").strip())
            except UnicodeDecodeError:
                raise UserError(f"{name} line {number} is not UTF-8; convert the file") from None
    return lines, SourceInfo(name, reading.size, reading.hexdigest())

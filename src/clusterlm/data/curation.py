"""The inputs of `prepare` read and chosen: every document scanned (checked, measured and, when
cleaning, normalised and profiled) in ``nproc`` processes, then what to keep decided in one
ordered pass (``clusterlm.data.dedup``), so the outcome is the same for any number of processes.
The report says what was removed and why; `prepare` prints it and writes it as ``cleaning.json``
beside the manifest.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from typing import Any

from clusterlm.data.documents import Document, scan_document
from clusterlm.data.lines import DEFAULT_MAX_LINE_BYTES
from clusterlm.data.quality import CleaningOptions
from clusterlm.data.storage import SourceFile, shared_between_processes
from clusterlm.errors import UserError

REPORT_NAME = "cleaning.json"


def scan_sources(
    sources: list[SourceFile],
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    cleaning: CleaningOptions | None = None,
    nproc: int = 1,
) -> list[Document]:
    """Each source checked and measured (``clusterlm.data.documents``), in order; fails on bad
    input. Sources are spread over ``nproc`` processes, except those of an in-memory filesystem,
    which another process cannot see."""
    scan = partial(_scan, max_line_bytes=max_line_bytes, cleaning=cleaning)
    if nproc == 1 or len(sources) < 2 or not all(shared_between_processes(s.fs) for s in sources):
        documents = list(map(scan, sources))
    else:
        # "spawn": a forked child would inherit the tokenizer library's threads in an unknown state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(nproc, len(sources)), mp_context=context) as pool:
            chunk = max(1, len(sources) // (8 * nproc))  # big enough to amortize, small to balance
            documents = list(pool.map(scan, sources, chunksize=chunk))
    if not any(d.chars for d in documents):
        names = ", ".join(s.name for s in sources[:3]) + (", ..." if len(sources) > 3 else "")
        raise UserError(f"the inputs ({names}) hold no text; pass files that contain text")
    return documents


def _scan(source: SourceFile, max_line_bytes: int, cleaning: CleaningOptions | None) -> Document:
    return scan_document(source, max_line_bytes, cleaning)


def read_documents(
    sources: list[SourceFile], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[str]:
    """The cleaned text of every source, whole, in order (empty for a source without text)."""
    for source in sources:
        yield "".join(scan_document(source, max_line_bytes).text())


def curate(
    documents: list[Document], cleaning: CleaningOptions
) -> tuple[list[Document], dict[str, Any]]:
    """The documents kept, in order, and the report of those removed (``REPORT_NAME``)."""
    # Imported here: the LSH index loads scipy, which the processes that scan never need.
    from clusterlm.data.dedup import REASONS, select

    profiles = [d.profile for d in documents]
    assert all(p is not None for p in profiles), "documents scanned without cleaning options"
    decisions = select([p for p in profiles if p is not None], cleaning)
    kept = [d for d, removal in zip(documents, decisions, strict=True) if removal is None]
    if not kept:
        raise UserError(
            "cleaning removed every document; loosen --min-chars, --max-chars or --max-non-letter"
        )
    removed: dict[str, dict[str, int]] = {r: {"documents": 0, "chars": 0} for r in REASONS}
    listed = []
    for document, removal in zip(documents, decisions, strict=True):
        if removal is None:
            continue
        removed[removal.reason]["documents"] += 1
        removed[removal.reason]["chars"] += document.chars
        of = None if removal.duplicate_of is None else documents[removal.duplicate_of].info.name
        listed.append({"name": document.info.name, "reason": removal.reason, "duplicate_of": of})
    report = {
        "options": asdict(cleaning),
        "documents": len(documents),
        "kept": len(kept),
        "kept_chars": sum(d.chars for d in kept),
        "removed": removed,
        "removed_documents": listed,
    }
    return kept, report


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2) + "\n"


def summary(report: dict[str, Any]) -> str:
    """The report in one line: documents kept, and how many went for each reason."""
    reasons = ", ".join(
        f"{count['documents']:,} {reason.replace('_', ' ')}"
        for reason, count in report["removed"].items()
        if count["documents"]
    )
    return f"cleaning kept {report['kept']:,} of {report['documents']:,} documents" + (
        f"; removed {reasons}" if reasons else ""
    )

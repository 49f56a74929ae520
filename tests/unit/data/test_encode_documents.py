"""Encoding documents: the same pieces and ids in one process, or with workers reading whole
documents, or with this process reading large ones (or in-memory ones) for the workers."""

from __future__ import annotations

import numpy as np
import pytest

from clusterlm.data import encode
from clusterlm.data.curation import scan_sources
from clusterlm.data.storage import resolve_sources
from clusterlm.data.tokenizer import Tokenizer


def encoded(documents, tokenizer, workers):
    out = encode.encode_documents(tokenizer, documents, np.dtype("uint16"), workers, 64)
    return [(e.document, e.last, e.chars, e.ids.tolist()) for e in out]


@pytest.mark.parametrize("whole_limit", [1 << 24, 100])  # whole documents; large ones in pieces
def test_workers_encode_what_one_process_does(corpus_dir, monkeypatch, whole_limit):
    documents = scan_sources(resolve_sources([str(corpus_dir)]))
    tokenizer = Tokenizer.char(d.alphabet for d in documents)
    alone = encoded(documents, tokenizer, 1)
    assert [e[0] for e in alone if e[1]] == [0, 1, 2] and max(e[2] for e in alone) < 200
    monkeypatch.setattr(encode, "WHOLE_DOCUMENT_CHARS", whole_limit)
    assert encoded(documents, tokenizer, 2) == alone


def test_in_memory_documents_are_read_here(memory_fs):
    for name in ("a", "b"):
        memory_fs.pipe(f"/docs/{name}.txt", f"text of {name}\n".encode() * 20)
    documents = scan_sources(resolve_sources(["memory://docs"]), nproc=2)
    tokenizer = Tokenizer.char(d.alphabet for d in documents)
    assert encoded(documents, tokenizer, 2) == encoded(documents, tokenizer, 1)

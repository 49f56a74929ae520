"""`clusterlm prepare` cleaning: normalisation, filters, exact and near deduplication, the report
beside the manifest, and byte-identical output for any --nproc."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import numpy as np

from clusterlm import cli
from clusterlm.data.manifest import load_manifest, verify_shards
from clusterlm.data.tokenizer import Tokenizer

CLEAN = ("--normalize", "--min-chars", "40", "--max-non-letter", "0.5", "--dedup", "near")


def corpus(root: Path) -> Path:
    """Documents with planted duplicates, one per file."""
    rng = random.Random(0)
    vocabulary = ["thou", "art", "king", "heart", "love", "speak", "night", "sword", "crown"]
    root.mkdir()
    originals = []
    for i in range(40):
        words = [rng.choice(vocabulary) + str(rng.randrange(50)) for _ in range(200)]
        originals.append(" ".join(words) + "\n")
        (root / f"doc{i:03d}.txt").write_text(originals[-1])
    accented = "café naïve " * 30 + "\n"  # decomposed in one copy, a control character in the other
    (root / "exact.txt").write_text(unicodedata.normalize("NFD", accented))
    (root / "exact2.txt").write_text(accented.replace(" ", " \x07", 5))
    near = originals[7].split()
    near[100] = "planted"
    (root / "near.txt").write_text(" ".join(near) + "\n")
    (root / "short.txt").write_text("too short\n")
    (root / "numbers.txt").write_text("1234 5678 9012 3456 7890 " * 20 + "\n")
    return root


def tokens(out: Path, split: str = "train") -> np.ndarray:
    manifest = load_manifest(out)
    return np.concatenate([np.fromfile(out / s.file, "<u2") for s in manifest.splits[split].shards])


def test_cleaning_removes_what_the_report_says(tmp_path, capsys):
    inputs, out = corpus(tmp_path / "in"), tmp_path / "out"
    assert cli.main(["prepare", str(inputs), "--out", str(out), "--nproc", "1", *CLEAN]) == 0
    printed = capsys.readouterr().out
    assert "cleaning kept 41 of 45 documents" in printed
    report = json.loads((out / "cleaning.json").read_text())
    counts = {reason: c["documents"] for reason, c in report["removed"].items()}
    assert counts == {
        "empty": 0,
        "too_short": 1,
        "too_long": 0,
        "non_letter": 1,
        "exact_duplicate": 1,
        "near_duplicate": 1,
    }
    gone = {d["name"].rsplit("/", 1)[-1]: d for d in report["removed_documents"]}
    assert gone["exact2.txt"]["duplicate_of"].endswith("exact.txt")
    assert gone["near.txt"]["duplicate_of"].endswith("doc007.txt")
    manifest = verify_shards(out)
    assert len(manifest.sources) == 45  # the inputs, all of them
    text = Tokenizer.load(str(out / "tokenizer.json")).decode(tokens(out).tolist())
    assert "planted" not in text and "1234" not in text and "\x07" not in text
    assert unicodedata.is_normalized("NFC", text)
    # Without cleaning, the same output directory is replaced and the report goes.
    assert cli.main(["prepare", str(inputs), "--out", str(out), "--nproc", "1", "--force"]) == 0
    assert not (out / "cleaning.json").exists()


def test_output_is_byte_identical_for_any_nproc(tmp_path):
    inputs = corpus(tmp_path / "in")
    outs = [tmp_path / f"n{n}" for n in (1, 2)]
    for n, out in zip((1, 2), outs, strict=True):
        argv = ["prepare", str(inputs), "--out", str(out), "--nproc", str(n), *CLEAN]
        assert cli.main([*argv, "--shard-tokens", "3000"]) == 0
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and "cleaning.json" in files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name

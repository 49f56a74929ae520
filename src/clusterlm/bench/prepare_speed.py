"""`clusterlm bench prepare`: `prepare` timed at several process counts on one generated corpus,
with the outputs checked byte for byte against each other.

The corpus is the embedded plays written out again and again, each copy with a seeded share of its
words replaced by others from the same play, so its copies are alike without being near duplicates
of each other (and nothing is removed for being one): a corpus of any size with the embedded
corpus's vocabulary and line structure.
"""

from __future__ import annotations

import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from clusterlm.data.corpus import clean_text, embedded_corpus
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.errors import UserError

REPLACED_SHARE = 0.15  # of each copy's words


def variant_corpus(root: Path, size_mb: float, seed: int = 0) -> int:
    """Write copies of the embedded plays with words replaced under ``root`` until they hold
    ``size_mb`` MB; returns the bytes written."""
    plays = [clean_text(Path(s.path).read_text(encoding="utf-8-sig")) for s in embedded_corpus()]
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    written, copy = 0, 0
    while written < size_mb * 1e6:
        for number, text in enumerate(plays):
            lines = [line.split(" ") for line in text.split("\n")]
            words = [w for line in lines for w in line if w]
            for line in lines:
                for i, word in enumerate(line):
                    if word and rng.random() < REPLACED_SHARE:
                        line[i] = rng.choice(words)
            data = "\n".join(" ".join(line) for line in lines).encode("utf-8")
            (root / f"copy{copy:03d}-play{number:02d}.txt").write_bytes(data)
            written += len(data)
            if written >= size_mb * 1e6:
                break
        copy += 1
    return written


def bench_prepare(
    options: PrepareOptions, nprocs: list[int], size_mb: float, rounds: int
) -> list[str]:
    """Prepare a generated corpus of ``size_mb`` MB with ``options`` at every process count of
    ``nprocs``, ``rounds`` times each, alternating; lines of the fastest seconds per count, the
    speedup over the first count, and whether every output equals the first's byte for byte."""
    if min(nprocs) < 1 or rounds < 1 or size_mb <= 0:
        raise UserError("--nproc counts and --rounds must be >= 1, and --size-mb positive")
    with tempfile.TemporaryDirectory(prefix="clusterlm-bench-prepare-") as scratch:
        root = Path(scratch)
        size = variant_corpus(root / "corpus", size_mb)
        best = {n: (float("inf"), 0.0, 0.0) for n in nprocs}
        for _ in range(rounds):
            for n in nprocs:
                out = root / f"out-{n}"
                shutil.rmtree(out, ignore_errors=True)
                run = replace(options, inputs=(str(root / "corpus"),), out=str(out), workers=n)
                best[n] = min(best[n], _timed(partial(prepare, run)))
        identical = all(_same_files(root / f"out-{nprocs[0]}", root / f"out-{n}") for n in nprocs)
    lines = [
        f"corpus: {size / 1e6:.1f} MB of generated text; fastest of {rounds} rounds; CPU seconds "
        "of this process (what does not spread over processes) and of the workers"
    ]
    lines += [
        f"--nproc {n}: {wall:.2f} s, {size / 1e6 / wall:.2f} MB/s, "
        f"{best[nprocs[0]][0] / wall:.2f}x --nproc {nprocs[0]}; CPU {own:.2f} s here, "
        f"{workers:.2f} s in workers"
        for n, (wall, own, workers) in best.items()
    ]
    lines.append(f"outputs byte-identical: {'yes' if identical else 'NO'}")
    return lines


def _timed(work: Callable[[], object]) -> tuple[float, float, float]:
    """Wall seconds of ``work``, and the CPU seconds it took here and in child processes."""
    before = [_cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)]
    start = time.perf_counter()
    work()
    wall = time.perf_counter() - start
    here = _cpu_seconds(resource.RUSAGE_SELF) - before[0]
    return wall, max(0.0, here), max(0.0, _cpu_seconds(resource.RUSAGE_CHILDREN) - before[1])


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / name).read_bytes() == (b / name).read_bytes() for name in names
    )

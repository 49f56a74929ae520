"""`clusterlm prepare` keeps its memory bounded whatever the input: a 64 MiB file that is one line,
as a corpus or as a JSONL task, is refused with one `error:` line while the command's peak memory
stays within what importing it takes plus a few MiB (the bound checked is 512 MiB)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LIMIT_MIB = 512
# Runs the command as a child of its own, so the peak is that command's alone.
MEASURE = """
import resource, subprocess, sys
done = subprocess.run([sys.executable, "-m", "clusterlm", *sys.argv[1:]], \
capture_output=True, text=True)
print(done.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
sys.stderr.write(done.stderr)
"""


def peak_and_error(*args: str) -> tuple[int, int, str]:
    """(exit status, peak resident MiB, stderr) of `clusterlm ARGS`."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=240
    )
    status, peak = map(int, done.stdout.split())
    return status, peak, done.stderr


def one_line_file(path, head: bytes, tail: bytes) -> None:
    with open(path, "wb") as f:
        f.write(head)
        block = b"a" * (1 << 20)
        for _ in range(64):
            f.write(block)
        f.write(tail)


@pytest.mark.parametrize("kind", ["jsonl task", "corpus"])
def test_a_64_mib_line_is_refused_in_bounded_memory(tmp_path, kind):
    if kind == "jsonl task":
        path = tmp_path / "huge.jsonl"
        one_line_file(path, b'{"text": "', b'", "label": 1}\n')
        args = ["prepare", "--task", f"jsonl:{path}", "--out", str(tmp_path / "out")]
    else:
        path = tmp_path / "huge.txt"
        one_line_file(path, b"", b"\n")
        args = ["prepare", str(path), "--out", str(tmp_path / "out"), "--workers", "1"]
    status, peak, err = peak_and_error(*args)
    assert status == 2 and err == (
        f"error: line 1 of {path} is over --max-line-bytes (1048576 bytes); "
        "split it or raise the limit\n"
    )
    assert peak < LIMIT_MIB, f"peak {peak} MiB"
    assert not (tmp_path / "out").exists()


def test_the_limit_can_be_raised(tmp_path):
    rows = [
        {"text": "x" * 3000, "label": i % 2, "split": ("train", "val", "test")[i % 3]}
        for i in range(6)
    ]
    path = tmp_path / "wide.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    status, _, err = peak_and_error(
        "prepare",
        "--task",
        f"jsonl:{path}",
        "--out",
        str(tmp_path / "a"),
        "--max-line-bytes",
        "2048",
    )
    assert status == 2 and "line 1 of" in err
    status, _, err = peak_and_error(
        "prepare",
        "--task",
        f"jsonl:{path}",
        "--out",
        str(tmp_path / "b"),
        "--max-line-bytes",
        "4096",
    )
    assert status == 0, err

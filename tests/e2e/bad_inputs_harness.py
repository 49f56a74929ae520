"""The harness of the bad-input corpus (``test_bad_inputs.py``): what an entry is, the shared
inputs entries start from, the disk snapshots, and the small helpers entries build their bad
files with.

An entry is a command line with ``{placeholders}`` for the shared inputs and its own temporary
directory, an optional ``setup(tmp, shared)`` that writes the bad input there, and the
environment it runs in. Every entry must end with one line on stderr (``error: ...`` unless the
entry names the command's own format), a non-zero status, no traceback, and the disk as it was
before the command (apart from the paths an entry declares it may change).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LAUNCH_PREFIXES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_",
    "GROUP_",
    "ROLE_",
    "MASTER_",
    "TORCHELASTIC_",
    "OMPI_",
    "PMI_",
    "PMIX_",
    "MPI_LOCAL",
    "SLURM_",
    "CLUSTERLM_",
)

# The smallest model and run the commands accept quickly: one layer, eight positions.
TINY = (
    "--model.n_layer",
    "1",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "16",
    "--model.block_size",
    "16",
    "--training.micro_batch_size",
    "2",
    "--training.eval_batches",
    "1",
    "--training.eval_interval",
    "0",
    "--training.steps",
    "2",
    "--metrics.progress",
    "none",
    "--metrics.tensorboard",
    "false",
    "--metrics.plot",
    "false",
    "--metrics.peak_flops",
    "1e12",
    "--training.precision",
    "fp32",
)


@dataclass(frozen=True)
class Shared:
    """Good inputs built once per module: a prepared corpus, a run trained on it, its newest
    checkpoint, a labelled task with the corpus's tokenizer and the run exported to Hugging Face."""

    root: Path
    data: Path
    run: Path
    ckpt: Path
    task: Path
    hf: Path


Setup = Callable[[Path, Shared], None]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {tmp}, {data}, {run}, {ckpt}, {task}, {hf} are filled in
    setup: Setup | None = None  # writes the bad input under {tmp}
    expect: str = ""  # a part of the one line
    env: dict[str, str] = field(default_factory=dict)  # set for the command (a subprocess)
    may_change: tuple[str, ...] = ()  # globs, relative to {tmp}, of paths the command may change
    subprocess: bool = False  # run as `python -m clusterlm` (launchers, environments, signals)
    prefix: str = "error: "  # how the command's one line begins
    signal_after: str = ""  # subprocess: a path under {tmp}; once it exists, SIGINT the command
    timeout: float = 60


def case(id: str, *argv: str, **options) -> Case:
    return Case(id, tuple(argv), **options)


def fill(argv: tuple[str, ...], tmp: Path, shared: Shared) -> list[str]:
    names = {
        "tmp": tmp,
        "data": shared.data,
        "run": shared.run,
        "ckpt": shared.ckpt,
        "task": shared.task,
        "hf": shared.hf,
    }
    return [arg.format(**{k: str(v) for k, v in names.items()}) for arg in argv]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: files by size and modification time, directories by presence."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_dir():
            info = path.lstat()
            found[str(path.relative_to(root))] = ("file", info.st_size, info.st_mtime_ns)
        else:
            found[str(path.relative_to(root))] = ("dir",)
    return found


def changed(
    before: dict[str, tuple], after: dict[str, tuple], allowed: tuple[str, ...]
) -> list[str]:
    paths = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(p for p in paths if not any(fnmatch.fnmatch(p, pattern) for pattern in allowed))


def clean_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_PREFIXES)}
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def run_subprocess(
    entry: Case, argv: list[str], env: dict[str, str], tmp: Path
) -> tuple[int, str, str]:
    """(status, stdout, stderr) of ``python -m clusterlm ARGV`` started in ``tmp``, with ``env``
    added."""
    command = [sys.executable, "-m", "clusterlm", *argv]
    proc = subprocess.Popen(
        command,
        cwd=tmp,
        env=clean_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_interrupts_by_default,
    )
    try:
        if entry.signal_after:
            _interrupt_once_present(proc, tmp / entry.signal_after, entry.timeout)
        out, err = proc.communicate(timeout=entry.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{entry.id}: no answer within {entry.timeout} s; stderr:\n{err}"
        ) from None
    return proc.returncode, out, err


def _interrupts_by_default() -> None:
    """In the child, before it runs Python: SIGINT to its default action. A process started with
    SIGINT ignored keeps it ignored (Python installs its handler only over the default), and the
    test process may have inherited or been left that way by a launcher tested in it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_once_present(proc: subprocess.Popen, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)


# ---- helpers the entries' setups use -------------------------------------------------------


def write(name: str, content: str | bytes) -> Setup:
    """A setup that writes ``content`` to ``{tmp}/name``."""

    def setup(tmp: Path, shared: Shared) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def copy_of(source: str, name: str, change: Callable[[Path], None] | None = None) -> Setup:
    """A setup that copies a shared input (``data``, ``run``, ``ckpt``, ``task``, ``hf``) to
    ``{tmp}/name`` and then applies ``change`` to the copy."""

    def setup(tmp: Path, shared: Shared) -> None:
        shutil.copytree(getattr(shared, source), tmp / name)
        if change is not None:
            change(tmp / name)

    return setup


def both(*setups: Setup) -> Setup:
    def setup(tmp: Path, shared: Shared) -> None:
        for one in setups:
            one(tmp, shared)

    return setup


def remove(pattern: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        found = sorted(root.glob(pattern))
        assert found, f"nothing matches {pattern} in {root}"
        for path in found:
            path.unlink()

    return change


def replace(name: str, content: str | bytes) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return change


def truncate(name: str) -> Callable[[Path], None]:
    """Cut a file to half its length (an interrupted write)."""

    def change(root: Path) -> None:
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])

    return change


def flip_byte(pattern: str) -> Callable[[Path], None]:
    """Flip one byte in the middle of the first file matching ``pattern`` (same size, other
    bytes)."""

    def change(root: Path) -> None:
        path = sorted(root.glob(pattern))[0]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    return change


def edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Rewrite the JSON file ``name`` after ``edit`` changed its value in place."""

    def change(root: Path) -> None:
        value = json.loads((root / name).read_text())
        edit(value)
        (root / name).write_text(json.dumps(value))

    return change


def jsonl(*rows: object) -> bytes:
    return "".join(
        (row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows
    ).encode()

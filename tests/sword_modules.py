"""The Debian SWORD Bible modules (``sword-text-kjv``, ``sword-text-sparv``, ``python3-sword``),
read for real: ``make test`` installs them as root. Without them the tests skip with the reason,
and with ``CI=true`` such a skip is a failure."""

from __future__ import annotations

import os

import pytest

from clusterlm.data.bible import BibleCorpus, read_bible
from clusterlm.errors import UserError


def require_bible() -> BibleCorpus:
    """Both modules read and aligned, or the test skipped (failed under CI=true)."""
    try:
        return read_bible()
    except UserError as err:
        reason = f"the SWORD Bible modules are unavailable: {err}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: a skip is a failure)")
        pytest.skip(reason)

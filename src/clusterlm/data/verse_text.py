"""Plain text of one Bible verse from a SWORD module's OSIS markup (``clusterlm.data.bible``).

What SWORD's own ``stripText()`` leaves behind, and this cleaner removes or repairs:

- Strong's numbers: the markup's ``<w lemma="strong:H2416">`` tags, or their residue ``<H2416>``;
- footnotes (``<note>…</note>``): dropped whole, the words on either side kept apart;
- added words (``<transChange>``, the translators' italics), which ``stripText()`` glues to their
  neighbours (``allí<transChange>también</transChange>bdelio``);
- USFM's divine-name markers ``\\nd`` and ``\\+nd*`` inside the OSIS text, and the KJV's ``¶``
  paragraph marks.

A canonical psalm title (``<title canonical="true">``, "A Psalm of David.") is kept, since the
other translation carries it in the verse; other headings (the acrostic letters of Psalm 119) are
dropped.
"""

from __future__ import annotations

import re

# Elements dropped with their content: footnotes, and headings that are not part of the text.
_DROPPED = re.compile(r"<note\b.*?</note>|<title(?![^>]*canonical=\"true\")[^>]*>.*?</title>", re.S)
# Element boundaries that separate words: added words, notes' neighbours, line groups.
_SEPARATING = re.compile(r"</?(?:transChange|q|l|lg|lb|title|div|chapter|milestone)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_STRONGS = re.compile(r"<[HG]\d+>")  # stripText's residue of a Strong's number
_USFM_MARKER = re.compile(r"\\\+?nd\*?")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r" (?=[,.;:!?)\]])")


def clean_verse(markup: str) -> str:
    """The plain text of one verse's OSIS ``markup`` (or of ``stripText()``'s output)."""
    text = _STRONGS.sub("", markup)
    text = _DROPPED.sub(" ", text)
    text = _SEPARATING.sub(" ", text)
    text = _TAG.sub("", text)
    text = _USFM_MARKER.sub(" ", text).replace("¶", " ")
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    text = _SPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCTUATION.sub("", text)

"""Which documents `prepare` keeps: the length and character filters, then exact and near
deduplication, decided in one ordered pass so the result is the same however the documents were
profiled (``clusterlm.data.quality``).

A document is removed as an exact duplicate when an earlier kept document has the same sha256 of
its normalised text, and as a near duplicate when an earlier kept document's word 5-grams are
about as alike as ``near_threshold`` (Jaccard similarity). Near duplicates are found with MinHash
and locality-sensitive hashing (datasketch): the signature's bands are chosen so that a pair at
the threshold shares a band almost surely, and a pair that shares one counts when the signatures'
estimate of its similarity is at least the threshold less two standard errors of that estimate,
so a pair at the threshold is found about 97% of the time and a pair well below it never.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

from clusterlm.data.quality import MINHASH_SEED, NUM_PERM, CleaningOptions, Profile

REASONS = ("empty", "too_short", "too_long", "non_letter", "exact_duplicate", "near_duplicate")


@dataclass(frozen=True)
class Removal:
    reason: str
    duplicate_of: int | None = None  # the kept document it duplicates


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band with which a pair at the acceptance cut still shares
    a band with probability 0.99."""
    cut = acceptance_cut(threshold)
    best = (NUM_PERM, 1)
    for rows in range(1, NUM_PERM + 1):
        bands = NUM_PERM // rows
        if bands < 2 or 1 - (1 - cut**rows) ** bands < 0.99:
            break
        best = (bands, rows)
    return best


def acceptance_cut(threshold: float) -> float:
    """The least estimated similarity that counts: the threshold less two standard errors."""
    return threshold - 2 * math.sqrt(threshold * (1 - threshold) / NUM_PERM)


@dataclass
class NearDuplicates:
    """Kept documents' signatures, indexed; ``match`` finds the earliest kept near duplicate."""

    threshold: float
    _signatures: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lsh = MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(self.threshold))
        self._cut = acceptance_cut(self.threshold)

    def match(self, signature: np.ndarray) -> int | None:
        sketch = LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme="affine32")
        for other in sorted(self._lsh.query(sketch)):
            if np.mean(self._signatures[other] == signature) >= self._cut:
                return other
        return None

    def add(self, index: int, signature: np.ndarray) -> None:
        sketch = LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme="affine32")
        self._lsh.insert(index, sketch, check_duplication=False)
        self._signatures[index] = signature


def select(profiles: Sequence[Profile], options: CleaningOptions) -> list[Removal | None]:
    """For each document in input order: None (kept) or why it is removed."""
    exact: dict[str, int] = {}
    near = NearDuplicates(options.near_threshold) if options.dedup == "near" else None
    decisions: list[Removal | None] = []
    for index, profile in enumerate(profiles):
        removal = _filtered(profile, options)
        if removal is None and options.dedup != "none":
            if profile.sha256 in exact:
                removal = Removal("exact_duplicate", exact[profile.sha256])
            elif near is not None and profile.signature is not None:
                match = near.match(profile.signature)
                removal = Removal("near_duplicate", match) if match is not None else None
        if removal is None:
            exact.setdefault(profile.sha256, index)
            if near is not None and profile.signature is not None:
                near.add(index, profile.signature)
        decisions.append(removal)
    return decisions


def _filtered(profile: Profile, options: CleaningOptions) -> Removal | None:
    if profile.letters + profile.others == 0:
        return Removal("empty")
    if profile.chars < options.min_chars:
        return Removal("too_short")
    if options.max_chars and profile.chars > options.max_chars:
        return Removal("too_long")
    if profile.non_letter_share > options.max_non_letter:
        return Removal("non_letter")
    return None

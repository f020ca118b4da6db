"""MetaCLIP-style balancing: captions matched against a metadata list, at most ~t pairs per entry.

Each caption is matched against the entries (word-boundary, case-insensitive substring matches:
every entry whose words occur in order in the caption). An entry matched by ``count`` pairs keeps
each of them with probability ``min(1, t / count)``; a pair is kept when any of its entries keeps
it, and dropped when it matches none. Head entries ("a photo") are thinned to about ``t``, tail
entries are kept whole, as MetaCLIP's curation does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipforge.errors import DataError

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.lower()))


def load_entries(path: str | Path) -> list[str]:
    """One entry per line (blank lines and '#' comments skipped), duplicates removed in order."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the metadata list {path}: {e.strerror or e}") from None
    seen: dict[str, None] = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and words(line):
            seen.setdefault(" ".join(words(line)), None)
    if not seen:
        raise DataError(f"{path}: no metadata entries")
    return list(seen)


def match(captions: Sequence[str | None], entries: Sequence[str]) -> list[list[int]]:
    """Per caption, the indices of the entries it contains."""
    table = {words(e): i for i, e in enumerate(entries)}
    longest = max(len(k) for k in table)
    out = []
    for cap in captions:
        w = words(cap or "")
        hits = {table[tuple(w[a : a + n])] for n in range(1, longest + 1) for a in range(len(w) - n + 1)
                if tuple(w[a : a + n]) in table}
        out.append(sorted(hits))
    return out


def balance(matches: Sequence[Sequence[int]], n_entries: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept [n] bool, counts [n_entries] of matched pairs per entry) for per-entry cap ``t``."""
    counts = np.zeros(n_entries, np.int64)
    for m in matches:
        counts[list(m)] += 1
    p = np.minimum(1.0, t / np.maximum(counts, 1))  # [entries] keep probability
    rng = np.random.default_rng([seed, 0x4D455441])  # 'META'
    kept = np.zeros(len(matches), bool)
    for i, m in enumerate(matches):
        if m:
            kept[i] = bool((rng.random(len(m)) < p[list(m)]).any())
    return kept, counts

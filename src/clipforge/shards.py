"""WebDataset shard patterns, read the same way by training (``data.wds``) and embedding
(``search.sources``)."""

from __future__ import annotations

import re

from clipforge.errors import DataError

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` -> ``a/000.tar a/001.tar a/002.tar``; ``{x,y}`` lists; several
    braces multiply; ``p1::p2`` concatenates patterns. Zero padding follows the bounds."""
    out: list[str] = []
    for part in pattern.split("::"):
        if part:
            out.extend(_expand(part))
    return out


def _expand(s: str) -> list[str]:
    m = _BRACE.search(s)
    if m is None:
        return [s]
    pre, body, post = s[: m.start()], m.group(1), s[m.end() :]
    r = _RANGE.fullmatch(body)
    if r:
        a, b = r.groups()
        lo, hi = int(a), int(b)
        width = len(a) if len(a) == len(b) else 0
        step = 1 if hi >= lo else -1
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DataError(f"cannot expand {{{body}}} in {s!r}: use {{000..127}} or {{a,b,c}}")
    return [x for item in items for x in _expand(pre + item + post)]

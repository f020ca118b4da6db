"""A checker, written independently of the generator's logic, that a data-world caption states
only what its scene holds (used by the tests of every caption style)."""

from __future__ import annotations

import re

from clipforge.data.synth.captions import (
    BACKGROUND_WORDS, NUMBER_WORDS, POSITION_PHRASES, RELATION_PHRASES, SHAPE_WORDS, SIZE_WORDS, GENERIC_NOUNS,
)
from clipforge.data.synth.world import COLOURS, POSITIONS, relations


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


SHAPE_OF = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}
SIZE_OF = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
NUM_OF = {w: n for n, ws in NUMBER_WORDS.items() for w in ws} | {"a pair of": 2, "a single": 1}
POS_OF = {p: cell for cell, ps in POSITION_PHRASES.items() for p in ps}
POS_OF |= {f"in the {c}{tail}": c for c in POSITIONS for tail in ("", " of the image", " of the picture")}
REL_OF = {p: r for r, ps in RELATION_PHRASES.items() for p in ps}
# A noun phrase as the captions build it: [number] [size] [colour] noun[s] [postposed colour].
NP = (
    rf"(?:(?P<num{{k}}>{_alt(NUM_OF)}) )?(?:(?P<size{{k}}>{_alt(SIZE_OF)}) )?(?:(?P<colour{{k}}>{_alt(COLOURS)}) )?"
    rf"(?P<noun{{k}}>{_alt(list(SHAPE_OF) + list(GENERIC_NOUNS))})(?:e?s)?"
    rf"(?:(?: in| that is|, colored| coloured) (?P<tail{{k}}>{_alt(COLOURS)}))?"
)
NP_RE = re.compile(rf"\b{NP.format(k='')}\b")
REL_RE = re.compile(rf"\b{NP.format(k='a')}(?: is)? (?P<rel>{_alt(REL_OF)}) an? {NP.format(k='b')}\b")
POS_RE = re.compile(rf"\b{NP.format(k='')} (?P<pos>{_alt(POS_OF)})\b")


def _matching(scene, m: re.Match, k: str = "") -> list:
    """Objects of the scene that fit the noun phrase captured with suffix ``k``."""
    colour = m.group(f"colour{k}") or m.group(f"tail{k}")
    size, noun = m.group(f"size{k}"), m.group(f"noun{k}")
    return [
        o for o in scene.objects
        if (colour is None or o.colour == colour)
        and (size is None or o.size == SIZE_OF[size])
        and (noun in GENERIC_NOUNS or o.shape == SHAPE_OF[noun])
    ]


def check_caption(scene, caption: str) -> None:
    """Fails unless every colour, shape, size, count, background, relation and position the
    caption states is true of the scene. Written independently of the generator's logic."""
    text = caption.lower().rstrip(".")
    words = set(re.findall(r"[a-z0-9]+", text))
    assert words & set(COLOURS) <= {o.colour for o in scene.objects}, caption
    for w, shape in SHAPE_OF.items():
        if re.search(rf"\b{re.escape(w)}", text):
            assert shape in {o.shape for o in scene.objects}, (caption, w)
    for w, size in SIZE_OF.items():
        if re.search(rf"\b{re.escape(w)}\b", text):
            assert size in {o.size for o in scene.objects}, (caption, w)
    for bg, ws in BACKGROUND_WORDS.items():
        if any(re.search(rf"\b{re.escape(w)}\b", text) for w in ws):
            assert bg == scene.background, (caption, bg)
    nps = list(NP_RE.finditer(text))
    assert nps, caption  # every caption names at least one thing
    for m in nps:
        found = _matching(scene, m)
        if m.group("num"):
            assert len(found) == NUM_OF[m.group("num")], (caption, m.group(0))
        else:
            assert found, (caption, m.group(0))
    for m in REL_RE.finditer(text):
        rel = REL_OF[m.group("rel")]
        pairs = [(a, b) for a in _matching(scene, m, "a") for b in _matching(scene, m, "b") if a is not b]
        assert any(rel in relations(a, b) for a, b in pairs), caption
    for m in POS_RE.finditer(text):
        assert any(o.position == POS_OF[m.group("pos")] for o in _matching(scene, m)), caption
    if scene.count == 1:  # any position word at all must agree with the only object's cell
        row = 0 if words & {"top", "upper"} else 2 if words & {"bottom", "lower"} else 1
        col = 0 if "left" in words else 2 if "right" in words else 1
        if words & {"top", "upper", "bottom", "lower", "left", "right", "center", "centre", "middle"}:
            assert POSITIONS[3 * row + col] == scene.objects[0].position, caption

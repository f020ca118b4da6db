"""Free-form captions, varied like web alt-text, that only ever state what the scene holds.

Variety comes from synonyms, word orders, frames ("a photo of ..."), partial descriptions
(any attribute may be left out), counts in words or digits, groups ("two red circles") and
relations ("a red circle to the left of a blue star"). Every phrase is built from the
``Scene``, and synonyms never cross class boundaries (a "disc" is always a circle, never a
ring), so a caption's words can be checked against the scene (see tests/unit/test_synth*). The
one exception is made on purpose: a world with ``polysemy`` calls two shapes "diamond".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from clipforge.data.synth.world import GEM, Obj, Scene, relations

SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "ring": ("ring", "donut"),
    "crescent": ("crescent", "crescent moon"),
}
_IRREGULAR_PLURALS = {"cross": "crosses", "rhombus": "rhombuses"}
SIZE_WORDS = {
    "small": ("small", "tiny", "little"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big"),
}
GENERIC_NOUNS = ("shape", "object", "thing")  # used when the shape itself is left out
NUMBER_WORDS = {1: ("one", "1"), 2: ("two", "2"), 3: ("three", "3")}
BACKGROUND_WORDS = {
    "plain": ("plain", "solid", "blank"),
    "gradient": ("gradient", "fading"),
    "stripes": ("striped", "stripy"),
    "dots": ("dotted", "polka dot", "spotted"),
    "checker": ("checkered", "checkerboard", "chequered"),
    "waves": ("wavy",),
    "grid": ("grid", "lattice"),
    "marble": ("marbled", "cloudy"),
}
# Every phrase names exactly one grid cell: a top-left object is never just "at the top".
POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left", "top-left"),
    "top": ("at the top", "near the top", "in the top middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right", "top-right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left", "bottom-left"),
    "bottom": ("at the bottom", "near the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right", "bottom-right"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above",),
    "below": ("below", "beneath", "under"),
}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# A world with polysemy has a gemstone that captions call by the rhombus's name. Some captions
# add a context word after the name, and those are the only captions that tell the two apart.
POLYSEMOUS_WORD = "diamond"
SENSE_CONTEXTS = {"diamond": ("card symbol", "card suit"), GEM: ("gemstone", "jewel")}
CONTEXT_RATE = 0.35  # of the polysemous name's uses in a noun phrase


class _Writer:
    """Random phrase choices for one caption."""

    def __init__(self, rng: np.random.Generator, polysemy: bool = False) -> None:
        self.rng = rng
        self.polysemy = polysemy

    def shape_word(self, shape: str) -> str:
        return POLYSEMOUS_WORD if shape == GEM else self.pick(SHAPE_WORDS[shape])

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def number(self, n: int) -> str:
        return self.pick(NUMBER_WORDS[n])

    def backdrop(self, scene: Scene) -> str:
        return f"{self.pick(BACKGROUND_WORDS[scene.background])} {self.pick(('background', 'backdrop'))}"

    def position(self, obj: Obj) -> str:
        name = obj.position
        generic = (f"in the {name}", f"in the {name} of the image", f"in the {name} of the picture")
        return self.pick(POSITION_PHRASES[name] + generic)

    def noun_phrase(self, obj: Obj, *, colour: float = 0.85, size: float = 0.45, position: float = 0.0,
                    shape: float = 0.9, free_order: bool = True) -> str:
        """Singular phrase with its article, e.g. 'a big red circle in the top left corner'."""
        use_colour, use_shape = self.chance(colour), self.chance(shape)
        if not (use_colour or use_shape):
            use_shape = True
        noun = self.shape_word(obj.shape) if use_shape else self.pick(GENERIC_NOUNS)
        # Only a polysemy world draws here, so the plain world's random stream is untouched.
        if self.polysemy and noun == POLYSEMOUS_WORD and self.chance(CONTEXT_RATE):
            noun += " " + self.pick(SENSE_CONTEXTS[obj.shape])
        size_word = self.pick(SIZE_WORDS[obj.size]) + " " if self.chance(size) else ""
        if use_colour and use_shape and free_order and self.chance(0.15):
            tail = self.pick((" in {}", " that is {}", ", colored {}", " coloured {}"))
            body = f"{size_word}{noun}{tail.format(obj.colour)}"
        else:
            body = f"{size_word}{obj.colour + ' ' if use_colour else ''}{noun}"
        if self.chance(position):
            body += " " + self.position(obj)
        return article(body) + " " + body

    def group_phrase(self, objs: list[Obj], scene: Scene) -> str:
        """Phrase for all the objects of one colour and shape: 'two red circles', '2 small red discs'.
        Counts are exact, so colour may only be dropped when no other object has this shape."""
        first = objs[0]
        count = self.pick(("a pair of", self.number(2))) if len(objs) == 2 else self.number(len(objs))
        sizes = {o.size for o in objs}
        size_word = self.pick(SIZE_WORDS[first.size]) + " " if len(sizes) == 1 and self.chance(0.3) else ""
        alone = sum(o.shape == first.shape for o in scene.objects) == len(objs)
        colour = "" if alone and self.chance(0.15) else first.colour + " "
        return f"{count} {size_word}{colour}{plural(self.shape_word(first.shape))}"


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def plural(noun: str) -> str:
    last = noun.split(" ")[-1]
    return noun[: len(noun) - len(last)] + _IRREGULAR_PLURALS.get(last, last + "s")


def caption(scene: Scene, rng: np.random.Generator, polysemy: bool = False) -> str:
    """Alt-text style: often a bare label or a keyword list (see styles.py for sentences)."""
    w = _Writer(rng, polysemy)
    text = _single(scene, w) if scene.count == 1 else _multi(scene, w)
    if w.chance(0.4):
        text = text[0].upper() + text[1:]
    if w.chance(0.25):
        text += "."
    return text


def _single(scene: Scene, w: _Writer) -> str:
    obj = scene.objects[0]
    np_ = w.noun_phrase(obj, position=0.4)
    bare = np_.split(" ", 1)[1]  # without the article
    frames = (
        "{np}", "{np}", "a photo of {np}", "an image of {np}", "a picture of {np}", "a drawing of {np}",
        "a rendering of {np}", "{np} on a {bg}", "{np} against a {bg}", "there is {np}", "{bare}",
        "{one} {bare}", "a single {bare}", "just one shape: {np}", "{np}, {bg}", "{bare} icon",
    )
    frame = w.pick(frames)
    if frame == "{bare}" and w.chance(0.3):  # keyword-style alt text: "circle, red"
        return f"{w.shape_word(obj.shape)}, {obj.colour}"
    return frame.format(np=np_, bare=bare, bg=w.backdrop(scene), one=w.number(1))


def relation_parts(w: _Writer, pairs: list) -> tuple[str, str, str]:
    """(noun phrase, relation, noun phrase) of one pair of different objects, either way round
    (the same draws, in the same order, whatever caption style frames them)."""
    a, b = pairs[int(w.rng.integers(len(pairs)))]
    rel = w.pick(relations(a, b))
    if w.chance(0.4):
        a, b, rel = b, a, INVERSE[rel]
    return (w.noun_phrase(a, colour=0.9, size=0.2, free_order=False), rel,
            w.noun_phrase(b, colour=0.9, size=0.2, free_order=False))


def _multi(scene: Scene, w: _Writer) -> str:
    objs = list(scene.objects)
    pairs = [(a, b) for a in objs for b in objs if a.identity != b.identity]
    mode = w.pick(("list", "list", "list", "relation", "relation", "count", "partial"))
    if mode == "relation" and not pairs:
        mode = "list"
    n = w.number(len(objs))
    if mode == "relation":
        npa, rel, npb = relation_parts(w, pairs)
        verb = w.pick((" ", " is "))
        text = f"{npa}{verb}{w.pick(RELATION_PHRASES[rel])} {npb}"
        if len(objs) > 2 and w.chance(0.5):
            return f"{n} {w.pick(GENERIC_NOUNS)}s; {text}"
        return f"a photo of {text}" if verb == " " and w.chance(0.25) else text
    if mode == "count":
        colours, shapes = {o.colour for o in objs}, {o.shape for o in objs}
        if len(shapes) == 1 and w.chance(0.5):
            where = f" on a {w.backdrop(scene)}" if w.chance(0.5) else ""
            return f"{n} {plural(w.shape_word(objs[0].shape))}{where}"
        if len(colours) == 1 and w.chance(0.5):
            return f"{n} {objs[0].colour} {w.pick(GENERIC_NOUNS)}s"
        frame = w.pick(
            ("{n} shapes", "{n} objects", "a group of {n} shapes", "{n} things on a {bg}", "an image with {n} shapes")
        )
        return frame.format(n=n, bg=w.backdrop(scene))
    if mode == "partial":
        obj = objs[int(w.rng.integers(len(objs)))]
        others = [o for o in objs if o is not obj]
        if len(others) > 1:
            link = w.pick(("and", "with", "among"))
            rest = w.pick(("other shapes", "some other shapes", "other objects"))
        else:
            link, rest = w.pick(("and", "with")), w.pick(("another shape", "another object"))
        return f"{w.noun_phrase(obj, position=0.3)} {link} {rest}"
    # "list": each identity once, repeated identities counted.
    groups: dict[tuple[str, str], list[Obj]] = defaultdict(list)
    for o in objs:
        groups[o.identity].append(o)
    parts = [w.noun_phrase(g[0], position=0.2) if len(g) == 1 else w.group_phrase(g, scene) for g in groups.values()]
    order = w.rng.permutation(len(parts))
    parts = [parts[i] for i in order]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + w.pick((" and ", ", and ")) + parts[-1]
    frame = w.pick(("{l}", "{l}", "a photo of {l}", "{l} on a {bg}", "{n} shapes: {l}", "an image showing {l}"))
    return frame.format(l=listed, bg=w.backdrop(scene), n=n)


def attribute_word_groups() -> dict[str, list[list[str]]]:
    """The caption words of each attribute, grouped by value (synonyms together): what swapped-word
    negatives exchange (``TrainConfig.swap_words``). Plural shape names form their own attribute,
    so that a swap keeps a caption's number; position words are the single words the position
    and relation phrases are made of."""
    from clipforge.data.synth.world import COLOURS

    return {
        "colour": [[c] for c in COLOURS],
        "shape": [list(words) for words in SHAPE_WORDS.values()],
        "shapes": [[plural(w) for w in words] for words in SHAPE_WORDS.values()],
        "size": [list(words) for words in SIZE_WORDS.values()],
        "number": [list(words) for words in NUMBER_WORDS.values()],
        "place": [["left"], ["right"], ["top", "upper", "above"], ["bottom", "lower", "below", "beneath", "under"],
                  ["center", "centre", "middle"]],
    }

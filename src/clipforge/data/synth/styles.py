"""Caption styles: the keyword-style alt text of ``captions.py``, or full sentences.

With ``caption_style='sentence'`` a caption is a sentence around the same true phrases ("The
picture shows a red circle on a striped background."), and a bare label ("red circle") is
rare (``BARE_RATE``), as in the paper's web text. A prompt template such as "a photo of a {}."
is then close to what the model saw, and the bare class name is not.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from clipforge.data.synth.captions import GENERIC_NOUNS, RELATION_PHRASES, _Writer, caption, relation_parts
from clipforge.data.synth.world import Obj, Scene, SynthConfig

BARE_RATE = 0.02  # sentence captions that are a bare label all the same
# Frames avoid position, colour, shape and background words, so a caption states only what
# its phrases state (the caption checker of the tests reads every such word).
SINGLE_FRAMES = (
    "This is a photo of {np}.", "The image shows {np} on a {bg}.", "Here we see {np}.",
    "There is {np} on a {bg}.", "In this picture there is {np}.", "A photo of {np}, drawn on a {bg}.",
    "This picture shows {np} against a {bg}.", "You can see {np} in this image.",
    "The picture contains {np}.", "A simple drawing of {np} on a {bg}.", "{NP} is shown on a {bg}.",
    "{NP} sits alone on a {bg}.",
)
LIST_FRAMES = (
    "This image shows {l}.", "The picture contains {l} on a {bg}.", "Here we see {l}.",
    "A photo of {l}, all on a {bg}.", "In this picture we can see {l}.", "The image has {l} on a {bg}.",
)


def write_caption(scene: Scene, rng: np.random.Generator, cfg: SynthConfig) -> str:
    """The caption of ``scene`` in the world's caption style."""
    if cfg.caption_style == "alt":
        return caption(scene, rng, cfg.polysemy)
    w = _Writer(rng, cfg.polysemy)
    if w.chance(BARE_RATE):
        obj = scene.objects[int(w.rng.integers(scene.count))]
        return w.noun_phrase(obj, free_order=False).split(" ", 1)[1]  # without its article
    return _single(scene, w) if scene.count == 1 else _multi(scene, w)


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _single(scene: Scene, w: _Writer) -> str:
    np_ = w.noun_phrase(scene.objects[0], position=0.4)
    return w.pick(SINGLE_FRAMES).format(np=np_, NP=_capital(np_), bg=w.backdrop(scene))


def _multi(scene: Scene, w: _Writer) -> str:
    objs = list(scene.objects)
    n = w.number(len(objs))
    pairs = [(a, b) for a in objs for b in objs if a.identity != b.identity]
    if pairs and w.chance(0.35):
        npa, rel, npb = relation_parts(w, pairs)
        text = f"{_capital(npa)} is {w.pick(RELATION_PHRASES[rel])} {npb}"
        if len(objs) > 2 and w.chance(0.5):
            return f"{text}, among {n} {w.pick(GENERIC_NOUNS)}s in all."
        return text + "."
    groups: dict[tuple[str, str], list[Obj]] = defaultdict(list)
    for o in objs:
        groups[o.identity].append(o)
    parts = [w.noun_phrase(g[0], position=0.2) if len(g) == 1 else w.group_phrase(g, scene) for g in groups.values()]
    parts = [parts[i] for i in w.rng.permutation(len(parts))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + w.pick((" and ", ", and ")) + parts[-1]
    if w.chance(0.25):
        return f"There are {n} {w.pick(GENERIC_NOUNS)}s in this picture: {listed}."
    return w.pick(LIST_FRAMES).format(l=listed, bg=w.backdrop(scene))

"""What the paper's mechanisms in a world are, for world.json, and how to measure them from the
generated files.

Each mechanism is a ``SynthConfig`` option, off by default: sentence captions
(``caption_style``), a polysemous class name (``polysemy``), a spurious background cue
(``spurious``) and 80-template ensembles (``template_set``). ``mechanisms`` describes the ones
that are on; the measures read only captions and label columns, so they work on any world.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from clipforge.data.synth.captions import (
    CONTEXT_RATE, GENERIC_NOUNS, NUMBER_WORDS, POLYSEMOUS_WORD, SENSE_CONTEXTS, SHAPE_WORDS, SIZE_WORDS,
)
from clipforge.data.synth.ensembles import CONTEXTS, TEMPLATES_PER_TASK
from clipforge.data.synth.styles import BARE_RATE
from clipforge.data.synth.tasks import SENSE_CLASSES
from clipforge.data.synth.world import COLOURS, CUE_SPLITS, GEM, SEEN_BACKGROUNDS, World

# Words of a bare label: attributes, nouns, counts and the glue of a keyword list ("circle, red",
# "two red circles and a star"). A caption made only of these says nothing beyond the label.
_LABEL_WORDS = (
    set(COLOURS) | {p for ws in SHAPE_WORDS.values() for w in ws for p in w.split()}
    | {p for ws in SIZE_WORDS.values() for w in ws for p in w.split()} | set(GENERIC_NOUNS)
    | {w for ws in NUMBER_WORDS.values() for w in ws} | {POLYSEMOUS_WORD, "a", "an", "and", "pair", "of", "single", "icon"}
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9-]+", text.lower())


def _label_word(word: str) -> bool:
    return word in _LABEL_WORDS or word[:-1] in _LABEL_WORDS or word.endswith("es") and word[:-2] in _LABEL_WORDS


def is_bare_label(caption: str) -> bool:
    """True when the caption is nothing but a label: attribute words and nouns, no sentence."""
    words = _words(caption)
    return bool(words) and all(_label_word(w) for w in words)


def bare_label_fraction(captions: Iterable[str]) -> float:
    flags = [is_bare_label(c) for c in captions]
    return sum(flags) / max(1, len(flags))


def cue_agreement(rows: Iterable[Mapping[str, Any]], cue_map: Mapping[str, str], attribute: str = "shape") -> float:
    """Fraction of labelled rows whose background is the one the cue map gives their class
    (1 / number of seen backgrounds, 0.2, when background and class are independent)."""
    hits = [row["background"] == cue_map[row[attribute]] for row in rows if row.get(attribute)]
    return sum(hits) / max(1, len(hits))


def mechanisms(world: World) -> dict[str, Any]:
    """world.json's record of the mechanisms that are on; empty in a plain world."""
    cfg, out = world.config, {}
    if cfg.caption_style == "sentence":
        out["caption_style"] = {
            "style": "sentence", "bare_label_rate": BARE_RATE,
            "description": "captions are full sentences around the scene's phrases; a bare label is rare",
        }
    if cfg.polysemy:
        drawn = {"diamond": "rhombus", GEM: "cut gemstone (flat top, pointed bottom)"}
        out["polysemy"] = {
            "word": POLYSEMOUS_WORD, "task": "sense", "label_column": "sense", "context_rate": CONTEXT_RATE,
            "senses": {shape: {"class": SENSE_CLASSES[shape], "shape_label": shape, "drawn_as": drawn[shape],
                               "context_words": list(SENSE_CONTEXTS[shape])} for shape in SENSE_CLASSES},
            "description": f"two shapes are both called '{POLYSEMOUS_WORD}'; only a context word after the "
                           f"name (in {CONTEXT_RATE:.0%} of its uses) tells them apart",
        }
    if cfg.spurious:
        splits = [s for s, n in cfg.split_sizes().items() if n]
        out["spurious"] = {
            "strength": cfg.spurious, "attribute": "shape", "cue": "background",
            "cue_map": {shape: world.cue_background(shape) for shape in world.shapes},
            "splits": [s for s in CUE_SPLITS if s in splits],
            "broken_in": [s for s in splits if s not in CUE_SPLITS],
            "chance_agreement": 1 / len(SEEN_BACKGROUNDS),
            "description": "in the training distribution (train, val, test) the background texture is the "
                           "shape's cue_map entry with probability 'strength' (else uniform); in every other "
                           "split it is independent of the shape",
        }
    if cfg.template_set == "paper":
        out["template_set"] = {
            "name": "paper", "templates_per_task": TEMPLATES_PER_TASK, "contexts": len(CONTEXTS),
            "description": "every task's ensemble is its phrases in 40 contexts (quality, medium, rendering, "
                           "backdrop), 80 templates, as the paper's ImageNet ensemble",
        }
    return out

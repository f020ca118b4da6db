"""Prompt ensembles built the paper's way: 80 templates per task, each the task's phrase in a
different context (photo quality, medium, rendering, backdrop).

The paper's ImageNet ensemble varies what surrounds the class name ("a blurry photo of a {}.",
"a drawing of a {}.", "a {} on a plain background." ...), so averaging over it cancels the
quirks of any one context. Here every task has a few *cores*, its phrase with the class slot
("a {} shape" for colour, "a shape in the {}" for position), and ``CONTEXTS`` holds 40 frames
around a core; template ``i`` is frame ``i mod 40`` around one core, with the cores rotating so
that no two of the 80 are alike. Frames say nothing about colour, shape, size, position or count,
so a template never contradicts a class.
"""

from __future__ import annotations

TEMPLATES_PER_TASK = 80
CONTEXTS = (
    "a photo of {c}.", "a bad photo of {c}.", "a good photo of {c}.", "a blurry photo of {c}.",
    "a sharp photo of {c}.", "a close-up photo of {c}.", "a cropped photo of {c}.", "a bright photo of {c}.",
    "a dark photo of {c}.", "a low resolution photo of {c}.", "a noisy photo of {c}.", "a grainy photo of {c}.",
    "a jpeg photo of {c}.", "a clean photo of {c}.", "a picture of {c}.", "an image of {c}.",
    "an image showing {c}.", "a drawing of {c}.", "a sketch of {c}.", "an outline drawing of {c}.",
    "a line drawing of {c}.", "a rendering of {c}.", "a painting of {c}.", "a cartoon of {c}.",
    "a clip art of {c}.", "an icon of {c}.", "a sticker of {c}.", "a pixelated image of {c}.",
    "a rotated image of {c}.", "a tilted picture of {c}.", "{c} on a background.", "{c} on a patterned background.",
    "{c} on a textured background.", "{c} against a grey backdrop.", "a simple diagram of {c}.",
    "a digital illustration of {c}.", "a screenshot of {c}.", "a scan of {c}.", "there is {c} in the picture.",
    "this is {c}.",
)
# Each task's phrases around the class slot "{}" (and the relation task's "{a}" and "{b}").
CORES = {
    "colour": ("a {} shape", "a {} object", "a {} thing", "the {} shape"),
    "shape": ("a {}", "the {}", "a {} shape", "one {}"),
    "size": ("a {} shape", "a {} object", "the {} shape", "a {} thing"),
    "position": ("a shape in the {}", "an object in the {}", "a shape in the {} of the image",
                 "a thing in the {} of the picture"),
    "count": ("{}", "exactly {}"),
    "relation": ("{a} {} {b}", "{a} that is {} {b}"),
    "sense": ("a {}", "the {}"),
}


def paper_templates(task: str) -> list[str]:
    """The 80 templates of ``task``: distinct, each with exactly one "{}"."""
    cores = CORES[task]
    assert len(cores) >= 2 and 2 * len(CONTEXTS) >= TEMPLATES_PER_TASK  # else two templates coincide
    out = []
    for i in range(TEMPLATES_PER_TASK):
        frame = CONTEXTS[i % len(CONTEXTS)]
        core = cores[(i + i // len(CONTEXTS)) % len(cores)]  # the second pass shifts the core
        out.append(frame.replace("{c}", core))
    return out

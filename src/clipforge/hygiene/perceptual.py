"""The perceptual signal beside embeddings: aligned colour thumbnails, compared after undoing the edits.

A semantic embedding puts two different photos of one thing close together; a near-duplicate
is the *same* picture, background and all. So a candidate pair is checked on pixels: each image
becomes a small blurred colour thumbnail (16x16 RGB, mean removed, unit length: robust to JPEG,
resizing and brightness/contrast jitter), and the query image is also thumbnailed under the edits
a copy may have had (``views``: mirrored or not, crops keeping 80-100% of each side on a 5x5 grid
of positions, rotations of +-5 and +-10 degrees). The pair's similarity is the best view's
cosine, so a crop, flip or rotation of the query scores like an untouched copy.

The thumbnail's blur washes out what tells two renders of one scene apart (a plain background
from a fine checkerboard, stripe spacing), so a pair that passes gets a sharper second look
(``fine_similarity``): the best-aligned views, re-rendered at 24x24 with little blur and their
crop box or angle refined in sub-thumbnail steps, against the candidate at the same size.

    q = views(test_image)                   # [V, D]
    similarity(q, descriptor(train_image))  # 0.99 for an edited copy, lower for a look-alike
    fine_similarity(test_image, train_image, q)  # the sharper second look at a pair that passed
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

SIDE = 16  # thumbnail side: coarse enough to ignore JPEG blocks, fine enough to see the background
BLUR = 1.0  # thumbnail pixels: a view a fraction of a pixel off its copy still matches
WORK = 64  # images are squared to this first, so views cost the same for any input size
SCALES = np.linspace(1.0, 0.8, 9)[1:]  # crop sides the views try (the edits keep 80-100%)
POSITIONS = 5  # crop offsets per axis
ANGLES = (-10, -5, 5, 10)
FINE_SIDE, FINE_BLUR = 24, 0.5  # sharp enough to see textures, coarse enough to survive JPEG at quality 30
FINE_TOP = 2  # best coarse views refined
FINE_STEP = 0.8  # refinement step in WORK pixels: half the coarse grid's scale step


def _square(img: Image.Image) -> Image.Image:
    rgb = img.convert("RGB")
    return rgb.resize((WORK, WORK), Image.BOX if min(rgb.size) >= WORK else Image.BICUBIC)


def _render(sq: Image.Image, spec: tuple, side: int, blur: float) -> np.ndarray:
    """The unit, mean-removed thumbnail [side*side*3] of squared image ``sq`` under view ``spec``."""
    flip, box, angle = spec
    base = sq.transpose(Image.FLIP_LEFT_RIGHT) if flip else sq
    if angle:
        # Corners filled with the mean colour, as the rotation edit fills them.
        fill = tuple(int(v) for v in np.asarray(base).reshape(-1, 3).mean(0))
        base = base.rotate(angle, resample=Image.BICUBIC, fillcolor=fill)
    t = base.resize((side, side), Image.BOX, box=box)
    if blur:
        t = t.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(t, np.float32).ravel()
    a = a - a.mean()  # brightness shifts leave the pattern alone
    return a / (np.linalg.norm(a) + 1e-6)


def descriptor(img: Image.Image) -> np.ndarray:
    """The thumbnail descriptor [D] of ``img`` as it is."""
    return _render(_square(img), (False, None, 0.0), SIDE, BLUR)


@lru_cache(maxsize=1)
def _specs() -> list[tuple]:
    """Every view ``views`` renders, as (mirrored, crop box or None, angle); the unedited view first."""
    boxes = []
    for f in SCALES:
        side = WORK * f
        for x in np.linspace(0, WORK - side, POSITIONS):
            for y in np.linspace(0, WORK - side, POSITIONS):
                boxes.append((float(x), float(y), float(x + side), float(y + side)))
    out = []
    for flip in (False, True):
        out.append((flip, None, 0.0))
        out.extend((flip, b, 0.0) for b in boxes)
        out.extend((flip, None, float(a)) for a in ANGLES)
    return out


def views(img: Image.Image) -> np.ndarray:
    """Descriptors [V, D] of ``img`` under every edit the check undoes (the unedited view first)."""
    sq = _square(img)
    return np.stack([_render(sq, spec, SIDE, BLUR) for spec in _specs()])


def _nearby(spec: tuple) -> list[tuple]:
    """Views around ``spec``: the coarse grid's gaps filled, so a sharp thumbnail still lines up."""
    flip, box, angle = spec
    if angle:
        return [(flip, None, angle + d) for d in np.arange(-2.5, 2.51, 0.5)]  # the grid is 5 degrees apart
    x0, y0, x1, _ = box if box is not None else (0.0, 0.0, float(WORK), float(WORK))
    out = []
    steps = FINE_STEP * np.arange(-2, 3)
    for ds in steps:
        side = min(WORK, x1 - x0 + ds)
        for dx in steps:
            for dy in steps:
                x = min(max(0.0, x0 + dx - ds / 2), WORK - side)
                y = min(max(0.0, y0 + dy - ds / 2), WORK - side)
                out.append((flip, (x, y, x + side, y + side), 0.0))
    return out


def fine_similarity(query: Image.Image, other: Image.Image, query_views: np.ndarray | None = None,
                    other_descriptor: np.ndarray | None = None) -> float:
    """The sharper second look: best cosine of 24x24 renders of the query's best-aligned views, refined,
    to ``other`` rendered the same way. query_views: ``views(query)``, other_descriptor:
    ``descriptor(other)``, when already computed (the thumbnail check that came first has both)."""
    q = views(query) if query_views is None else query_views
    so = _square(other)
    d = _render(so, (False, None, 0.0), SIDE, BLUR) if other_descriptor is None else other_descriptor
    target = _render(so, (False, None, 0.0), FINE_SIDE, FINE_BLUR)
    sq, specs = _square(query), _specs()
    best = -1.0
    for v in np.argsort(-(q @ d))[:FINE_TOP]:
        for spec in _nearby(specs[int(v)]):
            best = max(best, float(_render(sq, spec, FINE_SIDE, FINE_BLUR) @ target))
    return best


def similarity(query_views: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Best-view cosine of a query (``views``) to one descriptor [D] or each of several [m, D]."""
    return (np.atleast_2d(other) @ query_views.T).max(1) if other.ndim == 2 else (query_views @ other).max()

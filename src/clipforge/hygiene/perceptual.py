"""The perceptual signal beside embeddings: aligned colour thumbnails, compared after undoing the edits.

A semantic embedding puts two different photos of one thing close together; a near-duplicate
is the *same* picture, background and all. So a candidate pair is checked on pixels: each image
becomes a small blurred colour thumbnail (16x16 RGB, mean removed, unit length: robust to JPEG,
resizing and brightness/contrast jitter), and the query image is also thumbnailed under the edits
a copy may have had (``views``: mirrored or not, crops keeping 80-100% of each side on a 5x5 grid
of positions, rotations of +-5 and +-10 degrees). The pair's similarity is the best view's
cosine, so a crop, flip or rotation of the query scores like an untouched copy.

    q = views(test_image)                   # [V, D]
    similarity(q, descriptor(train_image))  # 0.99 for an edited copy, lower for a look-alike
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


def _square(img: Image.Image) -> Image.Image:
    rgb = img.convert("RGB")
    return rgb.resize((WORK, WORK), Image.BOX if min(rgb.size) >= WORK else Image.BICUBIC)


def _thumb(img: Image.Image, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    t = img.resize((SIDE, SIDE), Image.BOX, box=box).filter(ImageFilter.GaussianBlur(BLUR))
    a = np.asarray(t, np.float32).ravel()  # [SIDE*SIDE*3]
    a = a - a.mean()  # brightness shifts leave the pattern alone
    return a / (np.linalg.norm(a) + 1e-6)


def descriptor(img: Image.Image) -> np.ndarray:
    """The thumbnail descriptor [D] of ``img`` as it is."""
    return _thumb(_square(img))


@lru_cache(maxsize=1)
def _boxes() -> list[tuple[float, float, float, float]]:
    out = []
    for f in SCALES:
        side = WORK * f
        for x in np.linspace(0, WORK - side, POSITIONS):
            for y in np.linspace(0, WORK - side, POSITIONS):
                out.append((float(x), float(y), float(x + side), float(y + side)))
    return out


def views(img: Image.Image) -> np.ndarray:
    """Descriptors [V, D] of ``img`` under every edit the check undoes (the unedited view first)."""
    sq = _square(img)
    out = []
    for base in (sq, sq.transpose(Image.FLIP_LEFT_RIGHT)):
        out.append(_thumb(base))
        out.extend(_thumb(base, b) for b in _boxes())
        # Corners filled with the mean colour, as the rotation edit fills them.
        fill = tuple(int(v) for v in np.asarray(base).reshape(-1, 3).mean(0))
        out.extend(_thumb(base.rotate(a, resample=Image.BICUBIC, fillcolor=fill)) for a in ANGLES)
    return np.stack(out)


def similarity(query_views: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Best-view cosine of a query (``views``) to one descriptor [D] or each of several [m, D]."""
    return (np.atleast_2d(other) @ query_views.T).max(1) if other.ndim == 2 else (query_views @ other).max()

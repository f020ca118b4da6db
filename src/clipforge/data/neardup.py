"""Near-duplicate augmentations: the edits that turn an image into a copy a dataset may hold twice.

One function per kind, each drawing its parameters from the generator it is given, so a planted
copy (``synth/flaws.py``) and a calibration pair (``hygiene``) are both reproducible:

    img2, params = augment(img, "crop", np.random.default_rng(0))   # params: {"kind": "crop", "frac": 0.87, ...}

Kinds and ranges (the ones web crawls produce): crops keeping 80-100% of each side, JPEG
re-encoding at quality 30-90, resizing by 0.5-1.5x, horizontal flips, colour jitter (brightness,
contrast, saturation each within +-20%), rotations within +-10 degrees.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

KINDS = ("crop", "jpeg", "resize", "flip", "jitter", "rotate")


def _crop(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    w, h = img.size
    frac = float(rng.uniform(0.8, 1.0))
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    # Back to the original size, as a re-hosted crop usually is.
    return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC), {"frac": round(frac, 3), "x": x, "y": y}


def _jpeg(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    quality = int(rng.integers(30, 91))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB"), {"quality": quality}


def _resize(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    scale = float(rng.uniform(0.5, 1.5))
    w, h = img.size
    return img.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BICUBIC), {"scale": round(scale, 3)}


def _flip(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    return img.transpose(Image.FLIP_LEFT_RIGHT), {}


def _jitter(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    b, c, s = (float(v) for v in rng.uniform(0.8, 1.2, 3))
    out = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(img.convert("RGB")).enhance(b)).enhance(c))
    return out.enhance(s), {"brightness": round(b, 3), "contrast": round(c, 3), "saturation": round(s, 3)}


def _rotate(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    angle = float(rng.uniform(-10, 10))
    rgb = img.convert("RGB")
    # Corners filled with the image's mean colour: black corners would be an edit of their own.
    fill = tuple(int(v) for v in np.asarray(rgb).reshape(-1, 3).mean(0))
    return rgb.rotate(angle, resample=Image.BICUBIC, fillcolor=fill), {"angle": round(angle, 2)}


_AUGMENT: dict[str, Callable[[Image.Image, np.random.Generator], tuple[Image.Image, dict[str, Any]]]] = {
    "crop": _crop, "jpeg": _jpeg, "resize": _resize, "flip": _flip, "jitter": _jitter, "rotate": _rotate,
}


def augment(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """A near-duplicate of ``img`` made by one edit of ``kind``, and that edit's parameters."""
    if kind not in _AUGMENT:
        raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(KINDS)}")
    out, params = _AUGMENT[kind](img.convert("RGB"), rng)
    return out, {"kind": kind, **params}

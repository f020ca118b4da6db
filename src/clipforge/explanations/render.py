"""Pictures of explanation maps: the model's view of an image (the centre crop its preprocessing
takes, at a size people can see), a map laid over it, and a panel of maps with their queries.

PIL and NumPy only; the colour scale is a perceptual dark-blue -> yellow ramp (viridis-like), so a
map reads the same in grey print.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from clipforge.config import PreprocessConfig

# Anchor colours of the ramp, low to high (sampled from viridis at 0, 0.25, 0.5, 0.75, 1).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float32)
VIEW_SIZE = 224  # the side of the pictures, whatever the model's input size


def colourise(heat: np.ndarray | torch.Tensor) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 on the ramp."""
    h = np.clip(np.asarray(heat, np.float32), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(h).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (h - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac + 0.5).astype(np.uint8)


def model_view(image: Image.Image, cfg: PreprocessConfig, size: int = VIEW_SIZE) -> Image.Image:
    """The part of ``image`` the model sees (its preprocessing's resize and crop), ``size`` square."""
    image = image.convert("RGB")
    if cfg.resize_mode == "squash":
        return image.resize((size, size), Image.BICUBIC)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def overlay(view: Image.Image, heat: np.ndarray | torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """``heat`` ([H, W] in [0, 1], any size) coloured and blended over ``view``."""
    heat = np.asarray(heat, np.float32)
    layer = Image.fromarray(colourise(heat)).resize(view.size, Image.BILINEAR)
    return Image.blend(view.convert("RGB"), layer, alpha)


def panel(view: Image.Image, maps: Sequence[np.ndarray | torch.Tensor], labels: Sequence[str],
          alpha: float = 0.55) -> Image.Image:
    """The view, then one overlay per map, side by side, each with its label underneath."""
    tiles = [view.convert("RGB")] + [overlay(view, m, alpha) for m in maps]
    names = ["image"] + [_short(s) for s in labels]
    w, h = view.size
    caption = 18
    out = Image.new("RGB", (w * len(tiles) + 4 * (len(tiles) - 1), h + caption), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, (tile, name) in enumerate(zip(tiles, names)):
        x = i * (w + 4)
        out.paste(tile, (x, 0))
        draw.text((x + 3, h + 3), name, fill=(20, 20, 20), font=font)
    return out


def _short(text: str, limit: int = 34) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"

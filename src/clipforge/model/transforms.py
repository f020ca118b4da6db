"""Image preprocessing. The eval transform is OpenAI's: bicubic resize of the short side,
center crop, RGB, normalise. Its settings come from the checkpoint's PreprocessConfig."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from clipforge.config import PreprocessConfig

_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB") if image.mode != "RGB" else image


def eval_transform(cfg: PreprocessConfig) -> Callable[[Image.Image], torch.Tensor]:
    size = cfg.image_size
    if cfg.resize_mode == "squash":
        resize: list[Callable] = [T.Resize((size, size), interpolation=_INTERP[cfg.interpolation])]
    else:
        resize = [T.Resize(size, interpolation=_INTERP[cfg.interpolation]), T.CenterCrop(size)]
    return T.Compose([*resize, _to_rgb, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def train_transform(
    cfg: PreprocessConfig, scale: tuple[float, float] = (0.9, 1.0)
) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (as OpenCLIP trains), then the same normalisation."""
    return T.Compose([
        T.RandomResizedCrop(cfg.image_size, scale=scale, interpolation=_INTERP[cfg.interpolation]),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(cfg.mean, cfg.std),
    ])

"""Image preprocessing. The eval transform is OpenAI's: bicubic resize of the short side,
center crop, RGB, normalise. Its settings come from the checkpoint's PreprocessConfig."""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from clipforge.config import DEFAULT_CROP_SCALE, PreprocessConfig

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


class RandomResizedCropNormalize:
    """OpenCLIP's training transform (RandomResizedCrop, RGB, ToTensor, Normalize) in one pass.

    Same crop distribution as torchvision's RandomResizedCrop (area fraction uniform in ``scale``,
    aspect ratio log-uniform in ``ratio``, ten attempts, then a centre crop of clamped ratio);
    the crop and the resize are one Pillow call (whose filter reads the pixels just outside the
    crop rather than repeating its edge: equal inside, a little sharper at the border), the
    conversion and normalisation one fused tensor expression: fewer calls, which matters on small
    images where per-call overhead dominates. The randomness comes from Python's ``random``, which the loader seeds per sample.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad crop range: scale={scale}, ratio={ratio}")
        self.size, self.interpolation = size, interpolation
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        # With the whole area and square allowed, every draw on a square image yields the whole
        # image (an exact fit, or the fallback): crop_box then skips the ten draws, which were a
        # quarter of the transform (22 of 92 us per sample under cProfile; the demo trains this way).
        self.whole_square = self.scale == (1.0, 1.0) and self.ratio[0] <= 1.0 <= self.ratio[1]
        self.resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
        # (x/255 - mean)/std == (x - 255 mean) * 1/(255 std), over the channel-last pixels
        self.offset = torch.tensor([255.0 * m for m in mean])
        self.scale_by = 1.0 / torch.tensor([255.0 * s for s in std])

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop, as torchvision's get_params draws it."""
        if self.whole_square and width == height:
            return 0, 0, width, height
        area = width * height
        for _ in range(10):
            target = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                return left, top, left + w, top + h
        in_ratio = width / height  # fallback: the centre crop of the nearest allowed ratio
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def fixed_for(self, width: int, height: int) -> bool:
        """Whether every draw crops a ``width`` x ``height`` image the same way (the whole of it),
        so that its ``pixels`` can be computed once and kept."""
        return self.whole_square and width == height

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The crop, resized: uint8 [H, W, 3]. ``normalize`` finishes a stack of them at once,
        one tensor expression per batch instead of per image (the loader does this)."""
        box = self.crop_box(*image.size)
        out = _to_rgb(image).resize((self.size, self.size), self.resample, box=box)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy())

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., H, W, 3] -> normalised float [..., 3, H, W], contiguous."""
        x = pixels.float().sub_(self.offset).mul_(self.scale_by)
        return x.movedim(-1, -3).contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))  # [3, H, W]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation})")


def train_transform(
    cfg: PreprocessConfig, scale: tuple[float, float] = DEFAULT_CROP_SCALE
) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (as OpenCLIP trains), then the same normalisation."""
    return RandomResizedCropNormalize(cfg.image_size, scale, (3 / 4, 4 / 3), cfg.interpolation, cfg.mean, cfg.std)

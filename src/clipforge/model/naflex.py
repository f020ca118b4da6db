"""SigLIP 2's NaFlex inputs: each image at its own aspect ratio, cut into at most ``max_patches``
patches, as Hugging Face's Siglip2ImageProcessor prepares them for Siglip2Model.

An image of h x w pixels is resized (bilinear, antialiased) to the largest size whose sides are
multiples of the patch size and whose patch count fits ``max_patches``, normalised, cut into
patches (rows, then columns; each patch's pixels row by row, channels last) and padded to
``max_patches`` with a mask. The image tower (``SiglipVisionTower``) embeds the patches, resizes its
position table to each image's grid and masks the padding out of attention and pooling, so
``model.encode_image(naflex_inputs(images, model))`` gives what transformers' Siglip2Model gives.
The commands (eval, embed, serve) feed fixed square images; NaFlex is the Python API's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.imageio import as_rgb


@dataclass
class NaFlexBatch:
    """Patches [B, N, p*p*3], mask [B, N] (True: a patch of the image, False: padding), and each
    image's grid [B, 2] (rows, columns of patches)."""

    patches: torch.Tensor
    mask: torch.Tensor
    spatial_shapes: torch.Tensor

    def to(self, device: torch.device | str) -> "NaFlexBatch":
        return NaFlexBatch(self.patches.to(device), self.mask.to(device), self.spatial_shapes.to(device))


def naflex_size(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """The resized (height, width): each side a multiple of ``patch`` (at least one patch), the
    largest common scale whose patch count fits ``max_patches``."""

    def sides(scale: float) -> tuple[int, int]:
        return (max(1, math.ceil(height * scale / patch)), max(1, math.ceil(width * scale / patch)))

    # The patch count only grows with the scale, so bisection finds the largest scale that fits;
    # to the processor's resolution (1e-5), so that sizes at a boundary round as they do there.
    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        rows, cols = sides(mid)
        if rows * cols <= max_patches:
            lo = mid
        else:
            hi = mid
    rows, cols = sides(lo)
    return rows * patch, cols * patch


def _patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[3, H, W] -> [(H/p)*(W/p), p*p*3]: patches row-major, pixels row-major, channels last."""
    c, h, w = image.shape
    x = image.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)
    return x.reshape((h // patch) * (w // patch), patch * patch * c)


def naflex_inputs(images: Sequence[Image.Image], patch: int, max_patches: int = 256,
                  mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)) -> NaFlexBatch:
    """A NaFlex batch of PIL images (Siglip2ImageProcessor's defaults: 256 patches, mean/std 0.5)."""
    from torchvision.transforms.v2 import functional as TF

    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    dim = patch * patch * 3
    patches = torch.zeros(len(images), max_patches, dim)
    mask = torch.zeros(len(images), max_patches, dtype=torch.bool)
    shapes = torch.zeros(len(images), 2, dtype=torch.long)
    for i, img in enumerate(images):
        pixels = TF.pil_to_tensor(as_rgb(img))  # [3, H, W] uint8
        h, w = naflex_size(pixels.shape[-2], pixels.shape[-1], patch, max_patches)
        pixels = TF.resize(pixels, [h, w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        x = _patchify((pixels.float() / 255.0 - m) / s, patch)
        patches[i, : len(x)], mask[i, : len(x)] = x, True
        shapes[i] = torch.tensor([h // patch, w // patch])
    return NaFlexBatch(patches, mask, shapes)


def resized_positions(table: torch.Tensor, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
    """A square position table [g*g, W] resized to each image's grid (bilinear, antialiased), laid
    out as its patches and zero-padded: [B, length, W]."""
    g = math.isqrt(table.shape[0])
    grid = table.reshape(g, g, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, W, g, g]
    out = torch.zeros(len(spatial_shapes), length, table.shape[1], dtype=table.dtype, device=table.device)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for i, (rows, cols) in enumerate(spatial_shapes.tolist()):
        if (rows, cols) not in cache:
            resized = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
            cache[(rows, cols)] = resized[0].flatten(1).t().to(table.dtype)  # [rows*cols, W]
        out[i, : rows * cols] = cache[(rows, cols)]
    return out


def patch_weight(conv: torch.nn.Conv2d) -> torch.Tensor:
    """The patch-embedding conv [W, 3, p, p] as the linear map on flattened patches [W, p*p*3]."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)

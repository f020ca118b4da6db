"""The one-pass training transform matches torchvision's RandomResizedCrop + ToTensor + Normalize:
the same pixels for the same crop, the same crop distribution."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from clipforge.config import PreprocessConfig
from clipforge.model.transforms import _INTERP, RandomResizedCropNormalize, train_transform

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _image(w=80, h=60, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_same_crop_same_pixels_as_torchvision():
    img = _image()
    fast = RandomResizedCropNormalize(32, (0.5, 1.0), (3 / 4, 4 / 3), "bicubic", MEAN, STD)
    random.seed(3)
    left, top, right, bottom = fast.crop_box(*img.size)
    random.seed(3)
    got = fast(img)
    ref = T.Normalize(MEAN, STD)(T.ToTensor()(
        TF.resized_crop(img, top, left, bottom - top, right - left, [32, 32], _INTERP["bicubic"])))
    assert got.shape == ref.shape == (3, 32, 32) and got.is_contiguous() and got.dtype == torch.float32
    # Inside, identical; on the outer 3 pixels the filter reads the real pixels beyond the crop's
    # edge instead of repeating the edge (Pillow's resize with a box), which differs on noise.
    assert (got - ref)[:, 3:-3, 3:-3].abs().max() < 1e-3
    assert (got - ref).abs().mean() < 1 / 255 / min(STD)


def test_crop_distribution_matches_torchvision():
    w, h, n = 120, 90, 4000
    fast = RandomResizedCropNormalize(16, (0.3, 1.0), (3 / 4, 4 / 3), "bilinear", MEAN, STD)
    random.seed(0)
    ours = np.array([fast.crop_box(w, h) for _ in range(n)], dtype=float)
    ours = np.stack([ours[:, 2] - ours[:, 0], ours[:, 3] - ours[:, 1], ours[:, 0], ours[:, 1]], 1)  # w, h, left, top
    torch.manual_seed(0)
    theirs = np.array([T.RandomResizedCrop.get_params(torch.empty(3, h, w), [0.3, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=float)[:, [3, 2, 1, 0]]  # (top, left, h, w) -> w, h, left, top
    for col in range(4):
        for q in (0.1, 0.5, 0.9):
            a, b = np.quantile(ours[:, col], q), np.quantile(theirs[:, col], q)
            assert abs(a - b) <= 0.05 * max(w, h), (col, q, a, b)
    area = ours[:, 0] * ours[:, 1] / (w * h)
    assert 0.29 <= area.min() and area.max() <= 1.0


def test_seeded_by_python_random_and_fallback_for_extreme_shapes():
    fast = RandomResizedCropNormalize(24, (0.9, 1.0), (3 / 4, 4 / 3), "bicubic", MEAN, STD)
    img = _image(200, 10)  # no crop of the allowed ratios fits: centre crop of the nearest ratio
    assert fast.crop_box(200, 10) == (93, 0, 106, 10)
    random.seed(5)
    a = fast(_image())
    random.seed(5)
    assert torch.equal(a, fast(_image()))
    assert fast(img).shape == (3, 24, 24)
    assert fast(_image().convert("L")).shape == (3, 24, 24)  # greyscale in, RGB out


def test_bad_ranges_are_refused_and_the_factory_uses_the_config():
    with pytest.raises(ValueError, match="crop range"):
        RandomResizedCropNormalize(8, (0.9, 0.5), (3 / 4, 4 / 3), "bicubic", MEAN, STD)
    t = train_transform(PreprocessConfig(image_size=40))
    assert isinstance(t, RandomResizedCropNormalize) and t.size == 40 and "scale=(0.9, 1.0)" in repr(t)


def test_full_scale_keeps_every_pixel_in_place():
    img = _image(48, 48)
    keep = train_transform(PreprocessConfig(image_size=48), scale=(1.0, 1.0))
    for seed in range(5):
        random.seed(seed)
        assert keep.crop_box(48, 48) == (0, 0, 48, 48)
    want = T.Normalize(MEAN, STD)(T.ToTensor()(img))
    assert (keep(img) - want).abs().max() < 1e-5


def test_full_scale_on_a_square_image_is_the_whole_image_as_torchvision_draws_it():
    """The shortcut for scale (1, 1) on square images rests on torchvision never drawing
    anything else there; non-square images still take the draws (an exact fit can be a pixel short)."""
    torch.manual_seed(0)
    for side in (24, 64, 224):
        boxes = {T.RandomResizedCrop.get_params(torch.empty(3, side, side), [1.0, 1.0], [3 / 4, 4 / 3])
                 for _ in range(300)}
        assert boxes == {(0, 0, side, side)}  # (top, left, h, w)
    full = RandomResizedCropNormalize(16, (1.0, 1.0), (3 / 4, 4 / 3), "bicubic", MEAN, STD)
    random.seed(0)
    state = random.getstate()
    assert full.crop_box(64, 64) == (0, 0, 64, 64) and random.getstate() == state  # no draws
    full.crop_box(100, 50)
    assert random.getstate() != state  # a non-square image is drawn for as torchvision does

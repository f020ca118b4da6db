"""Bad inputs are skipped and counted by kind, exactly; odd-but-valid images decode properly."""

from __future__ import annotations

import numpy as np
import pytest

from clipforge.data.config import DataConfig
from clipforge.data.loader import build_train_loader
from clipforge.data.skips import Skip, decode_caption, decode_image
from clipforge.errors import DataError
from support.datasets import write_loader_zoo
from support.fakes import exact, fake_tokenize, random_aug, untokenize
from support.images import (
    animated_gif,
    cmyk_jpeg,
    exif_rotated_jpeg,
    image_bytes,
    noise_jpeg,
    png16,
    png_claiming_size,
    transparent_png,
)


def test_odd_but_valid_images_decode_properly():
    def dec(b):
        got = decode_image(b, 8, 40_000_000)
        assert not isinstance(got, Skip), got
        assert got.mode == "RGB"
        return got

    assert np.abs(np.asarray(dec(cmyk_jpeg()), dtype=int) - (255, 0, 0)).max() <= 8
    assert np.abs(np.asarray(dec(png16()), dtype=int) - 128).max() <= 1  # rescaled, not clipped to white
    assert np.asarray(dec(animated_gif()))[0, 0].tolist() == [255, 0, 0]  # first frame
    assert dec(exif_rotated_jpeg()).size == (8, 16)
    assert np.asarray(dec(transparent_png()))[0, 0].tolist() == [255, 255, 255]  # transparent -> white


def test_single_decoders_name_the_problem():
    assert decode_image(b"", 8, 100).kind == "empty_file"
    assert decode_image(b"just text", 8, 100).kind == "not_an_image"
    assert decode_image(png_claiming_size(8700, 5800), 8, 40_000_000).kind == "too_large"
    assert decode_image(png_claiming_size(20000, 20000), 8, 10**12).kind == "too_large"  # Pillow's own bomb guard
    assert decode_image(image_bytes(0, size=1), 8, 100).kind == "too_small"
    assert not isinstance(decode_image(image_bytes(0, size=1), 1, 100), Skip)  # the minimum is configurable
    assert decode_caption(b"\xff\xfe bad").kind == "bad_caption_encoding"
    assert decode_caption("  \n").kind == "empty_caption"
    assert decode_caption(None).kind == "missing_caption"
    assert decode_caption("\ufeff a cat \n".encode()) == "a cat"


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_input_zoo_exact_counts(tmp_path, workers):
    path, n, expected = write_loader_zoo(tmp_path)
    cfg = DataConfig(str(path))
    batch = n // 2 + 1  # two batches (with workers=2, one per worker)
    loader = build_train_loader(cfg, exact(), fake_tokenize, batch_size=batch, workers=workers, seed=0,
                                drop_last=False)
    batches = list(loader.epoch_iter(0))
    total = {}
    for b in batches:
        for k, v in b.skipped.items():
            total[k] = total.get(k, 0) + v
    assert total == expected
    assert [len(b.images) for b in batches] == [batch, n - batch]  # skipped slots refilled: full batches
    captions = {c for b in batches for c in untokenize(b.tokens)}
    assert {"caption cmyk.jpg", "caption grey16.png", "caption anim.gif", "caption exif.jpg"} <= captions
    assert ("long " * 2000).strip()[:77] in captions  # a 10,000-character caption is kept (tokenizer truncates)


def test_truncated_jpeg_is_corrupt_not_padded(tmp_path):
    data = noise_jpeg(0)
    assert decode_image(data[: len(data) // 2], 8, 10**6).kind == "corrupt_image"


def test_everything_bad_stops_with_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("image,caption\n" + "".join(f"missing{i}.jpg,c {i}\n" for i in range(20)))
    loader = build_train_loader(DataConfig(str(tmp_path / "bad.csv")), exact(), fake_tokenize, 4, 0, 0)
    with pytest.raises(DataError, match=r"no usable sample.*'missing_file': 24"):
        list(loader.epoch_iter(0))  # 4 in the batch + all 20 random draws allowed (min(limit, rows))


def test_refill_keeps_pairs_and_differs_in_augmentation(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(5, noise=True))
    (tmp_path / "t.csv").write_text("image,caption\na.png,caption 5\nmissing.png,x\nmissing2.png,y\n")
    loader = build_train_loader(DataConfig(str(tmp_path / "t.csv")), random_aug(), fake_tokenize, 3, 0, 0)
    (b,) = list(loader.epoch_iter(0))
    assert b.skipped == {"missing_file": 2} and untokenize(b.tokens) == ["caption 5"] * 3
    assert not (b.images[0] == b.images[1]).all() and not (b.images[1] == b.images[2]).all()

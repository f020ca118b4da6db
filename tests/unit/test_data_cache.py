"""The decoded-sample cache (DataConfig.cache_mb): later epochs skip reading and decoding, yet
every batch and every skip count is what the uncached loader gives."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from clipforge.data import sources
from clipforge.data.config import DataConfig
from clipforge.data.loader import build_train_loader
from clipforge.errors import DataError
from support.datasets import write_loader_zoo, write_numbered_csv
from support.fakes import fake_tokenize, random_aug


def _epochs(cfg, epochs, workers=0, **kw):
    loader = build_train_loader(cfg, random_aug(), fake_tokenize, batch_size=3, workers=workers, seed=7, **kw)
    return [list(loader.epoch_iter(e)) for e in epochs]


def _same(a, b):
    return all(torch.equal(x.images, y.images) and torch.equal(x.tokens, y.tokens) and x.skipped == y.skipped
               for ea, eb in zip(a, b) for x, y in zip(ea, eb)) and [len(e) for e in a] == [len(e) for e in b]


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_batches_are_bit_identical_over_epochs(tmp_path, workers):
    cfg = DataConfig(str(write_numbered_csv(tmp_path, 14, noise=True)))
    plain = _epochs(cfg, [0, 1, 2])
    cached = _epochs(dataclasses.replace(cfg, cache_mb=64), [0, 1, 2], workers=workers)
    assert _same(plain, cached)
    assert not torch.equal(plain[0][0].images, plain[1][0].images)  # augmentation still differs per epoch


def test_later_epochs_do_not_read_or_decode(tmp_path, monkeypatch):
    cfg = DataConfig(str(write_numbered_csv(tmp_path, 12)), cache_mb=64)
    loader = build_train_loader(cfg, random_aug(), fake_tokenize, batch_size=3, workers=0, seed=7)
    calls = []
    real = sources.load_sample
    monkeypatch.setattr(sources, "load_sample", lambda *a: calls.append(1) or real(*a))
    list(loader.epoch_iter(0))
    assert len(calls) == 12
    list(loader.epoch_iter(1))
    list(loader.epoch_iter(2))
    assert len(calls) == 12  # nothing read again


def test_cache_stops_at_its_budget_and_says_so(tmp_path, monkeypatch, caplog):
    cfg = DataConfig(str(write_numbered_csv(tmp_path, 12)), cache_mb=1)
    loader = build_train_loader(cfg, random_aug(), fake_tokenize, batch_size=3, workers=0, seed=7)
    ds = loader._dl.dataset
    ds.cache.limit = 3 * (24 * 24 * 3 + 77 * 8)  # room for three of the 24x24 test images
    with caplog.at_level(logging.INFO, logger="clipforge.data"):
        cached = [list(loader.epoch_iter(e)) for e in (0, 1)]
    assert len(ds.cache.items) == 3 and ds.cache.used <= ds.cache.limit
    assert "cache full at 3 samples" in caplog.text
    assert _same(_epochs(dataclasses.replace(cfg, cache_mb=0), [0, 1]), cached)  # the rest decoded as before


def test_bad_rows_are_counted_every_epoch_as_without_the_cache(tmp_path):
    path, n, expected = write_loader_zoo(tmp_path)
    cfg = DataConfig(str(path))
    counts = []
    for cache_mb in (0, 64):
        loader = build_train_loader(dataclasses.replace(cfg, cache_mb=cache_mb), random_aug(), fake_tokenize,
                                    batch_size=n // 2 + 1, workers=0, seed=0, drop_last=False)
        per_epoch = []
        for e in (0, 1):
            total: dict[str, int] = {}
            for b in loader.epoch_iter(e):
                for k, v in b.skipped.items():
                    total[k] = total.get(k, 0) + v
            per_epoch.append(total)
        counts.append(per_epoch)
    assert counts[0] == counts[1] == [expected, expected]


def test_negative_budget_is_refused():
    with pytest.raises(DataError, match="cache_mb"):
        DataConfig("x.csv", cache_mb=-1)


@pytest.mark.parametrize("scale", [(1.0, 1.0), (0.5, 1.0)])
def test_batches_normalised_at_once_equal_the_per_image_transform_and_a_fixed_crop_is_kept(tmp_path, scale):
    from clipforge.model.transforms import RandomResizedCropNormalize

    t = RandomResizedCropNormalize(24, scale, (3 / 4, 4 / 3), "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    cfg = DataConfig(str(write_numbered_csv(tmp_path, 12)))  # 24x24 images: the whole-image crop is fixed
    per_image = build_train_loader(cfg, lambda im: t(im), fake_tokenize, batch_size=3, workers=0, seed=7)
    batched = build_train_loader(cfg, t, fake_tokenize, batch_size=3, workers=0, seed=7)
    cached = build_train_loader(dataclasses.replace(cfg, cache_mb=64), t, fake_tokenize, batch_size=3, workers=0,
                                seed=7)
    assert not per_image._dl.dataset.feat.batched and batched._dl.dataset.feat.batched
    runs = [[list(ld.epoch_iter(e)) for e in (0, 1)] for ld in (per_image, batched, cached)]
    assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])
    first = runs[1][0][0].images
    assert first.dtype == torch.float32 and first.is_contiguous() and first.shape == (3, 3, 24, 24)
    kept = list(cached._dl.dataset.cache.items.values())
    fixed = scale == (1.0, 1.0)
    assert len(kept) == 12 and all(isinstance(v[0], torch.Tensor) for v in kept) == fixed

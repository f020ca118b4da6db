"""Tables and folders: correct pairs in batches, clear errors for wrong paths and columns."""

from __future__ import annotations

import pytest
import torch

from clipforge.data.config import DataConfig, resolve_kind
from clipforge.data.loader import build_train_loader
from clipforge.errors import DataError
from support.datasets import write_numbered_csv, write_numbered_images
from support.fakes import exact, fake_tokenize, ids
from support.images import color


def _all_batches(cfg, batch_size=4, workers=0, drop_last=True, **kw):
    loader = build_train_loader(cfg, exact(), fake_tokenize, batch_size=batch_size, workers=workers, seed=0,
                                drop_last=drop_last, **kw)
    return loader, list(loader.epoch_iter(0))


def _check_pairs(batches):
    """Each image has the colour of the sample its caption names (so pairs stay together)."""
    for b in batches:
        assert b.images.shape[1:] == (3, 8, 8) and b.tokens.shape[1] == 77 and b.tokens.dtype == torch.long
        for img, i in zip(b.images, ids(b.tokens)):
            want = torch.tensor(color(i), dtype=torch.float32) / 255
            assert torch.allclose(img.mean(dim=(1, 2)), want, atol=1e-6)


def test_csv_yields_every_pair_once_per_epoch(tmp_path):
    path = write_numbered_csv(tmp_path, 10)
    loader, batches = _all_batches(DataConfig(str(path)), batch_size=3, drop_last=False)
    assert loader.num_batches_per_epoch == 4 and [len(b.images) for b in batches] == [3, 3, 3, 1]
    _check_pairs(batches)
    assert sorted(i for b in batches for i in ids(b.tokens)) == list(range(10))
    assert all(b.skipped == {} for b in batches)


def test_epochs_are_shuffled_differently_and_reproducibly(tmp_path):
    cfg = DataConfig(str(write_numbered_csv(tmp_path, 12)))
    loader = build_train_loader(cfg, exact(), fake_tokenize, batch_size=12, workers=0, seed=3)
    e0, e1 = (ids(next(iter(loader.epoch_iter(e))).tokens) for e in (0, 1))
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(12))
    again = build_train_loader(cfg, exact(), fake_tokenize, batch_size=12, workers=0, seed=3)
    assert ids(next(iter(again.epoch_iter(1))).tokens) == e1


def test_tsv_and_custom_columns(tmp_path):
    write_numbered_images(tmp_path, 5)
    rows = "".join(f"x{i}\tcaption {i}\timg/{i:03d}.png\n" for i in range(5))
    (tmp_path / "d.tsv").write_text("extra\ttext\tfile\n" + rows)
    cfg = DataConfig(str(tmp_path / "d.tsv"), image_key="file", caption_key="text")
    _, batches = _all_batches(cfg, batch_size=5)
    _check_pairs(batches)
    assert sorted(ids(batches[0].tokens)) == list(range(5))


def test_parquet_with_paths_and_with_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rel = write_numbered_images(tmp_path, 6)
    caps = [f"caption {i}" for i in range(6)]
    pq.write_table(pa.table({"image": rel, "caption": caps}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"jpg": [(tmp_path / r).read_bytes() for r in rel], "txt": caps}), tmp_path / "b.parquet")
    for cfg in (DataConfig(str(tmp_path / "p.parquet")), DataConfig(str(tmp_path / "b.parquet"), image_key="jpg",
                                                                   caption_key="txt")):
        _, batches = _all_batches(cfg, batch_size=6)
        _check_pairs(batches)
        assert sorted(ids(batches[0].tokens)) == list(range(6))


def test_folder_with_sidecar_captions(tmp_path):
    rel = write_numbered_images(tmp_path / "f", 7)
    for i, r in enumerate(rel):
        (tmp_path / "f" / r).with_suffix(".txt").write_text(f"caption {i}\n")
    cfg = DataConfig(str(tmp_path / "f"))
    assert resolve_kind(cfg) == "folder"
    _, batches = _all_batches(cfg, batch_size=7)
    _check_pairs(batches)
    assert sorted(ids(batches[0].tokens)) == list(range(7))


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_train_loader(DataConfig(str(tmp_path / "nope.csv")), exact(), fake_tokenize, 2, 0, 0)
    path = write_numbered_csv(tmp_path, 3)
    with pytest.raises(DataError, match=r"no column 'url'.*available columns: \['image', 'caption'\]"):
        build_train_loader(DataConfig(str(path), image_key="url"), exact(), fake_tokenize, 2, 0, 0)
    (tmp_path / "empty.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="no rows"):
        build_train_loader(DataConfig(str(tmp_path / "empty.csv")), exact(), fake_tokenize, 2, 0, 0)
    with pytest.raises(DataError, match="no batch of 4 per rank x 1 ranks"):
        build_train_loader(DataConfig(str(path)), exact(), fake_tokenize, 4, 0, 0)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_train_loader(DataConfig(str(tmp_path / "empty_dir")), exact(), fake_tokenize, 2, 0, 0)
    with pytest.raises(DataError, match="cannot tell the format"):
        (tmp_path / "x.json").write_text("{}")
        build_train_loader(DataConfig(str(tmp_path / "x.json")), exact(), fake_tokenize, 2, 0, 0)
    with pytest.raises(DataError, match="unknown data kind"):
        DataConfig("x", kind="zip")

"""WebDataset shards: brace patterns, splitting over ranks and workers, truncation, resampling."""

from __future__ import annotations

import itertools
import tarfile
from collections import Counter

import pytest
import torch

from clipforge.data.config import DataConfig, resolve_kind
from clipforge.data.loader import build_train_loader
from clipforge.data.wds import assigned_shards, expand_braces, iter_tar
from clipforge.errors import DataError
from support.datasets import write_numbered_shards, write_shard
from support.fakes import exact, fake_tokenize, ids, random_aug
from support.images import image_bytes


def test_brace_expansion():
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{8..11}.tar") == ["8.tar", "9.tar", "10.tar", "11.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("x.tar::y/{1..2}.tar") == ["x.tar", "y/1.tar", "y/2.tar"]
    assert resolve_kind(DataConfig("d/{0..9}.tar")) == resolve_kind(DataConfig("one.tar")) == "wds"
    with pytest.raises(DataError, match="cannot expand"):
        expand_braces("d/{x}.tar")


@pytest.mark.parametrize("n,world,workers", [(10, 2, 3), (7, 1, 4), (16, 4, 2)])
def test_every_shard_goes_to_exactly_one_worker(n, world, workers):
    for epoch in (0, 1):
        got = [s for r, w in itertools.product(range(world), range(workers))
               for s in assigned_shards(n, 0, epoch, r, world, w, workers)]
        assert sorted(got) == list(range(n))
    per_rank = [sum(len(assigned_shards(n, 0, 0, r, world, w, workers)) for w in range(workers))
                for r in range(world)]
    assert max(per_rank) - min(per_rank) <= 1  # shards spread over ranks first


def _collect(cfg, **kw):
    loader = build_train_loader(cfg, exact(), fake_tokenize, seed=1, **kw)
    assert loader.num_batches_per_epoch is None
    return list(loader.epoch_iter(0))


def test_streaming_over_ranks_and_workers_yields_every_sample_once(tmp_path):
    cfg = DataConfig(write_numbered_shards(tmp_path, 5, 7), shuffle_buffer=4)
    seen = []
    for rank in range(2):
        batches = _collect(cfg, batch_size=3, workers=2, rank=rank, world_size=2, drop_last=False)
        seen += [i for b in batches for i in ids(b.tokens)]
        for b in batches:
            assert b.images.shape[1:] == (3, 8, 8) and b.skipped == {}
    assert sorted(seen) == list(range(35))


def test_stream_resume_and_epochs(tmp_path):
    cfg = DataConfig(write_numbered_shards(tmp_path, 4, 6, noise=True), shuffle_buffer=5)
    make = lambda: build_train_loader(cfg, random_aug(), fake_tokenize, batch_size=2, workers=2, seed=3)  # noqa: E731
    full = list(make().epoch_iter(1))
    tail = list(make().epoch_iter(1, start_batch=3))
    assert len(tail) == len(full) - 3 and len(full) == 12
    assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) for a, b in zip(full[3:], tail))
    other = [i for b in make().epoch_iter(2) for i in ids(b.tokens)]
    assert other != [i for b in full for i in ids(b.tokens)] and sorted(other) == list(range(24))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_tar_keeps_earlier_samples_and_counts_once(tmp_path):
    shards = write_numbered_shards(tmp_path, 2, 5)
    first = tmp_path / "000.tar"
    with tarfile.open(first) as tf:
        fourth = tf.getmember("000003.png")
    _truncate(first, fourth.offset_data + fourth.size // 2)  # inside the 4th sample's image
    counts = Counter()
    keys = [k for k, _ in iter_tar(str(first), counts)]
    assert counts == {"truncated_tar": 1} and keys == ["000000", "000001", "000002"]
    batches = _collect(DataConfig(shards, shuffle_buffer=0), batch_size=1, workers=0, drop_last=False)
    assert sum(b.skipped.get("truncated_tar", 0) for b in batches) == 1
    assert sorted(i for b in batches for i in ids(b.tokens)) == [0, 1, 2, 5, 6, 7, 8, 9]


def test_tar_cut_at_a_block_boundary_is_still_noticed(tmp_path):
    write_numbered_shards(tmp_path, 1, 3)
    data = (tmp_path / "000.tar").read_bytes()
    end = len(data.rstrip(b"\0"))
    (tmp_path / "000.tar").write_bytes(data[: (end + 511) // 512 * 512])  # no end-of-archive blocks
    counts = Counter()
    assert [k for k, _ in iter_tar(str(tmp_path / "000.tar"), counts)] == ["000000", "000001"]
    assert counts == {"truncated_tar": 1}


def test_bad_samples_and_shards_in_a_stream_are_counted(tmp_path):
    write_shard(tmp_path / "000.tar", [
        ("a", {"png": image_bytes(1), "txt": b"caption 1"}),
        ("b", {"png": image_bytes(2)}),  # no caption
        ("c", {"txt": b"caption 3"}),  # no image
        ("d", {"jpg": b"not an image", "txt": b"caption 4"}),
        ("e", {"png": image_bytes(5), "txt": b"\xff\xfe"}),
        ("f", {"png": image_bytes(6), "txt": b"caption 6"}),
    ])
    (tmp_path / "002.tar").write_bytes(b"garbage" * 100)
    batches = _collect(DataConfig(str(tmp_path / "{000..002}.tar")), batch_size=2, workers=0)
    total = Counter()
    for b in batches:
        total.update(b.skipped)
    assert total == {"missing_caption": 1, "missing_file": 1, "not_an_image": 1, "bad_caption_encoding": 1,
                     "unreadable_shard": 2}  # 001.tar does not exist, 002.tar is not a tar
    assert sorted(i for b in batches for i in ids(b.tokens)) == [1, 6]


def test_resampled_stream_is_endless_and_draws_with_replacement(tmp_path):
    cfg = DataConfig(write_numbered_shards(tmp_path, 3, 2), resampled=True, shuffle_buffer=0)
    loader = build_train_loader(cfg, exact(), fake_tokenize, batch_size=2, workers=2, seed=0)
    got = [i for b in itertools.islice(loader.epoch_iter(0), 15) for i in ids(b.tokens)]
    assert len(got) == 30 and set(got) == set(range(6))  # 30 samples from a dataset of 6
    again = [i for b in itertools.islice(iter(loader), 15) for i in ids(b.tokens)]
    assert again == got


def test_stream_errors(tmp_path):
    with pytest.raises(DataError, match="no shard of"):
        build_train_loader(DataConfig(str(tmp_path / "{0..3}.tar")), exact(), fake_tokenize, 2, 0, 0)
    write_numbered_shards(tmp_path, 1, 4)
    assert resolve_kind(DataConfig(str(tmp_path))) == "wds"  # a folder holding only shards
    with pytest.raises(DataError, match="1 shards cannot feed 2 ranks"):
        build_train_loader(DataConfig(str(tmp_path / "000.tar")), exact(), fake_tokenize, 2, 0, 0, rank=0,
                           world_size=2)
    with pytest.raises(DataError, match="yielded no batch of 8"):
        _collect(DataConfig(str(tmp_path / "000.tar")), batch_size=8, workers=0)
    write_shard(tmp_path / "bad.tar", [(f"{i:04d}", {"png": b"", "txt": b"x"}) for i in range(40)])
    with pytest.raises(DataError, match=r"30 samples skipped before any usable one \({'empty_file': 30}\)"):
        _collect(DataConfig(str(tmp_path / "bad.tar"), bad_sample_limit=30), batch_size=2, workers=0)

"""Exact positions: resume mid-epoch, worker counts and rank splits never change the data."""

from __future__ import annotations

import pytest
import torch

from clipforge.data.config import DataConfig
from clipforge.data.loader import EpochBatches, build_train_loader
from support.datasets import write_numbered_csv
from support.fakes import fake_tokenize, ids, random_aug


def _loader(cfg, workers, **kw):
    return build_train_loader(cfg, random_aug(), fake_tokenize, batch_size=3, workers=workers, seed=7, **kw)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return DataConfig(str(write_numbered_csv(tmp_path_factory.mktemp("d"), 14, noise=True)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_batch_k_equals_the_tail_of_an_uninterrupted_epoch(cfg, workers):
    full = list(_loader(cfg, 0).epoch_iter(1))
    assert len(full) == 4
    resumed = list(_loader(cfg, workers, start_epoch=1, start_batch=2).epoch_iter(1, start_batch=2))
    assert len(resumed) == 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)  # bitwise


def test_worker_count_changes_nothing_and_epochs_reuse_persistent_workers(cfg):
    loader = _loader(cfg, 2)
    for epoch in (0, 1, 0):
        ref = list(_loader(cfg, 0).epoch_iter(epoch))
        got = list(loader.epoch_iter(epoch))
        assert all(torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) for a, b in zip(ref, got))
    assert not torch.equal(ref[0].images, list(loader.epoch_iter(1))[0].images)  # augmentation depends on epoch


def test_loader_leaves_the_global_rng_alone(cfg):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(_loader(cfg, 0).epoch_iter(0))  # augmentation in this process (workers=0)
    assert torch.equal(torch.rand(3), expected)


def test_endless_iteration_continues_across_epochs(cfg):
    loader = _loader(cfg, 0, start_epoch=2, start_batch=3)
    it = iter(loader)
    first = [next(it) for _ in range(5)]
    want = list(loader.epoch_iter(2))[3:] + list(loader.epoch_iter(3))[:4]
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, want))


@pytest.mark.parametrize("n,world,drop_last", [(14, 3, True), (14, 3, False), (12, 4, True), (5, 2, False)])
def test_ranks_partition_the_epoch(n, world, drop_last):
    shares = [EpochBatches(n, 2, 0, r, world, drop_last) for r in range(world)]
    seen = [i for s in shares for _, _, b in s for i in b]
    assert len({s.num_batches for s in shares}) == 1  # equal batch counts: ranks stay in step
    if drop_last:
        assert len(seen) == len(set(seen))  # nothing twice
        assert len(seen) == (n // world // 2) * 2 * world
    else:
        assert set(seen) == set(range(n))  # everything, padded by wrapping around


def test_ranks_see_disjoint_samples_through_the_loader(cfg):
    got = []
    for rank in range(2):
        loader = _loader(cfg, 0, rank=rank, world_size=2, drop_last=True)
        got.append([i for b in loader.epoch_iter(0) for i in ids(b.tokens)])
    assert len(got[0]) == len(got[1]) == 6 and not set(got[0]) & set(got[1])

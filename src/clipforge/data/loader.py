"""``build_train_loader``: a DataLoader per source, with exact epoch positions for resume.

Order and resume:

- Tables and folders: epoch e visits the permutation seeded by (seed, e), cut to equal
  per-rank lengths (trimmed with ``drop_last``, else padded by wrapping around) and dealt
  out ``rank::world_size``; batch k is items ``k*B .. k*B+B-1`` of the rank's share.
  ``epoch_iter(e, start_batch=k)`` yields exactly batches k, k+1, ... of an uninterrupted
  epoch, bit for bit, whatever the number of workers.
- Shards: the epoch's shard permutation (seed, e) is dealt to global workers; each worker
  streams through a shuffle buffer seeded by (seed, e, rank, worker). Resuming at batch k
  re-reads and discards the first k batches: exact, provided ``workers`` and the world size
  are those of the interrupted run. Resampled mode draws shards with replacement from an
  RNG seeded by (seed, rank, worker, epoch) and never ends.

Failure policy: a bad sample is skipped and counted (``Batch.skipped``); a DataError stops
the run when a table batch and ``bad_sample_limit`` random others are all unusable, when a
stream skips ``bad_sample_limit`` samples before its first batch, or when an epoch of a
stream yields no batch at all.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from clipforge.data.config import DataConfig, resolve_kind, rng_for
from clipforge.data.sources import Batch, Featurizer, MapBatches, StreamBatches, open_index
from clipforge.errors import DataError

log = logging.getLogger("clipforge.data")


class EpochBatches(Sampler):
    """Yields ``(epoch, k, [indices])`` for this rank's batches k = start .. of one epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int, drop_last: bool) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.num_batches = self.per_rank // batch_size if drop_last else math.ceil(self.per_rank / batch_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample order for an epoch: [per_rank] indices."""
        order = rng_for(self.seed, epoch, 0xE90C).permutation(self.n)
        order = np.resize(order, self.per_rank * self.world_size)  # trim, or pad by wrapping
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        mine, b = self.indices(self.epoch), self.batch_size
        for k in range(self.start, self.num_batches):
            yield self.epoch, k, mine[k * b : (k + 1) * b].tolist()

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)


class TrainLoader:
    """Epochs of ``Batch`` es. ``num_batches_per_epoch`` is None for shard streams."""

    def __init__(self, cfg: DataConfig, kind: str, dl: DataLoader, sampler: EpochBatches | None,
                 start_epoch: int, start_batch: int) -> None:
        self.cfg, self.kind, self._dl, self._sampler = cfg, kind, dl, sampler
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.num_samples: int | None = sampler.n if sampler is not None else None
        self.num_batches_per_epoch: int | None = sampler.num_batches if sampler is not None else None

    def epoch_iter(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch``, ``start_batch + 1``, ... of ``epoch`` (endless when resampled)."""
        total: Counter = Counter()
        count = rows = 0
        batches = self._map_epoch(epoch, start_batch) if self._sampler is not None else \
            self._stream_epoch(epoch, start_batch)
        for batch in batches:
            total.update(batch.skipped)
            count, rows = count + 1, rows + len(batch.images)
            yield batch
        bad = sum(total.values())
        # Refilled batches keep training going on mostly-bad data; say so loudly.
        level = logging.WARNING if bad > 0.1 * (rows + bad) else logging.INFO
        log.log(level, "epoch %d: %d batches, skipped %d samples %s", epoch, count, bad, dict(total) or "")

    def __iter__(self) -> Iterator[Batch]:
        """Endless: epochs one after another from (start_epoch, start_batch)."""
        epoch, start = self.start_epoch, self.start_batch
        while True:
            yield from self.epoch_iter(epoch, start)
            epoch, start = epoch + 1, 0

    def _map_epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        self._sampler.set_position(epoch, start_batch)
        for k, batch in enumerate(self._dl, start=start_batch):
            if batch.images.shape[0] == 0:
                raise DataError(
                    f"{self.cfg.path}: no usable sample in batch {k} of epoch {epoch} nor in up to "
                    f"{self.cfg.bad_sample_limit} random others (skipped: {batch.skipped}); "
                    "is this the right file, column or folder?")
            yield batch

    def _stream_epoch(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """Folds the workers' 0-row count reports into the preceding batch (held back one step)."""
        self._dl.dataset.set_epoch(epoch)
        held: Batch | None = None
        pending: Counter = Counter()
        k = 0  # batches seen so far this epoch
        for batch in self._dl:
            if batch.images.shape[0] == 0:
                if held is not None:
                    for kind, n in batch.skipped.items():
                        held.skipped[kind] = held.skipped.get(kind, 0) + n
                    continue
                pending.update(batch.skipped)
                if sum(pending.values()) >= self.cfg.bad_sample_limit:
                    raise DataError(f"{self.cfg.path}: {sum(pending.values())} samples skipped before any usable "
                                    f"one ({dict(pending)}); are these the right shards and keys?")
                continue
            if held is not None and k - 1 >= start_batch:
                yield held
            held = Batch(batch.images, batch.tokens, dict(Counter(batch.skipped) + pending))
            pending.clear()
            k += 1
        if held is None:
            raise DataError(f"{self.cfg.path}: epoch {epoch} yielded no batch of {self._dl.dataset.batch_size} "
                            f"(skipped: {dict(pending) or 'none'}); too little usable data for the batch size, "
                            "ranks and workers?")
        if k - 1 >= start_batch:
            yield held


def _identity(x: Any) -> Any:
    return x


def build_train_loader(
    cfg: DataConfig,
    image_transform: Callable[[Any], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_epoch: int = 0,
    start_batch: int = 0,
    pin_memory: bool = False,
    drop_last: bool = True,
) -> TrainLoader:
    """The training loader for one rank. Decoding, augmentation and tokenization run in
    ``workers`` DataLoader processes (persistent across epochs; 0 = in this process)."""
    if batch_size < 1 or workers < 0 or not 0 <= rank < world_size:
        raise DataError(f"bad loader settings: batch_size={batch_size}, workers={workers}, "
                        f"rank={rank}, world_size={world_size}")
    kind = resolve_kind(cfg)
    feat = Featurizer(cfg, image_transform, tokenizer)
    common: dict[str, Any] = dict(
        batch_size=None, collate_fn=_identity, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=pin_memory and torch.cuda.is_available(),
        generator=torch.Generator(),  # DataLoader draws worker seeds: keep it off the global RNG
    )
    if kind == "wds":
        from clipforge.data.wds import list_shards

        shards = list_shards(cfg)
        if not cfg.resampled and len(shards) < world_size:
            raise DataError(f"{len(shards)} shards cannot feed {world_size} ranks: pack smaller shards")
        if not cfg.resampled and len(shards) < world_size * max(workers, 1):
            log.warning("%d shards for %d ranks x %d workers: some workers stay idle", len(shards), world_size,
                        max(workers, 1))
        ds = StreamBatches(shards, feat, seed, rank, world_size, batch_size, drop_last)
        return TrainLoader(cfg, kind, DataLoader(ds, **common), None, start_epoch, start_batch)
    if cfg.resampled:
        raise DataError("resampled mode applies to WebDataset shards; tables and folders are read in epochs")
    index = open_index(cfg, kind)
    sampler = EpochBatches(len(index), batch_size, seed, rank, world_size, drop_last)
    if sampler.num_batches == 0:
        raise DataError(f"{cfg.path}: {len(index)} samples make no batch of {batch_size} per rank "
                        f"x {world_size} ranks; lower the batch size")
    ds = MapBatches(index, feat, seed, rank)
    return TrainLoader(cfg, kind, DataLoader(ds, sampler=sampler, **common), sampler, start_epoch, start_batch)

"""Training data: turning sources into batches inside DataLoader workers.

The loader (``data.loader.build_train_loader``) wraps these in a DataLoader. Two datasets do the work, each yielding whole ``Batch`` es so that skip counts
travel from the worker that saw them to the trainer inside the batch they belong to:

- ``MapBatches`` (CSV/TSV/Parquet/folder) builds batch k of an epoch from its list of indices.
  A sample's augmentation randomness is seeded by (seed, epoch, index), so neither the worker
  count nor a resume changes a single pixel.
- ``StreamBatches`` (WebDataset shards) reads its worker's shards, shuffles, decodes, batches.

Batch policy: every batch is full (``batch_size`` rows; ranks need equal shapes to gather
features). A skipped sample's slot is refilled with another augmentation of a good sample of
the same batch (map-style), or by the next good sample of the stream (shards). A map-style
batch with no good sample at all draws up to ``bad_sample_limit`` random replacements
(deterministically) and, if none is usable, the run stops with a ``DataError``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import Counter
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from clipforge.data.config import DataConfig, resolve_kind, rng_for, seed_for
from clipforge.data.skips import SKIP_KINDS, RawSample, Skip, load_caption, load_sample, note_skip
from clipforge.errors import DataError

__all__ = ["DataConfig", "Batch", "SKIP_KINDS", "MapBatches", "StreamBatches", "open_index", "table_captions"]

log = logging.getLogger("clipforge.data")
_REPORT_EVERY = 64  # a stream worker reports skips at least this often, batch or not


class Batch(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W] float
    tokens: torch.Tensor  # [B, 77] long
    skipped: dict[str, int]  # samples dropped while building this batch, by kind


def _counts_only(counts: Counter) -> Batch:
    """A 0-row batch carrying skip counts only; the TrainLoader folds it into a real batch."""
    return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), dict(counts))


def open_index(cfg: DataConfig, kind: str | None = None, with_extras: bool = False):
    """The row index of a table or folder source (``len``, ``raw(i)``, ``extra(i)``)."""
    kind = kind or resolve_kind(cfg)
    if kind == "csv":
        from clipforge.data.csv_source import read_csv

        return read_csv(cfg, with_extras)
    if kind == "parquet":
        from clipforge.data.csv_source import read_parquet

        return read_parquet(cfg, with_extras)
    if kind == "folder":
        from clipforge.data.folder_source import read_folder

        return read_folder(cfg)
    raise DataError(f"{cfg.path} is WebDataset shards, not a table or folder")


def table_captions(cfg: DataConfig) -> list[str]:
    """Every usable caption of a table or folder source, images unread (a row whose caption
    cannot be read is left out, as training would skip it)."""
    kind = resolve_kind(cfg)
    if kind == "wds":
        raise DataError(f"{cfg.path}: the training captions are read before the run from a table or folder, "
                        "not WebDataset shards")
    index = open_index(cfg, kind)
    captions = (load_caption(index.raw(i)) for i in range(len(index)))
    return [c for c in captions if isinstance(c, str)]


class Featurizer:
    """Raw sample -> (image tensor, token ids), augmentation seeded per sample (inside ``rng_scope``)."""

    def __init__(self, cfg: DataConfig, transform: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.cfg, self.transform, self.tokenizer = cfg, transform, tokenizer
        # A transform with ``pixels`` and ``normalize`` (model.transforms.RandomResizedCropNormalize)
        # stops at uint8 pixels per sample and normalises whole batches (``stack``): per-image tensor
        # calls were most of a cached sample's cost.
        self.batched = all(callable(getattr(transform, a, None)) for a in ("pixels", "normalize"))

    @contextlib.contextmanager
    def rng_scope(self) -> Iterator[None]:
        """Per-sample seeding happens inside: afterwards the global RNGs are as they were.
        With workers=0 this runs in the trainer's process, whose RNG must not depend on the
        data. CUDA generators are never touched."""
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                yield
            finally:
                random.setstate(py_state)

    def image(self, pil: Any, seed: int) -> torch.Tensor:
        """The augmented image: [3, H, W] float, or uint8 [H, W, 3] pixels when ``batched``."""
        torch.default_generator.manual_seed(seed)  # torchvision's random transforms draw from it
        random.seed(seed)  # for transforms written with Python's random
        return self.transform.pixels(pil) if self.batched else self.transform(pil)

    def fixed_image(self, pil: Any) -> torch.Tensor | None:
        """``image`` of ``pil`` when every seed gives the same one (a whole-image crop at the
        training size), else None: then it can be computed once and kept."""
        fixed = getattr(self.transform, "fixed_for", None)
        if self.batched and fixed is not None and fixed(*pil.size):
            return self.transform.pixels(pil)
        return None

    def stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The batch's images, [B, 3, H, W] float."""
        batch = torch.stack(images)
        return self.transform.normalize(batch) if self.batched else batch

    def decode(self, raw: RawSample) -> tuple[Any, torch.Tensor] | Skip:
        """Read, decode and tokenize one sample: (RGB image, token ids [77]) or why it is unusable."""
        got = load_sample(raw, self.cfg.min_image_side, self.cfg.max_image_pixels)
        if isinstance(got, Skip):
            return got
        pil, caption = got
        try:
            tokens = self.tokenizer([caption])[0]  # [77]
        except Exception as e:  # noqa: BLE001 - one caption the tokenizer rejects is one bad sample
            return Skip("bad_caption", f"{raw.where}: {type(e).__name__}: {e}")
        return pil, tokens

    def augment(self, decoded: tuple[Any, torch.Tensor], where: str, *seed_parts: int
                ) -> tuple[torch.Tensor, torch.Tensor] | Skip:
        pil, tokens = decoded
        try:
            image = self.image(pil, seed_for(*seed_parts))
        except Exception as e:  # noqa: BLE001 - e.g. an image the transform cannot crop
            return Skip("corrupt_image", f"{where}: transform failed: {type(e).__name__}: {e}")
        return image, tokens

    def sample(self, raw: RawSample, *seed_parts: int) -> tuple[torch.Tensor, torch.Tensor] | Skip:
        got = self.decode(raw)
        return got if isinstance(got, Skip) else self.augment(got, raw.where, *seed_parts)


class DecodedCache:
    """Decoded samples (or their skip) by row index, up to ``limit_mb`` MiB of pixels.

    A sample whose augmentation never varies (``Featurizer.fixed_image``) is kept augmented, as a
    tensor, and not augmented again. A skip is kept too, so a bad row is counted again each epoch
    without being re-read, as it would be without the cache. Once full, further rows are decoded
    every time (logged once).
    """

    def __init__(self, limit_mb: int) -> None:
        self.limit = limit_mb * 2**20
        self.used = 0
        self.items: dict[int, tuple[Any, torch.Tensor] | Skip] = {}
        self.full_logged = False

    def get(self, i: int, feat: Featurizer, raw: RawSample) -> tuple[Any, torch.Tensor] | Skip:
        hit = self.items.get(i)
        if hit is not None:
            return hit
        got = feat.decode(raw)
        if not isinstance(got, Skip):
            fixed = feat.fixed_image(got[0])
            # pixels only: no reference to the encoded file's bytes
            got = (got[0].copy() if fixed is None else fixed, got[1])
        if isinstance(got, Skip):
            size = 256
        elif isinstance(got[0], torch.Tensor):
            size = got[0].numel() * got[0].element_size() + 77 * 8
        else:
            size = got[0].width * got[0].height * len(got[0].getbands()) + 77 * 8
        if self.used + size <= self.limit:
            self.items[i] = got
            self.used += size
        elif not self.full_logged:
            self.full_logged = True
            log.info("decoded-sample cache full at %d samples (%.0f MiB); the rest are decoded each epoch",
                     len(self.items), self.used / 2**20)
        return got


class MapBatches(Dataset):
    """Indexed by ``(epoch, batch_index, [sample indices])`` (from ``EpochBatches``)."""

    def __init__(self, index: Any, feat: Featurizer, seed: int, rank: int) -> None:
        self.index, self.feat, self.seed, self.rank = index, feat, seed, rank
        # Built in each loader process on first use (a worker fills its own copy).
        self.cache = DecodedCache(feat.cfg.cache_mb) if feat.cfg.cache_mb > 0 else None

    def __len__(self) -> int:
        return len(self.index)

    def _sample(self, epoch: int, i: int, copy: int) -> tuple[torch.Tensor, torch.Tensor] | Skip:
        raw = self.index.raw(i)  # no I/O: where to read, and the row's name for messages
        if self.cache is None:
            return self.feat.sample(raw, self.seed, epoch, i, copy)
        got = self.cache.get(i, self.feat, raw)
        if isinstance(got, Skip) or isinstance(got[0], torch.Tensor):  # a skip, or kept augmented
            return got
        return self.feat.augment(got, raw.where, self.seed, epoch, i, copy)

    def _get(self, epoch: int, i: int, copy: int, counts: Counter) -> tuple[torch.Tensor, torch.Tensor] | None:
        got = self._sample(epoch, i, copy)
        if isinstance(got, Skip):
            note_skip(got, counts)
            return None
        return got

    def __getitem__(self, spec: tuple[int, int, list[int]]) -> Batch:
        with self.feat.rng_scope():
            return self._build(*spec)

    def _build(self, epoch: int, k: int, indices: list[int]) -> Batch:
        counts: Counter = Counter()
        rows = [self._get(epoch, i, 0, counts) for i in indices]
        donors = [(i, r) for i, r in zip(indices, rows) if r is not None]
        if not donors:  # nothing good here: look further, deterministically
            n = len(self.index)
            rng = rng_for(self.seed, epoch, self.rank, k, 0xF111)
            for _ in range(min(self.feat.cfg.bad_sample_limit, n)):
                i = int(rng.integers(n))
                r = self._get(epoch, i, 0, counts)
                if r is not None:
                    donors = [(i, r)]
                    break
            if not donors:
                return _counts_only(counts)
        m = 0
        for slot, r in enumerate(rows):
            if r is None:  # refill: another augmentation (copy number >= 1) of a good sample
                i, first = donors[m % len(donors)]
                again = self._sample(epoch, i, 1 + m // len(donors))
                rows[slot] = again if not isinstance(again, Skip) else first
                m += 1
        images = self.feat.stack([r[0] for r in rows])  # [B, 3, H, W]
        tokens = torch.stack([r[1] for r in rows])  # [B, 77]
        return Batch(images, tokens, dict(counts))


class StreamBatches(IterableDataset):
    """Batches from WebDataset shards; each DataLoader worker reads its own shards.

    The epoch reaches persistent workers through shared memory (their copy of this object
    was made once, when they started). Skips are reported with the next batch, or as a
    0-row batch at least every ``_REPORT_EVERY`` skips and at the end of the stream.
    """

    def __init__(self, shards: list[str], feat: Featurizer, seed: int, rank: int, world_size: int,
                 batch_size: int, drop_last: bool) -> None:
        self.shards, self.feat, self.seed = shards, feat, seed
        self.rank, self.world_size, self.batch_size, self.drop_last = rank, world_size, batch_size, drop_last
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def _shard_order(self, epoch: int, worker: int, num_workers: int):
        from clipforge.data.wds import assigned_shards, resampled_shards

        n = len(self.shards)
        if self.feat.cfg.resampled:
            return resampled_shards(n, self.seed, epoch, self.rank, worker)
        return assigned_shards(n, self.seed, epoch, self.rank, self.world_size, worker, num_workers)

    def __iter__(self):
        from clipforge.data.wds import iter_tar, shuffle_buffer, to_raw

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, cfg = int(self._epoch[0]), self.feat.cfg
        counts: Counter = Counter()

        def samples():
            for s in self._shard_order(epoch, worker, num_workers):
                for key, sample in iter_tar(self.shards[s], counts):
                    yield s, key, sample

        rng = rng_for(self.seed, epoch, self.rank, worker, 0x5B0F)
        report_every = min(_REPORT_EVERY, cfg.bad_sample_limit)
        images: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        for n, (s, key, sample) in enumerate(shuffle_buffer(samples(), cfg.shuffle_buffer, rng)):
            with self.feat.rng_scope():  # not held across a yield: the trainer may run in between
                got = self.feat.sample(to_raw(self.shards[s], key, sample, cfg), self.seed, epoch, self.rank, worker, n)
            if isinstance(got, Skip):
                note_skip(got, counts)
                if sum(counts.values()) >= report_every:
                    yield _counts_only(counts)
                    counts.clear()
                continue
            images.append(got[0])
            tokens.append(got[1])
            if len(images) == self.batch_size:
                yield Batch(self.feat.stack(images), torch.stack(tokens), dict(counts))  # [B,3,H,W], [B,77]
                images, tokens = [], []
                counts.clear()
        if images and not self.drop_last:
            yield Batch(self.feat.stack(images), torch.stack(tokens), dict(counts))
        elif counts:
            yield _counts_only(counts)


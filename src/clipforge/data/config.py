"""``DataConfig``: where the training pairs are and what counts as a usable sample."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Literal

from clipforge.errors import DataError

Kind = Literal["auto", "csv", "parquet", "folder", "wds"]
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class DataConfig:
    """A training data source.

    ``path``: a CSV/TSV/Parquet file (image paths relative to the file), a folder of images with
    same-stem ``.txt`` captions, or WebDataset shards: ``data/{00000..00127}.tar``, a single
    ``.tar``, several patterns joined by ``::``, or a folder holding only ``.tar`` files.
    For tables ``image_key``/``caption_key`` are column names; for shards they are member
    extensions, and the defaults mean "any image extension" and ``txt``.
    """

    path: str
    kind: Kind = "auto"
    image_key: str = "image"
    caption_key: str = "caption"
    resampled: bool = False  # shards only: draw shards with replacement, an endless stream
    min_image_side: int = 8  # smaller images are degenerate: skipped as 'too_small'
    max_image_pixels: int = 40_000_000  # larger ones are refused unread as 'too_large' (bombs, scans)
    shuffle_buffer: int = 1000  # shards only: samples held for the streaming shuffle
    bad_sample_limit: int = 1000  # skipped samples before any usable one -> DataError
    # Tables and folders: keep each decoded image and its token ids in memory, up to this many MiB
    # (per loader process), so later epochs skip reading, decoding and tokenizing. 0 = off.
    # Augmentation still runs per epoch, seeded as before: batches are bit-identical either way.
    cache_mb: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", str(self.path))
        if self.kind not in ("auto", "csv", "parquet", "folder", "wds"):
            raise DataError(f"unknown data kind {self.kind!r}: use auto, csv, parquet, folder or wds")
        if self.min_image_side < 1 or self.max_image_pixels < 1:
            raise DataError("min_image_side and max_image_pixels must be positive")
        if self.shuffle_buffer < 0 or self.bad_sample_limit < 1:
            raise DataError("shuffle_buffer must be >= 0 and bad_sample_limit >= 1")
        if self.cache_mb < 0:
            raise DataError(f"cache_mb must be >= 0 (0 = no cache), got {self.cache_mb}")


def resolve_kind(cfg: DataConfig) -> str:
    """The concrete source kind; raises DataError for a path that does not exist."""
    path = cfg.path
    looks_wds = "{" in path or "::" in path or path.endswith(".tar")
    if cfg.kind == "wds" or (cfg.kind == "auto" and looks_wds):
        return "wds"  # shard existence is checked after brace expansion
    if not os.path.exists(path):
        raise DataError(f"data path does not exist: {path}")
    if cfg.kind != "auto":
        return cfg.kind
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(n.endswith(".tar") for n in names) and not any(
            os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES for n in names
        ):
            return "wds"
        return "folder"
    kind = TABLE_SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise DataError(
            f"cannot tell the format of {path}: expected .csv/.tsv/.parquet, a folder, or .tar shards "
            "(or set kind)"
        )
    return kind


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def seed_for(*parts: int) -> int:
    """A 63-bit seed hashing several integers (seed, epoch, index, ...): nearby tuples give
    unrelated seeds, which ``seed + epoch`` style arithmetic would not. Same on every platform."""
    data = b"".join((p & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little") for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def rng_for(*parts: int):  # -> numpy.random.Generator
    import numpy as np

    return np.random.default_rng(seed_for(*parts))

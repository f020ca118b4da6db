"""CSV / TSV / Parquet tables of (image path, caption) rows; paths are relative to the table.

Rows are kept in flat buffers (one bytes blob + offsets, or Arrow arrays), not millions of
Python objects: DataLoader workers fork from this process, and touching per-row objects
would copy every page they live on into each worker (reference counts are writes).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from clipforge.data.config import DataConfig
from clipforge.data.skips import RawSample
from clipforge.errors import DataError


class PackedStrings:
    """An immutable list of ``bytes | None`` stored as one blob plus offsets."""

    def __init__(self, items: Sequence[bytes | None]) -> None:
        self._blob = b"".join(x for x in items if x is not None)
        lens = np.array([len(x) if x is not None else 0 for x in items], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self._none = np.array([x is None for x in items], dtype=bool)

    def __len__(self) -> int:
        return len(self._none)

    def __getitem__(self, i: int) -> bytes | None:
        if self._none[i]:
            return None
        return self._blob[self._offsets[i] : self._offsets[i + 1]]


class TableIndex:
    """Rows of a table. ``images`` holds paths (str/bytes) or encoded images (bytes, Parquet)."""

    def __init__(self, source: str, images: Any, captions: Any, images_are_paths: bool,
                 bad: dict[int, str] | None = None, extras: Any = None) -> None:
        self.source, self.base = source, os.path.dirname(os.path.abspath(source))
        self._images, self._captions, self._paths = images, captions, images_are_paths
        self._bad, self._extras = bad or {}, extras

    def __len__(self) -> int:
        return len(self._images)

    def raw(self, i: int) -> RawSample:
        where = f"{self.source}:row {i + 1}"
        if i in self._bad:
            return RawSample(where, None, None, bad=self._bad[i])
        image, caption = _py(self._images[i]), _py(self._captions[i])
        if self._paths and image is not None:
            path = os.fsdecode(image)
            image = path if os.path.isabs(path) or not path else os.path.join(self.base, path)
            where = f"{where} ({image})"
        return RawSample(where, image, caption)

    def extra(self, i: int) -> dict[str, Any] | None:
        """The row's other columns (written as ``{key}.json`` by ``pack``)."""
        if self._extras is None or i in self._bad:
            return None
        if isinstance(self._extras, PackedStrings):
            return json.loads(self._extras[i])
        return {name: _py(col[i]) for name, col in self._extras.items()}


def _py(v: Any) -> Any:
    return v.as_py() if hasattr(v, "as_py") else v


def _columns_error(path: str, wanted: list[str], have: list[str]) -> DataError:
    return DataError(f"{path}: no column {' or '.join(repr(w) for w in wanted)}; available columns: {have}")


def read_csv(cfg: DataConfig, with_extras: bool = False) -> TableIndex:
    """CSV (``,``) or TSV (``\\t``, for .tsv/.tab). A row that cannot be parsed becomes a
    'malformed_row' entry: it is skipped and counted like any other bad sample."""
    path = cfg.path
    delim = "\t" if os.path.splitext(path)[1].lower() in (".tsv", ".tab") else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a caption may be long; it is kept whole
    # surrogateescape keeps invalid UTF-8 bytes: the caption is rejected alone, not the file.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delim)
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            raise DataError(f"{path}: empty table (no header row)") from None
        header = [h.strip() for h in header]
        missing = [k for k in (cfg.image_key, cfg.caption_key) if k not in header]
        if missing:
            raise _columns_error(path, missing, header)
        ii, ci = header.index(cfg.image_key), header.index(cfg.caption_key)
        others = [(j, h) for j, h in enumerate(header) if j not in (ii, ci)]
        images: list[bytes | None] = []
        captions: list[bytes | None] = []
        extras: list[bytes | None] = []
        bad: dict[int, str] = {}
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error:
                row = None
            if row == []:
                continue  # a blank line is not a sample
            if row is None or len(row) != len(header):
                bad[len(images)] = "malformed_row"
                images.append(None), captions.append(None), extras.append(None)
                continue
            images.append(_enc(row[ii]))
            captions.append(_enc(row[ci]))
            if with_extras and others:
                extras.append(json.dumps({h: row[j] for j, h in others}).encode())
    if not images:
        raise DataError(f"{path}: the table has a header but no rows")
    return TableIndex(path, PackedStrings(images), PackedStrings(captions), True, bad,
                      PackedStrings(extras) if with_extras and others else None)


def _enc(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def read_parquet(cfg: DataConfig, with_extras: bool = False) -> TableIndex:
    """Parquet with a string (path) or binary (encoded image) image column."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'clipforge[eval]'") from None
    try:
        pf = pq.ParquetFile(cfg.path)
    except Exception as e:  # noqa: BLE001 - any reader error means the file is not usable Parquet
        raise DataError(f"{cfg.path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [k for k in (cfg.image_key, cfg.caption_key) if k not in names]
    if missing:
        raise _columns_error(cfg.path, missing, names)
    table = pf.read(columns=None if with_extras else [cfg.image_key, cfg.caption_key])
    if table.num_rows == 0:
        raise DataError(f"{cfg.path}: the table has no rows")
    images = table.column(cfg.image_key).combine_chunks()
    captions = table.column(cfg.caption_key).combine_chunks()
    t = images.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        paths = True
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        paths = False
    else:
        raise DataError(f"{cfg.path}: column {cfg.image_key!r} has type {t}; expected paths (string) or bytes")
    extras = None
    if with_extras:
        extras = {n: table.column(n).combine_chunks() for n in names if n not in (cfg.image_key, cfg.caption_key)}
    return TableIndex(cfg.path, images, captions, paths, extras=extras or None)

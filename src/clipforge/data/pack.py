"""``pack_dataset``: a table or image folder -> WebDataset shards of resized JPEGs.

Samples keep the source's order and are keyed by their position in the output
(``000000123.jpg`` + ``.txt`` [+ ``.json`` with the row's other columns]). Bad inputs are
skipped and counted with the training loader's rules, so shards hold only usable samples.
Each shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.config import DataConfig, resolve_kind
from clipforge.data.skips import Skip, load_sample, note_skip
from clipforge.errors import DataError

_STATE: dict[str, Any] = {}  # per process: the index and settings (set once per worker)


def _init(index: Any, cfg: DataConfig, max_side: int, quality: int) -> None:
    _STATE.update(index=index, cfg=cfg, max_side=max_side, quality=quality)


def _pack_one(i: int) -> tuple[bytes, bytes, bytes | None] | Skip:
    """Decode, shrink so the longer side is at most max_side, re-encode as JPEG."""
    index, cfg = _STATE["index"], _STATE["cfg"]
    got = load_sample(index.raw(i), cfg.min_image_side, cfg.max_image_pixels)
    if isinstance(got, Skip):
        return got
    img, caption = got
    w, h = img.size
    side = _STATE["max_side"]
    if max(w, h) > side:
        s = side / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=_STATE["quality"])
    extra = index.extra(i)
    meta = json.dumps(extra, ensure_ascii=False, default=str).encode() if extra else None
    return buf.getvalue(), caption.encode(), meta


class _ShardWriter:
    def __init__(self, out: Path, shard_size: int, width: int) -> None:
        self.out, self.shard_size, self.width = out, shard_size, width
        self.shards, self.bytes, self._tar, self._tmp, self._in_shard = 0, 0, None, None, 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._tmp = self.out / f"{self.shards:0{self.width}d}.tar.partial"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed: same input, same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".partial"
        os.replace(self._tmp, final)
        self.bytes += final.stat().st_size
        self.shards, self._tar, self._in_shard = self.shards + 1, None, 0

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def pack_dataset(
    src: DataConfig,
    out_dir: str | Path,
    max_side: int = 512,
    jpeg_quality: int = 90,
    shard_size: int = 1000,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/00000.tar ...`` and ``stats.json``; returns the stats (samples, skipped by
    kind, shards, bytes, seconds, and ``pattern``: the brace pattern to train on)."""
    from tqdm import tqdm

    from clipforge.data.sources import open_index

    if max_side < 1 or not 1 <= jpeg_quality <= 100 or shard_size < 1:
        raise DataError(f"bad pack settings: max_side={max_side}, jpeg_quality={jpeg_quality} (1..100), "
                        f"shard_size={shard_size}")
    kind = resolve_kind(src)
    if kind == "wds":
        raise DataError(f"{src.path} is already WebDataset shards; pack reads a CSV/TSV/Parquet table or a folder")
    index = open_index(src, kind, with_extras=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.tar")) + sorted(out.glob("*.tar.partial"))
    if old and not overwrite:
        raise DataError(f"{out} already holds shards ({old[0].name}, ...): choose an empty folder or overwrite")
    for p in old:
        p.unlink()
    n = len(index)
    width = max(5, len(str(math.ceil(n / shard_size) - 1)))
    workers = workers or min(8, os.cpu_count() or 1)
    t0 = time.perf_counter()
    counts: Counter = Counter()
    writer = _ShardWriter(out, shard_size, width)
    written = 0
    pool = mp.Pool(workers, _init, (index, src, max_side, jpeg_quality)) if workers > 1 else None
    try:
        if pool is None:
            _init(index, src, max_side, jpeg_quality)
            results = map(_pack_one, range(n))
        else:
            results = pool.imap(_pack_one, range(n), chunksize=max(1, min(64, n // (workers * 8))))
        bar = tqdm(results, total=n, unit="img", desc="pack", disable=not progress, dynamic_ncols=True)
        for res in bar:
            if isinstance(res, Skip):
                note_skip(res, counts)
                bar.set_postfix(skipped=sum(counts.values()), refresh=False)
                continue
            jpg, txt, meta = res
            members = {"jpg": jpg, "txt": txt, **({"json": meta} if meta is not None else {})}
            writer.add(f"{written:09d}", members)
            written += 1
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        _STATE.clear()
    if written == 0:
        raise DataError(f"nothing to pack: all {n} samples of {src.path} were skipped ({dict(counts)})")
    last = writer.shards - 1
    pattern = str(out / (f"{{{0:0{width}d}..{last:0{width}d}}}.tar" if last > 0 else f"{0:0{width}d}.tar"))
    stats = {
        "source": src.path, "pattern": pattern, "samples": written, "skipped": dict(sorted(counts.items())),
        "skipped_total": sum(counts.values()), "shards": writer.shards, "bytes": writer.bytes,
        "seconds": round(time.perf_counter() - t0, 3), "max_side": max_side, "jpeg_quality": jpeg_quality,
        "shard_size": shard_size,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

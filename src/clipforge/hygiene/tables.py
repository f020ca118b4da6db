"""Training lists in and out: a table's rows filtered, its image paths kept valid where it is written.

A CSV/TSV/Parquet names images relative to itself; a filtered copy written elsewhere rewrites
them relative to the copy, so ``clipforge train --data COPY`` reads the same files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clipforge.errors import DataError
from clipforge.search.sources import CAPTION_COLUMNS, PATH_COLUMNS, TABLE_EXTS


def is_table(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TABLE_EXTS and Path(path).is_file()


def read_table(path: str | Path) -> pa.Table:
    p = Path(path)
    try:
        if p.suffix.lower() == ".parquet":
            return pq.read_table(p)
        # Every column as text: a filtered copy must keep the values exactly as written.
        head = pacsv.read_csv(p, parse_options=pacsv.ParseOptions(delimiter="\t" if p.suffix.lower() == ".tsv" else ","),
                              read_options=pacsv.ReadOptions(block_size=1 << 26))
        return head.cast(pa.schema([pa.field(f.name, pa.string()) for f in head.schema]))
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{p}: cannot read the table ({' '.join(str(e).split())[:200]})") from None


def column(table: pa.Table, wanted: str | None, candidates: Sequence[str], what: str, path: str | Path) -> str:
    names = table.column_names
    if wanted:
        if wanted not in names:
            raise DataError(f"{path}: no {what} column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise DataError(f"{path}: no {what} column (looked for {', '.join(candidates)}; columns: {', '.join(names)})")


def image_column(table: pa.Table, path: str | Path, wanted: str | None = None) -> str:
    return column(table, wanted, PATH_COLUMNS, "image path", path)


def caption_column(table: pa.Table, path: str | Path, wanted: str | None = None) -> str:
    return column(table, wanted, CAPTION_COLUMNS, "caption", path)


def absolute_paths(table: pa.Table, src: str | Path, image_col: str) -> list[str]:
    base = Path(src).resolve().parent
    return [os.path.abspath(v if os.path.isabs(v) else base / v) for v in table.column(image_col).to_pylist()]


def write_rows(table: pa.Table, src: str | Path, keep: Sequence[int], out: str | Path, image_col: str) -> Path:
    """Rows ``keep`` of ``table`` (read from ``src``) written to ``out`` (CSV, TSV or Parquet by its suffix)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sub = table.take(pa.array(list(keep), pa.int64()))
    absolute = absolute_paths(sub, src, image_col)
    here = out.resolve().parent
    rel = [os.path.relpath(p, here) for p in absolute]
    sub = sub.set_column(sub.column_names.index(image_col), image_col, pa.array(rel, pa.string()))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.suffix.lower() == ".parquet":
        pq.write_table(sub, tmp)
    else:
        delimiter = "\t" if out.suffix.lower() == ".tsv" else ","
        pacsv.write_csv(sub, tmp, pacsv.WriteOptions(delimiter=delimiter, quoting_style="needed"))
    os.replace(tmp, out)
    return out


def write_pairs(paths: Sequence[str], captions: Sequence[str | None], out: str | Path) -> Path:
    """An ``image,caption`` CSV of absolute paths (a training list made from embedding metadata)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tbl = pa.table({"image": pa.array(list(paths), pa.string()),
                    "caption": pa.array([c if c is not None else "" for c in captions], pa.string())})
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pacsv.write_csv(tbl, tmp, pacsv.WriteOptions(quoting_style="needed"))
    os.replace(tmp, out)
    return out


def shard_files(spec: str | Path) -> list[str] | None:
    """The shards of a WebDataset source (a ``.tar``, a brace pattern, a folder of ``.tar``), else None."""
    from clipforge.shards import expand_braces

    s = str(spec)
    if "{" in s or s.endswith(".tar"):
        return [os.path.abspath(p) for p in expand_braces(s)]
    p = Path(s)
    shards = sorted(str(t.resolve()) for t in p.glob("*.tar")) if p.is_dir() else []
    return shards or None


def _key(member: str) -> str:
    head, _, base = member.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{head}/{stem}" if head else stem


def write_shards(shards: Sequence[str], drop: set[str], out: str | Path) -> dict[str, int]:
    """Copies of ``shards`` in folder ``out`` without the samples of the members in ``drop``
    (``<shard>/<member>`` paths, as embedding metadata names them): a folder ``clipforge train
    --data`` reads as it reads the originals. Returns samples before and after."""
    import tarfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gone: dict[str, set[str]] = {}
    for d in drop:
        shard, _, member = d.partition(".tar/")
        gone.setdefault(os.path.abspath(shard + ".tar"), set()).add(_key(member))
    before = after = 0
    for shard in shards:
        skip = gone.get(os.path.abspath(shard), set())
        dest = out / Path(shard).name
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        keys: set[str] = set()
        with tarfile.open(shard, "r:") as src, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as dst:
            for m in src:
                if not m.isfile():
                    continue
                k = _key(m.name)
                keys.add(k)
                if k not in skip:
                    dst.addfile(m, src.extractfile(m))
        os.replace(tmp, dest)
        before += len(keys)
        after += len(keys - skip)
    return {"samples_before": before, "samples_after": after}

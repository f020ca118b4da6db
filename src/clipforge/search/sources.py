"""What to embed: an image folder, a CSV/TSV/Parquet of paths, WebDataset shards, or a text file.

Every image source becomes one Arrow table with a stable row order, because embedding resumes
by input position: row ``i`` is always the same image as long as the input is unchanged.
Columns: ``path`` (str), ``caption`` (str, when the source has captions), any extra metadata
columns, and for WebDataset members ``tar_offset`` / ``nbytes`` so a worker can read the
member directly without scanning the shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from clipforge.errors import DataError
from clipforge.imageio import RefusedFile, read_limited, walk_files
from clipforge.shards import expand_braces

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PATH_COLUMNS = ("path", "image_path", "filepath", "file", "filename", "image", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "alt", "description")
TABLE_EXTS = (".csv", ".tsv", ".parquet")
# Columns the embedder writes itself; same-named extra columns of a source are dropped.
RESERVED = {"path", "caption", "width", "height", "nbytes", "position", "tar_offset"}
# Tar members are judged by their header before any byte is read (as training's data/wds.py does):
# a sparse member (a few stored bytes expanding to any size) or one declaring more than this is
# never read. An image member is still listed, so that embedding reports it in skipped.tsv
# (``nbytes`` = -1 marks a sparse one); a caption or JSON member is taken as absent.
MAX_MEMBER_BYTES = 64 * 2**20
MAX_SIDECAR_BYTES = 2**20  # a caption .txt beside an image: the first MiB is kept
SPARSE = -1


@dataclass(frozen=True)
class InputSpec:
    """``input``: a folder, a table file, a ``.tar`` shard, a folder of shards or a brace pattern."""

    input: str
    path_column: str | None = None  # default: first of PATH_COLUMNS present
    caption_column: str | None = None  # default: first of CAPTION_COLUMNS present


def list_images(spec: InputSpec) -> pa.Table:
    """The rows to embed, in a fixed order (see module docstring)."""
    src = spec.input
    if "{" in src or src.endswith(".tar"):
        return _list_shards(expand_braces(src))
    p = Path(src)
    if not p.exists():
        raise DataError(f"input {src!r} does not exist")
    if p.is_dir():
        table = _list_folder(p)
        if table.num_rows == 0:
            shards = sorted(str(s) for s in p.glob("*.tar"))
            if shards:
                return _list_shards(shards)
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found under {src!r}")
        return table
    if p.suffix.lower() in TABLE_EXTS:
        return _list_table(p, spec)
    raise DataError(f"cannot read images from {src!r}: expected a folder, .csv/.tsv/.parquet, or .tar shards")


def input_fingerprint(table: pa.Table) -> str:
    """sha256 of the ordered paths: a resumed run must see exactly the same inputs."""
    h = hashlib.sha256()
    for chunk in table.column("path").chunks:
        for path in chunk.to_pylist():
            h.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _list_folder(root: Path) -> pa.Table:
    # Links are followed, but no folder is walked twice (no cycles) and no file listed twice.
    paths = walk_files(str(root), lambda name: name.lower().endswith(IMAGE_EXTS))
    paths = sorted(os.path.abspath(p) for p in paths)
    # Same-stem .txt files are captions (the folder+sidecar dataset layout).
    captions = [_read_sidecar(p) for p in paths]
    cols: dict[str, list] = {"path": paths}
    if any(c is not None for c in captions):
        cols["caption"] = captions
    return pa.table(cols)


def _read_sidecar(path: str) -> str | None:
    """The same-stem .txt caption (its first MiB), or None when there is none or it cannot be read."""
    txt = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(txt):
        return None
    try:
        data = read_limited(txt, MAX_SIDECAR_BYTES, truncate=True)
    except (OSError, RefusedFile):
        return None
    return data.decode("utf-8", errors="replace").strip()


def _read_table(p: Path) -> pa.Table:
    try:
        if p.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p)
        import pyarrow.csv as pcsv

        delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
        return pcsv.read_csv(p, parse_options=pcsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot read table {str(p)!r}: {e}") from None


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, src: Path) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{what} column {wanted!r} not in {str(src)!r} (columns: {', '.join(names)})")
        return wanted
    lower = {n.lower(): n for n in names}
    return next((lower[c] for c in candidates if c in lower), None)


def _list_table(p: Path, spec: InputSpec) -> pa.Table:
    table = _read_table(p)
    names = table.column_names
    path_col = _pick(names, spec.path_column, PATH_COLUMNS, "path", p)
    if path_col is None:
        listed = ", ".join(names)
        raise DataError(f"no image path column in {str(p)!r}; name one as path_column (columns: {listed})")
    cap_col = _pick(names, spec.caption_column, CAPTION_COLUMNS, "caption", p)
    raw = [None if v is None else str(v) for v in table.column(path_col).to_pylist()]
    if any(v is None or v == "" for v in raw):
        raise DataError(f"empty image path in column {path_col!r} of {str(p)!r}")
    if any(re.match(r"^[a-z][a-z0-9+.-]*://", v) for v in raw):
        raise DataError(f"{str(p)!r} lists URLs; download them first (e.g. with img2dataset), then embed the files")
    base = p.parent
    paths = [os.path.abspath(v if os.path.isabs(v) else base / v) for v in raw]
    cols: dict[str, pa.Array | list] = {"path": paths}
    if cap_col is not None:
        caps = table.column(cap_col).to_pylist()
        cols["caption"] = pa.array([None if v is None else str(v) for v in caps], pa.string())
    for name in names:
        if name in (path_col, cap_col) or name in RESERVED:
            continue
        col = table.column(name).combine_chunks()
        cols[name] = col if _is_scalar_type(col.type) else pa.array([json.dumps(v) for v in col.to_pylist()])
    return pa.table(cols)


def _is_scalar_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t)


def _list_shards(shards: list[str]) -> pa.Table:
    paths: list[str] = []
    captions: list[str | None] = []
    offsets: list[int] = []
    sizes: list[int] = []
    extras: list[dict] = []
    for shard in shards:
        if not os.path.isfile(shard):
            raise DataError(f"shard {shard!r} does not exist")
        shard = os.path.abspath(shard)
        with open(shard, "rb") as f:
            for _key, members in _samples(shard):
                img = next((m for ext, m in members.items() if "." + ext in IMAGE_EXTS), None)
                if img is None:
                    continue
                paths.append(f"{shard}/{img.name}")
                offsets.append(img.offset_data)
                sizes.append(SPARSE if img.issparse() else img.size)  # read_bytes refuses both kinds
                captions.append(_member_text(f, members.get("txt")))
                extras.append(_flat_json(_member_text(f, members.get("json"))))
    if not paths:
        raise DataError(f"no image members found in {len(shards)} shard(s) starting with {shards[0]!r}")
    cols: dict[str, list] = {"path": paths}
    if any(c is not None for c in captions):
        cols["caption"] = captions
    cols["tar_offset"] = offsets
    cols["nbytes"] = sizes
    keys = sorted({k for e in extras for k in e})
    for k in keys:
        cols[k] = _column([e.get(k) for e in extras])
    return pa.table(cols)


def _column(values: list) -> pa.Array:
    """An Arrow column; values of mixed types (e.g. ints and strings across samples) become strings."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _samples(shard: str):
    """(key, {ext: TarInfo}) groups in shard order; the key is the name up to the basename's first dot."""
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed only: workers seek to members
            # Only headers are read here (each member's data is skipped by a seek), sparse maps included.
            current, members = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(d, stem)
                if key != current and members:
                    yield current, members
                    members = {}
                current = key
                members[ext.lower()] = m
            if members:
                yield current, members
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read shard {shard!r} as an uncompressed tar: {e}") from None


def _member_text(f, info: tarfile.TarInfo | None) -> str | None:
    """A caption or JSON member's text; None for a missing, sparse or oversized member (unread)."""
    if info is None or info.issparse() or info.size > MAX_MEMBER_BYTES:
        return None
    f.seek(info.offset_data)
    return f.read(info.size).decode("utf-8", errors="replace").strip()


def _flat_json(text: str | None) -> dict:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(obj, dict):
        return {}
    return {
        k: (v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v))
        for k, v in obj.items()
        if isinstance(k, str) and k not in RESERVED
    }


def read_texts(path: str | Path, caption_column: str | None = None) -> list[str]:
    """Texts to embed: one per line of a .txt file, or the caption column of a table."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {str(p)!r} does not exist")
    if p.suffix.lower() in TABLE_EXTS:
        table = _read_table(p)
        col = _pick(table.column_names, caption_column, CAPTION_COLUMNS, "caption", p)
        if col is None:
            raise DataError(f"no text column in {str(p)!r}; name one as caption_column")
        texts = ["" if v is None else str(v) for v in table.column(col).to_pylist()]
    else:
        with open(p, encoding="utf-8", errors="replace") as f:
            texts = [line.strip() for line in f if line.strip()]
    if not texts:
        raise DataError(f"no texts in {str(p)!r}")
    return texts

"""Metadata next to the vector index, in SQLite.

Row ``id`` is the FAISS id of the item's vector. Fixed columns are the ones the embedder
writes; any other metadata column travels as JSON in ``meta`` and can still be filtered on.
``parts`` records which embedding parts were ingested, so indexing the same directory again
only adds what is new. ``deleted`` hides a row from every search: 1 marks a tombstone (an
index type that cannot remove vectors, HNSW, still holds it), 2 a near-duplicate dropped by
``clipforge dedup`` (remembered so ``embed --only-new`` does not bring it back).
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator

from clipforge.errors import DataError

FIXED = ("path", "caption", "width", "height", "nbytes")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MAX_FILTER_VALUES = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    caption TEXT,
    width INTEGER,
    height INTEGER,
    nbytes INTEGER,
    meta TEXT NOT NULL DEFAULT '{}',
    part INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS items_path ON items(path);
CREATE TABLE IF NOT EXISTS parts (
    id INTEGER PRIMARY KEY,
    emb_dir TEXT NOT NULL,
    name TEXT NOT NULL,
    rows INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    UNIQUE (emb_dir, name)
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise DataError(f"metadata store {str(self.path)!r} does not exist")
            uri = f"file:{self.path}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.executescript(_SCHEMA)
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    # -- writing (callers commit) -----------------------------------------------------------
    def next_id(self) -> int:
        return (self.db.execute("SELECT MAX(id) FROM items").fetchone()[0] or -1) + 1

    def add_part(self, emb_dir: str, name: str, rows: int, first_id: int) -> int:
        q = "INSERT INTO parts (emb_dir, name, rows, first_id) VALUES (?, ?, ?, ?)"
        return int(self.db.execute(q, (emb_dir, name, rows, first_id)).lastrowid)

    def parts(self) -> list[tuple[str, str, int, int]]:
        """(emb_dir, name, rows, first_id) of every ingested part, in ingestion order."""
        q = "SELECT emb_dir, name, rows, first_id FROM parts ORDER BY first_id"
        return [tuple(r) for r in self.db.execute(q)]

    def has_part(self, emb_dir: str, name: str) -> bool:
        q = "SELECT 1 FROM parts WHERE emb_dir = ? AND name = ?"
        return self.db.execute(q, (emb_dir, name)).fetchone() is not None

    def add_items(self, first_id: int, rows: list[dict[str, Any]], part_id: int | None) -> None:
        self.db.executemany(
            "INSERT INTO items (id, path, caption, width, height, nbytes, meta, part) VALUES (?,?,?,?,?,?,?,?)",
            [
                (first_id + i, r["path"], r.get("caption"), r.get("width"), r.get("height"), r.get("nbytes"),
                 json.dumps({k: _jsonable(v) for k, v in r.items() if k not in FIXED and k != "position"}), part_id)
                for i, r in enumerate(rows)
            ],
        )  # fmt: skip

    def live_ids_for_paths(self, paths: Iterable[str]) -> list[int]:
        out: list[int] = []
        paths = list(paths)
        for i in range(0, len(paths), 500):
            chunk = paths[i : i + 500]
            q = f"SELECT id FROM items WHERE deleted = 0 AND path IN ({','.join('?' * len(chunk))})"
            out += [r[0] for r in self.db.execute(q, chunk)]
        return out

    def delete(self, ids: list[int], mark: int = 0) -> None:
        """Drop rows (``mark=0``), or hide them as tombstones (1) or dropped duplicates (2)."""
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            if mark:
                self.db.execute(f"UPDATE items SET deleted = ? WHERE id IN ({marks})", [mark, *chunk])
            else:
                self.db.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)

    def set_info(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def commit(self) -> None:
        self.db.commit()

    # -- reading ----------------------------------------------------------------------------
    def info(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items WHERE deleted = 0").fetchone()[0]

    def live_ids(self):
        import numpy as np

        return np.array([r[0] for r in self.db.execute("SELECT id FROM items WHERE deleted = 0 ORDER BY id")], np.int64)

    def tombstones(self) -> list[int]:
        """Hidden rows; searches exclude them (their vectors may still be in the index)."""
        return [r[0] for r in self.db.execute("SELECT id FROM items WHERE deleted != 0")]

    def get(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Live items by id, as flat dicts (fixed columns + metadata)."""
        out: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ids), 500):
            chunk = [int(x) for x in ids[i : i + 500]]
            q = f"SELECT * FROM items WHERE deleted = 0 AND id IN ({','.join('?' * len(chunk))})"
            for r in self.db.execute(q, chunk):
                item = {k: v for k, v in json.loads(r["meta"]).items() if k not in FIXED and k != "id"}
                item.update({"id": r["id"], **{k: r[k] for k in FIXED if r[k] is not None}})
                out[r["id"]] = item
        return out

    def iter_live(self, batch: int = 10_000) -> Iterator[list[tuple[int, str]]]:
        last = -1
        while True:
            q = "SELECT id, path FROM items WHERE deleted = 0 AND id > ? ORDER BY id LIMIT ?"
            rows = [(r[0], r[1]) for r in self.db.execute(q, (last, batch))]
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def paths(self, with_duplicates: bool = False) -> set[str]:
        """Paths of live items (and of dropped near-duplicates with ``with_duplicates``)."""
        q = f"SELECT path FROM items WHERE deleted IN ({'0, 2' if with_duplicates else '0'})"
        return {r[0] for r in self.db.execute(q)}

    def filter_ids(self, flt: dict[str, Any], limit: int) -> list[int] | None:
        """Ids of live items matching every ``key: value`` (a list means any of); None if more than ``limit``."""
        where, args = filter_sql(flt)
        q = f"SELECT id FROM items WHERE deleted = 0 AND {where} LIMIT ?"
        ids = [r[0] for r in self.db.execute(q, (*args, limit + 1))]
        return None if len(ids) > limit else ids


def filter_sql(flt: dict[str, Any]) -> tuple[str, list[Any]]:
    """SQL for a metadata filter; raises ``DataError`` with a clear message for a malformed one."""
    if not isinstance(flt, dict) or not flt:
        raise DataError("filter must be a non-empty object of field: value")
    clauses, args = [], []
    for key, value in flt.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise DataError(f"filter field {key!r} is not a valid name (letters, digits, _ . -; at most 64)")
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > MAX_FILTER_VALUES:
            raise DataError(f"filter field {key!r} needs 1 to {MAX_FILTER_VALUES} values")
        for v in values:
            if not isinstance(v, (str, int, float, bool)) or (isinstance(v, float) and not math.isfinite(v)):
                raise DataError(f"filter value for {key!r} must be a string, number or boolean, got {v!r}")
            if isinstance(v, int) and not -(2**63) <= v < 2**63:  # SQLite integers are 64-bit
                raise DataError(f"filter value for {key!r} is out of range: {v}")
        col = key if key in FIXED else f"json_extract(meta, '$.\"{key}\"')"
        clauses.append(f"{col} IN ({','.join('?' * len(values))})")
        args += [int(v) if isinstance(v, bool) else v for v in values]
    return " AND ".join(clauses), args


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)

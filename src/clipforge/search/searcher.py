"""Read side of an index directory: k-nearest-neighbour search with optional metadata filters."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import DataError
from clipforge.search.layout import REMOVABLE, index_files, load_info
from clipforge.search.index import set_params
from clipforge.search.store import Store

# A filter matching at most this many items is answered exactly over their vectors; larger
# ones go through FAISS with an id selector (HNSW cannot route a search through a tiny subset).
EXACT_FILTER_LIMIT = 20_000
FILTER_CACHE = 256  # distinct filters remembered (each at most EXACT_FILTER_LIMIT ids: <= 40 MB in all)


class SearchIndex:
    def __init__(self, index_dir: str | Path) -> None:
        import faiss

        self.dir = Path(index_dir)
        self.info = load_info(self.dir)
        faiss_path, store_path, _ = index_files(self.dir)
        self.store = Store(store_path, readonly=True)
        if self.store.info("version") != self.info.get("version"):
            raise DataError(f"{self.dir}: index and metadata disagree (an update was interrupted); rebuild the index")
        self.index = faiss.read_index(str(faiss_path))
        self.kind: str = self.info["kind"]
        self.params: dict = self.info.get("params") or {}
        set_params(self.index, self.kind, self.params)
        # HNSW and ivfpqr still hold the vectors of removed items; other kinds deleted them.
        tomb = np.array(self.store.tombstones() if self.kind not in REMOVABLE else [], np.int64)
        self._tombstones = tomb if len(tomb) else None
        self._lock = threading.Lock()  # sqlite connection and the lazy direct map
        self._direct_map = False
        self._id_map: np.ndarray | None = None
        self._filters: OrderedDict[str, np.ndarray | None] = OrderedDict()  # _small_filter's answers

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        with self._lock:
            return self.store.count()

    def items(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        with self._lock:
            return self.store.get(ids)

    def vectors(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Stored vectors by id ([n, d]; approximate for IVF-PQ)."""
        import faiss

        with self._lock:
            if self.kind in ("ivf", "ivfpq") and not self._direct_map:
                faiss.extract_index_ivf(self.index).set_direct_map_type(faiss.DirectMap.Hashtable)
                self._direct_map = True
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        return self.index.reconstruct_batch(np.asarray(ids, np.int64))  # one call: no Python loop per vector

    def search(self, queries: np.ndarray, k: int, flt: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
        """Best-first hits per query row; each hit is the item's metadata plus ``score`` (cosine)."""
        scores, found = self.search_ids(queries, k, flt)
        items = self.items(sorted({int(i) for i in found.ravel() if i >= 0}))
        return [
            [{**items[int(i)], "score": round(float(s), 6)} for s, i in zip(srow, irow) if int(i) in items]
            for srow, irow in zip(scores, found)
        ]

    def search_ids(
        self, queries: np.ndarray, k: int, flt: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], ids [q, k]) best first; id -1 where fewer than k items qualify."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)  # [q, d]
        if flt:
            ids = self._small_filter(flt)
            if ids is not None:
                scores, found = self._exact_subset(queries, ids, k)
            else:
                with self._lock:
                    ids = self.store.filter_ids(flt, 1 << 40)
                scores, found = self._search(queries, k, self._selector(np.array(ids, np.int64), keep=True))
        elif self._tombstones is not None:
            scores, found = self._search(queries, k, self._selector(self._tombstones, keep=False))
        else:
            scores, found = self.index.search(queries, k)
        return scores, found

    def _small_filter(self, flt: dict[str, Any]) -> np.ndarray | None:
        """Ids matching ``flt`` when at most ``EXACT_FILTER_LIMIT`` do, else None. Remembered per
        distinct filter (the last ``FILTER_CACHE`` of them): the SQL scan reads every row's metadata
        (tens of ms at 100k items) and the served index does not change while it is open."""
        key = json.dumps(flt, sort_keys=True)
        with self._lock:
            if key in self._filters:
                self._filters.move_to_end(key)
                return self._filters[key]
            found = self.store.filter_ids(flt, EXACT_FILTER_LIMIT)
            ids = None if found is None else np.array(found, np.int64)
            self._filters[key] = ids
            while len(self._filters) > FILTER_CACHE:
                self._filters.popitem(last=False)
        return ids

    def _exact_subset(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not len(ids):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        vecs = self.vectors(ids)  # [m, d]
        scores = queries @ vecs.T  # [q, m]
        kk = min(k, len(ids))
        top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]  # [q, kk]
        return np.take_along_axis(scores, top, 1), ids[top]

    def _selector(self, ids: np.ndarray, keep: bool):
        import faiss

        batch = faiss.IDSelectorBatch(ids)
        return (batch, batch) if keep else (faiss.IDSelectorNot(batch), batch)  # keep both alive

    def _search(self, queries: np.ndarray, k: int, sel) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self.kind == "ivfpqr":
            # IndexIDMap2 would translate only the outer selector, not the IVF's inside the refine
            # step's parameters: search the inner index with the selector translated to its numbering.
            translated = faiss.IDSelectorTranslated(self.index.id_map, sel[0])
            base = faiss.SearchParametersIVF(sel=translated, nprobe=int(self.params.get("nprobe", 1)))
            params = faiss.IndexRefineSearchParameters(sel=translated, base_index_params=base,
                                                       k_factor=float(self.params.get("k_factor", 10)))
            scores, found = faiss.downcast_index(self.index.index).search(queries, k, params=params)
            if self._id_map is None:
                self._id_map = faiss.vector_to_array(self.index.id_map)  # inner position -> store id
            return scores, np.where(found >= 0, self._id_map[np.maximum(found, 0)], -1)
        if self.kind in ("ivf", "ivfpq"):
            params = faiss.SearchParametersIVF(sel=sel[0], nprobe=int(self.params.get("nprobe", 1)))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel[0], efSearch=max(int(self.params.get("efSearch", 16)), 2 * k))
        else:
            params = faiss.SearchParameters(sel=sel[0])
        return self.index.search(queries, k, params=params)

    def close(self) -> None:
        self.store.close()

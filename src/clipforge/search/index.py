"""Build and update a FAISS index from embedding parts, with metadata in SQLite beside it.

    INDEX_DIR/index.faiss   vectors (inner product on L2-normalised embeddings = cosine)
    INDEX_DIR/meta.sqlite   one row per vector, id = FAISS id (see ``store.py``)
    INDEX_DIR/index.json    kind, search parameters, measured recall, model, version

The kind is chosen from the collection size and a memory budget (``plan_index``): exact
search while that is cheap, HNSW while the raw vectors and graph fit and the collection is
small enough to build a graph in reasonable time, then ``ivfpqr`` (IVF lists of 4-bit PQ
codes scanned with SIMD "fast scan", the best ``k_factor * k`` candidates re-ranked exactly
against the stored float32 vectors) while the raw vectors fit, and IVF-PQ when they do not.
(``ivf``, IVF-Flat, stays available by name.) Approximate indexes are tuned (nprobe /
efSearch) on held-out queries until they reach the target recall@k against exact search:
vectors of the collection that are not yet in the index while it is tuned (``build.py`` adds
them afterwards), so that they behave like new queries, not like stored points.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from clipforge.errors import DataError
from clipforge.search.layout import EMB_FORMAT, finished_parts

Kind = Literal["auto", "flat", "hnsw", "ivf", "ivfpq", "ivfpqr"]


@dataclass(frozen=True)
class IndexConfig:
    kind: Kind = "auto"
    memory_budget: int = 4 * 2**30  # bytes the index may take in RAM
    exact_below: int = 50_000  # collections up to this size get exact search
    # HNSW builds slowly (~10 min for 250k x 512 on 2 cores); past this ivfpqr is the better trade
    hnsw_below: int = 200_000
    target_recall: float = 0.95  # recall@k the search parameters are tuned to reach
    recall_queries: int = 500
    recall_k: int = 10
    nlist: int | None = None  # IVF lists; default ~4 sqrt(n)
    pq_m: int | None = None  # PQ sub-quantisers; default: the largest that fits the budget
    hnsw_m: int = 32
    fs_m: int | None = None  # ivfpqr: 4-bit PQ sub-quantisers; default d / 4 (2 dimensions per code byte)
    k_factor: int = 10  # ivfpqr: candidates re-ranked exactly, as a multiple of k (with d/4 codes, 20 adds nothing)
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Plan:
    kind: str
    reason: str
    nlist: int = 0
    pq_m: int = 0
    hnsw_m: int = 32
    k_factor: int = 10


@dataclass
class Part:
    emb_dir: str
    name: str  # e.g. "00003"
    npy: Path
    meta: Path
    rows: int
    dim: int
    first_id: int = -1


@dataclass
class Report:
    kind: str
    reason: str
    total: int
    added: int
    removed: int
    params: dict
    recall: dict | None
    seconds: float
    notes: list[str] = field(default_factory=list)


def plan_index(n: int, d: int, cfg: IndexConfig) -> Plan:
    """Which index to build for ``n`` vectors of dimension ``d``, and why."""
    flat_bytes = n * (d * 4 + 16)  # vectors + id maps
    nlist = cfg.nlist or int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
    n_train = n - min(cfg.recall_queries, n // 10)  # recall queries are held out of training
    nlist = max(1, min(nlist, n_train // 39))  # faiss wants >= 39 training points per list
    kind = cfg.kind
    if kind == "auto":
        if n <= cfg.exact_below and flat_bytes <= cfg.memory_budget:
            return Plan("flat", f"{n} vectors <= exact_below={cfg.exact_below}: exact search")
        if n <= cfg.hnsw_below and flat_bytes + n * cfg.hnsw_m * 2 * 4 * 1.1 <= cfg.memory_budget:
            kind, why = "hnsw", "vectors and graph fit the memory budget"
        elif flat_bytes * 1.05 + n * d // 8 <= cfg.memory_budget:
            kind, why = "ivfpqr", "raw vectors fit the memory budget"
        else:
            kind, why = "ivfpq", "raw vectors exceed the memory budget: product-quantised"
    else:
        why = "requested"
    if kind in ("ivf", "ivfpq", "ivfpqr") and nlist < 2:
        return Plan("flat", f"{n} vectors are too few to train IVF lists: exact search")
    if kind == "ivfpq":
        m = cfg.pq_m or _pq_m(n, d, cfg.memory_budget)
        if d % m:
            raise DataError(f"pq_m={m} must divide the embedding dimension {d}")
        return Plan("ivfpq", f"{why} (IVF{nlist},PQ{m})", nlist=nlist, pq_m=m)
    if kind == "ivf":
        return Plan("ivf", f"{why} (IVF{nlist},Flat)", nlist=nlist)
    if kind == "ivfpqr":
        if not cfg.nlist:
            # Half the usual lists: fast-scan codes are cheap to scan, and k-means and the assignment of
            # every vector (most of a build) cost in proportion (1M: 2048 lists, a ~5 min build on 2 cores).
            nlist = max(1, min(nlist // 2, n_train // 39))
        m = cfg.fs_m or max(1, d // 4)
        if d % m:
            raise DataError(f"fs_m={m} must divide the embedding dimension {d}")
        return Plan("ivfpqr", f"{why} (IVF{nlist},PQ{m}x4fs, re-ranking {cfg.k_factor}k exactly)", nlist=nlist,
                    pq_m=m, k_factor=cfg.k_factor)
    if kind == "hnsw":
        return Plan("hnsw", f"{why} (HNSW{cfg.hnsw_m})", hnsw_m=cfg.hnsw_m)
    return Plan("flat", f"{why}: exact search")


def _pq_m(n: int, d: int, budget: int) -> int:
    """Largest number of 1-byte codes per vector (dividing d, at most d/2) that fits the budget."""
    for m in sorted((m for m in range(1, d // 2 + 1) if d % m == 0), reverse=True):
        if n * (m + 16) <= budget:
            return m
    raise DataError(f"{n} vectors do not fit a memory budget of {budget} bytes even at 1 byte each")


def scan_embeddings(emb_dir: str | Path) -> tuple[list[Part], dict]:
    """Finished parts of an embedding directory (image parts; text parts for text-only runs)."""
    root = Path(emb_dir).resolve()
    manifest_path = root / "embeddings.json"
    if not manifest_path.is_file():
        raise DataError(f"{str(emb_dir)!r} is not an embeddings directory (no embeddings.json); run clipforge embed")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path}: cannot read the manifest ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EMB_FORMAT:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise DataError(f"{str(emb_dir)!r}: unknown embeddings format {manifest.get('format')!r}")
    kind = "text_emb" if manifest.get("kind") == "text" else "img_emb"
    dim = manifest.get("embed_dim")
    parts = []
    for k in finished_parts(root):
        npy = root / kind / f"{kind}_{k:05d}.npy"
        arr = open_part(npy, dim if isinstance(dim, int) else None)
        parts.append(Part(str(root), f"{k:05d}", npy, root / "metadata" / f"metadata_{k:05d}.parquet", *arr.shape))
    dims = {p.dim for p in parts}
    if len(dims) > 1:
        first = next(p for p in parts if p.dim != parts[0].dim)
        raise DataError(f"{first.npy}: {first.dim}-dimensional vectors, but {parts[0].npy} has {parts[0].dim}")
    return parts, manifest


PART_DTYPES = (np.float16, np.float32)  # what clipforge embed writes (float16) or a user may bring


def open_part(npy: Path, dim: int | None = None) -> np.ndarray:
    """An embedding part, memory-mapped, its header checked against its file: a 2-D float16 or
    float32 array of ``dim`` columns (the manifest's ``embed_dim``) whose data the file holds
    whole. Any defect is a one-line ``DataError`` naming the file; the values are checked
    (finite) when they are read (``read_part``, ``_gather``)."""
    try:
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{npy}: embedding part missing (its metadata file exists); re-run clipforge embed") from None
    except (ValueError, OSError, EOFError) as e:  # truncated, not a .npy, an object array
        why = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{npy}: damaged embedding part ({why}); delete it and its metadata file and re-run "
                        "clipforge embed") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 2:
        raise DataError(f"{npy}: expected a 2-D array [rows, dim] of vectors, found shape "
                        f"{getattr(arr, 'shape', None)}")
    if arr.dtype not in PART_DTYPES:
        raise DataError(f"{npy}: expected float16 or float32 vectors, found {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise DataError(f"{npy}: {arr.shape[1]}-dimensional vectors, but the manifest (embeddings.json) says "
                        f"embed_dim {dim}")
    return arr


def _finite(vecs: np.ndarray, npy: Path, row0: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """``vecs`` unchanged when every value is finite; else a one-line DataError naming the row."""
    bad = ~np.isfinite(vecs).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        row = int(rows[i]) if rows is not None else row0 + i
        raise DataError(f"{npy}: vector {row} is not finite (rows with NaN or inf: {int(bad.sum())}); "
                        "re-embed that part or drop it")
    return vecs


def read_part(part: Part) -> np.ndarray:
    """A part's vectors as float32 [rows, d], checked: shape, dtype, dimension, finite."""
    arr = open_part(part.npy, part.dim)
    if arr.shape[0] != part.rows:
        raise DataError(f"{part.npy}: {arr.shape[0]} vectors, {part.rows} expected (the file changed since it "
                        "was indexed?)")
    return _finite(np.ascontiguousarray(arr, dtype=np.float32), part.npy)  # [rows, d]


def _gather(parts: list[Part], positions: np.ndarray) -> np.ndarray:
    """Rows at global positions (over the concatenated parts), read through memory maps."""
    starts = np.cumsum([0] + [p.rows for p in parts])
    out = np.empty((len(positions), parts[0].dim), np.float32)
    which = np.searchsorted(starts, positions, side="right") - 1
    for j in np.unique(which):
        sel = np.nonzero(which == j)[0]
        rows = positions[sel] - starts[j]
        out[sel] = _finite(open_part(parts[j].npy, parts[j].dim)[rows].astype(np.float32), parts[j].npy, rows=rows)
    return out


def _new_index(plan: Plan, d: int):
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if plan.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if plan.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, plan.hnsw_m, ip)
        hnsw.hnsw.efConstruction = 80
        return faiss.IndexIDMap2(hnsw)
    if plan.kind == "ivf":
        return faiss.index_factory(d, f"IVF{plan.nlist},Flat", ip)
    if plan.kind == "ivfpqr":
        # IndexRefineFlat numbers vectors 0, 1, ... in the order added; the id map gives them store ids.
        refine = faiss.index_factory(d, f"IVF{plan.nlist},PQ{plan.pq_m}x4fs,RFlat", ip)
        faiss.extract_index_ivf(refine).cp.niter = 10  # k-means: 10 rounds (faiss: 25) keep a 1M build short
        faiss.downcast_index(refine).k_factor = float(plan.k_factor)
        return faiss.IndexIDMap2(refine)
    return faiss.index_factory(d, f"IVF{plan.nlist},PQ{plan.pq_m}x8", ip)


def set_params(index, kind: str, params: dict) -> None:
    import faiss

    if kind in ("ivf", "ivfpq", "ivfpqr"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        if kind == "ivfpqr":
            faiss.downcast_index(index.index).k_factor = float(params["k_factor"])
    elif kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params["efSearch"])


def _candidates(kind: str, index) -> list[dict]:
    if kind in ("ivf", "ivfpq", "ivfpqr"):
        import faiss

        nlist = faiss.extract_index_ivf(index).nlist
        probes = [p for p in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024) if p < nlist] + [nlist]
        if kind == "ivfpqr":
            k_factor = faiss.downcast_index(index.index).k_factor
            return [{"nprobe": p, "k_factor": int(k_factor)} for p in probes]
        return [{"nprobe": p} for p in probes]
    if kind == "hnsw":
        return [{"efSearch": e} for e in (16, 32, 64, 128, 256, 512, 1024)]
    return [{}]


def exact_topk(parts: list[Part], queries: np.ndarray, k: int, live: np.ndarray | None = None) -> np.ndarray:
    """Ids of the exact top-k by inner product, streaming over parts (ids from ``first_id``)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for p in parts:
        vecs = read_part(p)
        ids = np.arange(p.first_id, p.first_id + p.rows, dtype=np.int64)
        if live is not None:  # sorted live ids: skip replaced and removed rows
            keep = np.isin(ids, live, assume_unique=True)
            vecs, ids = vecs[keep], ids[keep]
        if len(ids) == 0:
            continue
        scores = queries @ vecs.T  # [q, rows]
        kk = min(k, len(ids))
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # [q, kk]
        heap.add_result(np.take_along_axis(scores, top, 1), ids[top])
    heap.finalize()
    return heap.I


def recall_at_k(approx: np.ndarray, exact: np.ndarray, query_ids: np.ndarray, k: int) -> float:
    """Mean |approx ∩ exact| / k over queries, each query's own id left out of both lists."""
    hits = 0
    for a, e, q in zip(approx, exact, query_ids):
        e_ids = [i for i in e if i != q and i >= 0][:k]
        a_ids = [i for i in a if i != q and i >= 0][:k]
        hits += len(set(a_ids) & set(e_ids))
    return hits / (k * len(exact)) if len(exact) else 1.0


def tune(index, kind: str, queries: np.ndarray, query_ids: np.ndarray, exact: np.ndarray, cfg: IndexConfig):
    """The cheapest search parameters reaching the target recall; when recall plateaus below it
    (PQ codes cap it), the cheapest within 0.005 of the best seen."""
    k = cfg.recall_k
    tried: list[tuple[dict, dict]] = []
    for params in _candidates(kind, index):
        set_params(index, kind, params)
        t = time.perf_counter()
        _, found = index.search(queries, k + 1)
        ms = (time.perf_counter() - t) * 1000 / max(len(queries), 1)
        r = recall_at_k(found, exact, query_ids, k)
        measured = {"k": k, "queries": len(queries), "recall": round(r, 4), "ms_per_query": round(ms, 3), **params}
        tried.append((params, measured))
        if r >= cfg.target_recall:
            break
        if len(tried) >= 3 and r - tried[-3][1]["recall"] < 0.005:
            break
    best = max(t[1]["recall"] for t in tried)
    enough = cfg.target_recall if best >= cfg.target_recall else best - 0.005
    chosen = next(t for t in tried if t[1]["recall"] >= enough)
    set_params(index, kind, chosen[0])
    return chosen


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(tmp))
    os.replace(tmp, path)

"""Embeddings directories as ``clipforge embed`` writes them, without a model or images, and the
id bookkeeping of an index directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = ("cat", "dog", "car", "tree", "boat", "house", "bird", "flower")


def write_synthetic_embeddings(out: Path, rows: int, part_size: int, dim: int = 64, seed: int = 0,
                               prefix: str = "img", fingerprint: str = "synthetic") -> np.ndarray:
    """Random float16 unit vectors, Parquet metadata with path/caption/label (``LABELS`` in turn)
    and a full manifest: the search tests, the fault suite and the load test. Returns the vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.search.layout import EMB_FORMAT, part_name

    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16)  # [rows, dim]
    for sub in ("img_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_parts = -(-rows // part_size)
    for p in range(n_parts):
        lo, hi = p * part_size, min((p + 1) * part_size, rows)
        np.save(out / part_name("img_emb", p, "npy"), vecs[lo:hi])
        table = pa.table({
            "path": [f"/data/{prefix}/{i:07d}.jpg" for i in range(lo, hi)],
            "caption": [f"a photo of a {LABELS[i % len(LABELS)]} number {i}" for i in range(lo, hi)],
            "label": [LABELS[i % len(LABELS)] for i in range(lo, hi)],
            "width": pa.array([256] * (hi - lo), pa.int32()), "height": pa.array([256] * (hi - lo), pa.int32()),
            "nbytes": pa.array([20_000] * (hi - lo), pa.int64()),
            "position": pa.array(range(lo, hi), pa.int64()),
        })
        pq.write_table(table, out / part_name("metadata", p, "parquet"))
    manifest = {"format": EMB_FORMAT, "kind": "image", "inputs": rows, "input": f"synthetic:{prefix}",
                "input_fingerprint": f"{prefix}-{seed}", "part_size": part_size, "parts": n_parts, "embed_dim": dim,
                "model": "nano", "model_fingerprint": fingerprint, "text_embeddings": False}
    (out / "embeddings.json").write_text(json.dumps(manifest, indent=2))
    return vecs


def write_clustered_embeddings(root: Path, n: int, d: int = 32, part: int = 500, seed: int = 0, prefix: str = "img",
                               fingerprint: str = "fp0", x: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The minimal embeddings directory (path, label c0..c2, position; a bare manifest) with
    clustered unit vectors (40 centres), or the rows of ``x``. Returns the vectors as float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    if x is None:
        centres = rng.standard_normal((40, d))
        x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for k, i in enumerate(range(0, n, part)):
        j = min(i + part, n)
        np.save(root / f"img_emb/img_emb_{k:05d}.npy", x[i:j])
        meta = {"path": [f"/photos/{prefix}{r}.jpg" for r in range(i, j)], "label": [f"c{r % 3}" for r in range(i, j)],
                "position": list(range(i, j))}  # fmt: skip
        pq.write_table(pa.table(meta), root / f"metadata/metadata_{k:05d}.parquet")
    manifest = {"format": "clipforge-embeddings/1", "kind": "image", "model": "nano", "model_fingerprint": fingerprint,
                "embed_dim": d}  # fmt: skip
    (root / "embeddings.json").write_text(json.dumps(manifest))
    return x.astype(np.float32)


def index_accounting(index_dir: Path, expected_paths: set[str] | None = None) -> dict:
    """Id bookkeeping of an index directory: items, duplicates, vectors without metadata (and
    the reverse), paths lost, and whether every vector finds itself first."""
    import faiss

    from clipforge.search.searcher import SearchIndex

    idx = SearchIndex(index_dir)
    try:
        live = idx.store.live_ids()
        paths = [p for batch in idx.store.iter_live() for _, p in batch]
        ntotal = int(idx.index.ntotal)
        out = {"items": len(live), "vectors": ntotal, "duplicate_paths": len(paths) - len(set(paths)),
               "vectors_without_item": 0, "items_without_vector": 0, "lost": 0, "self_hit_misses": 0}
        if idx.kind in ("flat", "ivf", "ivfpq"):
            id_map = faiss.vector_to_array(idx.index.id_map) if hasattr(idx.index, "id_map") else None
            if id_map is not None:
                have = set(id_map.tolist())
                out["vectors_without_item"] = len(have - set(live.tolist())) + (len(id_map) - len(have))
                out["items_without_vector"] = len(set(live.tolist()) - have)
        if expected_paths is not None:
            out["lost"] = len(expected_paths - set(paths))
        sample = live[:: max(1, len(live) // 200)]
        vecs = idx.vectors(sample.tolist())
        _, found = idx.search_ids(vecs, 1)
        out["self_hit_misses"] = int((found[:, 0] != sample).sum())
        return out
    finally:
        idx.close()

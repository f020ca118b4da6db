"""``clipforge index``: create an index directory, add new embedding parts to it, drop items.

A fresh build is written to a temporary directory and moved into place. Updates change the
index in place: the FAISS file is replaced atomically and SQLite commits in one transaction;
both carry the same random ``version`` token, so a reader can tell when an interrupted update
left them disagreeing (``searcher.SearchIndex`` then refuses to start).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from clipforge.errors import DataError
from clipforge.search.index import (
    IndexConfig, Part, Plan, Report, _atomic, _gather, _new_index, exact_topk, plan_index, read_part,
    scan_embeddings, tune,
)  # fmt: skip
from clipforge.search.layout import INDEX_FORMAT, REMOVABLE, index_files, load_info
from clipforge.search.store import Store

def _collect(emb_dirs: list[str]) -> tuple[list[Part], dict]:
    parts, model = [], None
    for d in emb_dirs:
        p, manifest = scan_embeddings(d)
        ident = {k: manifest.get(k) for k in ("model", "model_fingerprint", "embed_dim", "kind")}
        if model is not None and ident != model:
            raise DataError(f"{d!r} holds embeddings of another model or kind ({ident}) than {emb_dirs[0]!r} ({model})")
        model = ident
        parts += p
    odd = next((p for p in parts if p.dim != parts[0].dim), None)
    if odd is not None:
        raise DataError(f"{odd.npy}: {odd.dim}-dimensional vectors, but {parts[0].npy} has {parts[0].dim}")
    return parts, model or {}


def build_or_update(emb_dirs: list[str], index_dir: str | Path, cfg: IndexConfig, rebuild: bool = False) -> Report:
    """Create ``index_dir`` from ``emb_dirs``, or add the parts it has not seen yet."""
    out = Path(index_dir).resolve()
    if (out / "index.json").exists() and not rebuild:
        return _update(emb_dirs, out, cfg)
    start = time.perf_counter()
    parts, model = _collect(emb_dirs)
    n = sum(p.rows for p in parts)
    if n == 0:
        raise DataError(f"no finished embedding parts with rows in {', '.join(emb_dirs)}")
    d = parts[0].dim
    plan = plan_index(n, d, cfg)
    index = _new_index(plan, d)
    rng = np.random.default_rng(cfg.seed)
    n_q = 0 if plan.kind == "flat" else min(cfg.recall_queries, n // 10)
    q_pos = np.sort(rng.choice(n, size=n_q, replace=False)) if n_q else np.zeros(0, np.int64)
    if plan.kind in ("ivf", "ivfpq", "ivfpqr"):
        # Train on a sample that leaves the recall queries out (held out).
        pool = np.setdiff1d(np.arange(n), q_pos)
        # ivfpqr: 40 points per list (faiss wants >= 39) keep k-means over 1M vectors to minutes on 2 cores.
        per_list = 40 if plan.kind == "ivfpqr" else 64
        size = min(len(pool), max(plan.nlist * per_list, 10_000 if plan.kind == "ivfpq" else 0), plan.nlist * 256)
        index.train(_gather(parts, np.sort(rng.choice(pool, size=size, replace=False))))
    tmp = out.with_name(f".{out.name}.build-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        store = Store(tmp / "meta.sqlite")
        # The recall queries stay out of the index until it is tuned: a vector already in the index
        # is found through itself (HNSW: its own node links to its neighbours), which overstates the
        # recall new queries get (100k, HNSW32, efSearch 16: 0.961 on indexed vectors, 0.858 on new ones).
        added, removed, held_vecs, held_ids = _add_parts(index, plan.kind, store, parts, cfg, hold=q_pos)
        report = Report(plan.kind, plan.reason, store.count(), added, removed, {}, None, 0.0)
        # Exact search over what the index holds while it is tuned: live items less the held-out ones
        # (paths listed twice keep their last vector; the replaced ones are skipped too).
        live = store.live_ids()
        _measure(index, plan.kind, parts, q_pos, parts, np.setdiff1d(live, held_ids, assume_unique=True), cfg, report)
        if report.recall is not None and len(held_ids):
            report.recall["queries_held_out_of_index"] = True
        if len(held_ids):
            keep = np.isin(held_ids, live) if plan.kind in REMOVABLE else np.ones(len(held_ids), bool)
            index.add_with_ids(held_vecs[keep], held_ids[keep])  # replaced ones of removable kinds stay out
        _save(tmp, index, store, plan, model, report)
        store.close()
        out.mkdir(parents=True, exist_ok=True)
        faiss_file, store_file, info_file = index_files(tmp)
        # The metadata first, index.json last (it names the version the other two carry): cut short
        # in between, the versions disagree and readers refuse, never pairing new vectors with old ids.
        for f in (store_file, faiss_file, info_file):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _add_parts(index, kind: str, store: Store, parts: list[Part], cfg: IndexConfig, hold: np.ndarray | None = None):
    """Add vectors with ids = store ids; an item whose path is already indexed replaces it.
    Rows at the global positions ``hold`` get their ids and metadata but are not added to the
    index: returned as (added, removed, held vectors [h, d], held ids [h])."""
    added = removed = 0
    hold = np.zeros(0, np.int64) if hold is None else np.asarray(hold, np.int64)
    held_vecs, held_ids, start = [], [], 0
    bar = tqdm(total=sum(p.rows for p in parts), unit="vec", desc="index", disable=not cfg.progress)
    for part in parts:
        rows = _read_meta(part)
        if len(rows) != part.rows:
            raise DataError(f"{part.meta} has {len(rows)} rows but {part.npy} has {part.rows} vectors")
        old = store.live_ids_for_paths(r["path"] for r in rows if "path" in r)
        removed += _drop(index, kind, store, old)
        part.first_id = store.next_id()
        ids = np.arange(part.first_id, part.first_id + part.rows, dtype=np.int64)
        local = hold[(hold >= start) & (hold < start + part.rows)] - start
        start += part.rows
        if part.rows:
            vecs = read_part(part)
            if len(local):
                held_vecs.append(vecs[local])
                held_ids.append(ids[local])
                out = np.ones(part.rows, bool)
                out[local] = False
                vecs, ids = vecs[out], ids[out]
            if len(ids):
                index.add_with_ids(vecs, ids)
        for r in rows:
            r.setdefault("path", r.get("caption") or "")  # text collections: the text is the item
        part_id = store.add_part(part.emb_dir, part.name, part.rows, part.first_id)
        store.add_items(part.first_id, rows, part_id)
        added += part.rows
        bar.update(part.rows)
    bar.close()
    dim = index.d
    vecs = np.concatenate(held_vecs) if held_vecs else np.zeros((0, dim), np.float32)
    return added, removed, vecs, np.concatenate(held_ids) if held_ids else np.zeros(0, np.int64)


def _read_meta(part: Part) -> list[dict]:
    try:
        return pq.read_table(part.meta).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:  # a damaged or vanished metadata file
        why = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{part.meta}: cannot read embedding metadata ({why})") from None


def _drop(index, kind: str, store: Store, ids: list[int], duplicates: bool = False) -> int:
    if not ids:
        return 0
    if kind in REMOVABLE:
        index.remove_ids(np.array(ids, np.int64))
    store.delete(ids, mark=2 if duplicates else (0 if kind in REMOVABLE else 1))
    return len(ids)


def _measure(index, kind, q_parts, q_pos, all_parts, live, cfg: IndexConfig, report: Report) -> None:
    """Recall@k of the approximate index against exact search over ``all_parts``, on held-out
    queries at positions ``q_pos`` of ``q_parts`` (each query's own id left out)."""
    if kind == "flat":
        report.params, report.recall = {}, {"k": cfg.recall_k, "recall": 1.0, "exact": True}
        return
    if len(q_pos) == 0:
        report.notes.append("too few vectors to measure recall")
        return
    queries = _gather(q_parts, q_pos)  # [q, d]
    starts = np.cumsum([0] + [p.rows for p in q_parts])
    which = np.searchsorted(starts, q_pos, side="right") - 1
    q_ids = np.array([q_parts[w].first_id + (pos - starts[w]) for w, pos in zip(which, q_pos)], np.int64)
    exact = exact_topk(all_parts, queries, cfg.recall_k + 1, live)  # [q, k+1]
    report.params, report.recall = tune(index, kind, queries, q_ids, exact, cfg)


def _save(out: Path, index, store: Store, plan: Plan, model: dict, report: Report, info: dict | None = None) -> None:
    import faiss

    faiss_path, _, info_path = index_files(out)
    version = uuid.uuid4().hex
    info = dict(info or {})
    info.update({
        "format": INDEX_FORMAT, "kind": plan.kind, "reason": plan.reason, "dim": index.d, "metric": "inner_product",
        "count": store.count(), "hidden": len(store.tombstones()), "params": report.params,
        "recall": report.recall or info.get("recall"), "model": model, "version": version,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    # The vectors are written aside first (a full disk there changes nothing), then the metadata is
    # committed with the new version, then the vectors and index.json replace the old ones. Cut
    # short in between, the versions disagree and readers refuse; an old-version store is never
    # left beside new vectors (an update run again would add them a second time).
    faiss_tmp = faiss_path.with_name(f".{faiss_path.name}.{os.getpid()}.tmp")
    try:
        faiss.write_index(index, str(faiss_tmp))
    except BaseException:
        faiss_tmp.unlink(missing_ok=True)
        raise
    store.set_info("version", version)
    store.commit()
    os.replace(faiss_tmp, faiss_path)
    _atomic(info_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))


def _open_for_update(out: Path):
    import faiss

    info = load_info(out)
    faiss_path, store_path, _ = index_files(out)
    store = Store(store_path)
    if store.info("version") != info.get("version"):
        raise DataError(f"{out}: index and metadata disagree (an update was interrupted); rebuild it (rebuild=True)")
    index = faiss.read_index(str(faiss_path))
    plan = Plan(info["kind"], info.get("reason", ""))
    return info, store, index, plan


def _store_parts(store: Store, kind: str, dim: int) -> list[Part]:
    sub = "text_emb" if kind == "text" else "img_emb"
    parts = []
    for emb_dir, name, rows, first_id in store.parts():
        npy = Path(emb_dir) / sub / f"{sub}_{name}.npy"
        meta = Path(emb_dir) / "metadata" / f"metadata_{name}.parquet"
        parts.append(Part(emb_dir, name, npy, meta, rows, dim, first_id))
    return parts


def _update(emb_dirs: list[str], out: Path, cfg: IndexConfig) -> Report:
    start = time.perf_counter()
    info, store, index, plan = _open_for_update(out)
    parts, model = _collect(emb_dirs)
    if any(model.get(k) != info["model"].get(k) for k in ("model_fingerprint", "kind", "embed_dim")):
        dirs = ", ".join(emb_dirs)
        raise DataError(f"embeddings in {dirs} come from another model or kind than {out}: rebuild it (rebuild=True)")
    new = [p for p in parts if not store.has_part(p.emb_dir, p.name)]
    report = Report(plan.kind, plan.reason, store.count(), 0, 0, info.get("params", {}), None, 0.0)
    if not new:
        report.notes.append("no new embedding parts: index unchanged")
        store.close()
        return report
    try:
        report.added, report.removed, _, _ = _add_parts(index, plan.kind, store, new, cfg)
    except BaseException:
        store.close()  # uncommitted: the index on disk stays as it was (a damaged part is named in the error)
        raise
    report.total = store.count()
    # Recall on held-out queries from the new rows, against exact search over everything indexed.
    all_parts = _store_parts(store, model.get("kind"), index.d)
    missing = [p for p in all_parts if not p.npy.is_file()]
    n_new = sum(p.rows for p in new)
    if plan.kind == "flat":
        _measure(index, "flat", new, [], [], None, cfg, report)
    elif missing:
        report.notes.append(f"recall not re-measured: {missing[0].npy} is gone")
    elif n_new:
        rng = np.random.default_rng(cfg.seed)
        q_pos = np.sort(rng.choice(n_new, size=min(cfg.recall_queries, max(1, n_new // 10)), replace=False))
        _measure(index, plan.kind, new, q_pos, all_parts, store.live_ids(), cfg, report)
    if plan.kind == "flat" and report.total > cfg.exact_below:
        report.notes.append(f"{report.total} vectors in an exact index: a rebuild would choose an approximate one")
    _save(out, index, store, plan, info["model"], report, info)
    store.close()
    report.seconds = time.perf_counter() - start
    return report


def remove_paths(index_dir: str | Path, paths: list[str] | None = None, missing: bool = False) -> Report:
    """Drop the given paths, and/or every item whose file no longer exists (``missing``)."""
    return _remove(Path(index_dir), paths or [], missing, [])


def remove_ids(index_dir: str | Path, ids: list[int], duplicates: bool = False) -> Report:
    """Drop items by id; ``duplicates`` remembers them as dropped near-duplicates."""
    return _remove(Path(index_dir), [], False, ids, duplicates)


def _remove(out: Path, paths: list[str], missing: bool, ids: list[int], duplicates: bool = False) -> Report:
    start = time.perf_counter()
    info, store, index, plan = _open_for_update(out)
    ids = list(ids) + store.live_ids_for_paths(paths)
    if missing:
        for batch in store.iter_live():
            ids += [i for i, p in batch if not os.path.exists(p[: p.index(".tar/") + 4] if ".tar/" in p else p)]
    live = set(store.live_ids().tolist())
    ids = sorted({int(i) for i in ids} & live)
    removed = _drop(index, plan.kind, store, ids, duplicates)
    report = Report(plan.kind, plan.reason, 0, 0, removed, info.get("params", {}), None, 0.0)
    report.total = store.count()
    if plan.kind not in REMOVABLE and ids:
        report.notes.append(f"{len(ids)} removals kept as tombstones ({plan.kind} cannot delete); a rebuild compacts")
    _save(out, index, store, plan, info["model"], report, info)
    store.close()
    report.seconds = time.perf_counter() - start
    return report

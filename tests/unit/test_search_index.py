"""Vector index: kind by size and budget, measured recall, incremental updates, removal, filters, dedup."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipforge.errors import DataError
from clipforge.search import searcher
from clipforge.search.build import build_or_update, remove_ids, remove_paths
from clipforge.search.dedup import find_duplicates
from clipforge.search.index import IndexConfig, plan_index, recall_at_k
from clipforge.search.store import Store, filter_sql
from support.search import write_clustered_embeddings


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # On a shared 2-core machine a 2-thread OpenMP region waits for its descheduled thread: the
    # ivfpqr build (many small k-means regions) took 12.8 s with 2 threads under load, 0.9 s with 1.
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _cfg(**kw):
    return IndexConfig(**{"progress": False, "recall_queries": 200, **kw})


def test_plan_by_size_and_memory_budget():
    cfg = IndexConfig()
    assert plan_index(1_000, 512, cfg).kind == "flat"
    assert plan_index(150_000, 512, cfg).kind == "hnsw"
    assert plan_index(1_000_000, 512, cfg).kind == "ivfpqr"  # past hnsw_below (graph builds take too long)
    assert plan_index(3_000_000, 256, cfg).kind == "ivfpqr"  # vectors fit 4 GiB
    p = plan_index(1_000_000, 512, cfg)
    assert (p.nlist, p.pq_m, p.k_factor) == (2048, 128, 10)
    p = plan_index(50_000_000, 768, cfg)
    assert p.kind == "ivfpq" and 768 % p.pq_m == 0 and 50_000_000 * (p.pq_m + 16) <= cfg.memory_budget
    assert plan_index(500_000, 512, IndexConfig(memory_budget=2**30)).kind == "ivfpq"
    assert plan_index(60, 32, IndexConfig(kind="ivf")).kind == "flat"  # too few points to train lists
    with pytest.raises(DataError, match="memory budget"):
        plan_index(10**9, 512, IndexConfig(memory_budget=2**20))


def test_recall_at_k_leaves_the_query_itself_out():
    exact = np.array([[7, 1, 2, 3]])
    assert recall_at_k(np.array([[7, 1, 2, 9]]), exact, np.array([7]), 3) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, 3, 2, -1]]), exact, np.array([7]), 3) == 1.0


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpqr"])
def test_approximate_index_reaches_measured_recall(tmp_path, kind):
    x = write_clustered_embeddings(tmp_path / "emb", 3000)
    r = build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg(kind=kind, target_recall=0.9))
    assert r.kind == kind and r.total == 3000
    assert r.recall["queries"] == 200 and r.recall["recall"] >= 0.9
    assert r.recall["queries_held_out_of_index"]  # tuned on vectors not in the index at the time
    info = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert info["recall"]["recall"] == r.recall["recall"] and info["params"] == r.params
    idx = searcher.SearchIndex(tmp_path / "ix")
    hits = idx.search(x[:5], 3)
    assert [h[0]["id"] for h in hits] == [0, 1, 2, 3, 4] and hits[0][0]["path"] == "/photos/img0.jpg"
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-3) and hits[0][0]["label"] == "c0"
    filtered = idx.search(x[:1], 3, {"label": "c1"})[0]  # exact over the matching items' stored vectors
    assert len(filtered) == 3 and all(h["label"] == "c1" for h in filtered)
    assert filtered[0]["id"] == max((i for i in range(1, 3000, 3)), key=lambda i: float(x[0] @ x[i]))


def test_small_collection_is_exact_and_filters_work(tmp_path, monkeypatch):
    x = write_clustered_embeddings(tmp_path / "emb", 300)
    r = build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg())
    assert r.kind == "flat" and r.recall == {"k": 10, "recall": 1.0, "exact": True}
    idx = searcher.SearchIndex(tmp_path / "ix")
    exact = np.argsort(-(x[4:5] @ x.T)[0])
    sel = [int(i) for i in exact if i % 3 == 1][:4]
    got = idx.search(x[4:5], 4, {"label": "c1"})[0]
    assert [h["id"] for h in got] == sel and all(h["label"] == "c1" for h in got)
    # Same answer through the FAISS id-selector path used for large filter matches (a fresh
    # SearchIndex: the first one remembers which filters were small).
    monkeypatch.setattr(searcher, "EXACT_FILTER_LIMIT", 0)
    idx = searcher.SearchIndex(tmp_path / "ix")
    assert [h["id"] for h in idx.search(x[4:5], 4, {"label": "c1"})[0]] == sel
    assert {h["label"] for h in idx.search(x[4:5], 10, {"label": ["c0", "c2"]})[0]} == {"c0", "c2"}
    assert idx.search(x[4:5], 3, {"label": "none"})[0] == []


def test_a_repeated_filter_is_answered_without_scanning_the_metadata_again(tmp_path, monkeypatch):
    x = write_clustered_embeddings(tmp_path / "emb", 300)
    build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg())
    idx = searcher.SearchIndex(tmp_path / "ix")
    scans = []
    filter_ids = idx.store.filter_ids
    monkeypatch.setattr(idx.store, "filter_ids", lambda flt, limit: scans.append(flt) or filter_ids(flt, limit))
    first = idx.search(x[:2], 5, {"label": ["c0", "c2"]})
    assert idx.search(x[:2], 5, {"label": ["c0", "c2"]}) == first and len(scans) == 1
    assert idx.search(x[:1], 5, {"label": "c1"})[0] != first[0] and len(scans) == 2  # another filter: its own scan
    monkeypatch.setattr(searcher, "FILTER_CACHE", 1)
    idx.search(x[:1], 5, {"label": "c0"})  # evicts the oldest
    idx.search(x[:1], 5, {"label": ["c0", "c2"]})
    assert len(scans) == 4 and len(idx._filters) == 1


def test_updates_add_new_parts_replace_paths_and_remove(tmp_path):
    write_clustered_embeddings(tmp_path / "a", 1200, part=400)
    build_or_update([str(tmp_path / "a")], tmp_path / "ix", _cfg(kind="ivf"))
    before = searcher.SearchIndex(tmp_path / "ix").items([6])[6]
    same = build_or_update([str(tmp_path / "a")], tmp_path / "ix", _cfg())
    assert same.added == 0 and "no new" in same.notes[0]
    # New photos plus a re-embedded old one (same path): added without rebuilding.
    xb = write_clustered_embeddings(tmp_path / "b", 300, part=300, seed=1, prefix="new")
    pq.write_table(pa.table({"path": ["/photos/img5.jpg"] + [f"/photos/new{i}.jpg" for i in range(1, 300)]}),
                   tmp_path / "b" / "metadata" / "metadata_00000.parquet")  # fmt: skip
    r = build_or_update([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "ix", _cfg())
    assert (r.kind, r.added, r.removed, r.total) == ("ivf", 300, 1, 1499)
    assert r.recall is not None and r.recall["recall"] > 0.8
    idx = searcher.SearchIndex(tmp_path / "ix")
    assert idx.items([6])[6] == before  # old ids stay valid
    top = idx.search(xb[:1], 1)[0][0]
    assert top["path"] == "/photos/img5.jpg" and top["id"] >= 1200  # the new vector answers for the old path
    rm = remove_paths(tmp_path / "ix", ["/photos/new7.jpg", "/photos/not-indexed.jpg"])
    assert rm.removed == 1 and rm.total == 1498
    assert searcher.SearchIndex(tmp_path / "ix").search(xb[7:8], 1)[0][0]["path"] != "/photos/new7.jpg"


@pytest.mark.parametrize("kind", ["hnsw", "ivfpqr"])
def test_hnsw_removals_are_tombstones_excluded_from_search(tmp_path, kind):
    x = write_clustered_embeddings(tmp_path / "emb", 600)
    build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg(kind=kind))
    r = remove_ids(tmp_path / "ix", [0, 1])
    assert r.removed == 2 and r.total == 598 and "tombstones" in r.notes[0]
    idx = searcher.SearchIndex(tmp_path / "ix")
    assert all(h["id"] not in (0, 1) for row in idx.search(x[:2], 5) for h in row)
    assert idx.search(x[:1], 1)[0][0]["score"] < 0.999


def test_prune_missing_files(tmp_path):
    write_clustered_embeddings(tmp_path / "emb", 50)
    (tmp_path / "photos").mkdir()
    paths = [tmp_path / "photos" / f"img{i}.jpg" for i in range(50)]
    pq.write_table(pa.table({"path": [str(p) for p in paths]}), tmp_path / "emb" / "metadata" / "metadata_00000.parquet")
    for p in paths[:45]:
        p.write_bytes(b"x")
    build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg())
    r = remove_paths(tmp_path / "ix", missing=True)
    assert r.removed == 5 and r.total == 45


def test_mismatches_are_refused(tmp_path):
    write_clustered_embeddings(tmp_path / "a", 100)
    write_clustered_embeddings(tmp_path / "b", 100, fingerprint="other-model")
    with pytest.raises(DataError, match="another model"):
        build_or_update([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "ix", _cfg())
    build_or_update([str(tmp_path / "a")], tmp_path / "ix", _cfg())
    with pytest.raises(DataError, match="another model"):
        build_or_update([str(tmp_path / "b")], tmp_path / "ix", _cfg())
    with pytest.raises(DataError, match="not an embeddings directory"):
        build_or_update([str(tmp_path)], tmp_path / "ix2", _cfg())
    # An update interrupted between the FAISS file and SQLite is detected, not served.
    store = Store(tmp_path / "ix" / "meta.sqlite")
    store.set_info("version", "stale")
    store.commit()
    with pytest.raises(DataError, match="disagree"):
        searcher.SearchIndex(tmp_path / "ix")


def test_filter_validation():
    where, args = filter_sql({"label": ["a", "b"], "width": 3, "ok": True})
    assert "IN (?,?)" in where and args == ["a", "b", 3, 1]
    for bad in ({}, {"a;drop": 1}, {"a": []}, {"a": {"b": 1}}, {"a": float("nan")}, [1]):
        with pytest.raises(DataError):
            filter_sql(bad)


def test_dedup_finds_near_copies(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 32))
    x[150] = x[10] + 0.01 * rng.standard_normal(32)  # near copy
    x[151] = x[10]  # exact copy
    x[199] = x[20]
    write_clustered_embeddings(tmp_path / "emb", 200, x=x)
    build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg())
    groups = find_duplicates(tmp_path / "ix", threshold=0.99, progress=False)
    assert [(g.keep, g.members) for g in groups] == [(10, [10, 150, 151]), (20, [20, 199])]


def test_held_out_queries_are_added_after_tuning(tmp_path):
    """The recall queries are left out of the index while it is tuned, then added: every vector
    is searchable afterwards, each one its own nearest neighbour."""
    x = write_clustered_embeddings(tmp_path / "emb", 2000, part=700)
    r = build_or_update([str(tmp_path / "emb")], tmp_path / "ix", _cfg(kind="ivfpqr", target_recall=0.9))
    idx = searcher.SearchIndex(tmp_path / "ix")
    assert r.total == len(idx) == idx.index.ntotal == 2000
    assert np.array_equal(idx.vectors(list(range(2000))), x)  # every vector, under its own id
    _, found = idx.search_ids(x, 10)
    assert (found == np.arange(2000)[:, None]).any(1).mean() > 0.99
    # The FAISS selector path (large filter matches) through the id map of the re-ranked IVF.
    import clipforge.search.searcher as s

    old, s.EXACT_FILTER_LIMIT = s.EXACT_FILTER_LIMIT, 0
    try:
        got = idx.search(x[4:5], 5, {"label": "c1"})[0]
    finally:
        s.EXACT_FILTER_LIMIT = old
    assert len(got) == 5 and all(h["label"] == "c1" for h in got)
    exact = [int(i) for i in np.argsort(-(x[4] @ x.T)) if i % 3 == 1][:5]
    assert len({h["id"] for h in got} & set(exact)) >= 4


def test_cli_index_kinds_match_the_library():
    from typing import get_args

    from clipforge.cli.index import INDEX_KINDS
    from clipforge.search.index import Kind

    assert INDEX_KINDS == list(get_args(Kind))

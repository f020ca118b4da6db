"""Vector search: build time, single-query latency (p50/p99) and recall@10 against exact
search, on synthetic-but-clustered float16 embeddings, through clipforge's own index code.

    .venv/bin/python benchmarks/bench_search.py                     # 1M x 512 (the issue's size)
    .venv/bin/python benchmarks/bench_search.py --n 200000 --kind ivf --nlist 1024
    .venv/bin/python benchmarks/bench_search.py --n 1000000 --kind ivfpqr --nlist 2048 --build-threads 1

Data: ``n`` L2-normalised 512-d float16 vectors written as a clipforge embeddings directory
(``img_emb/*.npy`` parts of 100k rows + Parquet metadata, the layout ``clipforge embed``
writes). They are clustered with a low intrinsic dimension, as CLIP embeddings are: a
Gaussian mixture of ``--clusters`` centres in a 64-d latent space, mapped to 512-d by a fixed
random linear map, plus isotropic noise. Queries are fresh draws from the same mixture (not
database rows). Generated once, cached under --cache.

Build: ``clipforge.search.build.build_or_update`` (what ``clipforge index`` runs: plan the index
kind from size and memory budget, train, add, write SQLite metadata, tune nprobe/efSearch on
500 collection vectors held out of the index while it is tuned, added afterwards, until
recall@10 reaches the target). Timed from the parts on disk to a finished index directory.
``ivfpqr``: IVF lists of 4-bit PQ codes (FAISS fast scan), the best k_factor x k candidates
re-ranked exactly against the stored float32 vectors.

Search: ``clipforge.search.searcher.SearchIndex.search_ids`` with one query per call (what the
HTTP service does per request), k=10, with the parameters the build chose; FAISS OpenMP threads
default to 1 (a single query is not parallelised; spare threads only spin on a shared machine).
Recall@10 = |found ∩ exact top-10| / 10, exact = brute force over every vector (float32).
The build tunes its parameters on held-out collection vectors; the recall reported here is
measured on other queries (the fresh draws), which are then also run at a sweep of efSearch /
nprobe values, to show the latency at which recall on new queries reaches the target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile, print_table, write_record  # noqa: E402

DIM, LATENT, PART = 512, 64, 100_000
SWEEP = {"efSearch": (16, 32, 64, 128, 256), "nprobe": (4, 8, 16, 32, 48, 64, 96, 128, 192, 256)}


class Mixture:
    """Clustered unit vectors: overlapping Gaussian clusters in a 64-d latent space, through a
    fixed random 64 -> 512 map, plus isotropic noise. The clusters overlap (spread ~ distance
    between centres), so neighbours often straddle IVF cells: with nlist = 1024 at 200k vectors,
    recall@10 needs nprobe ~32 for 0.95 (nprobe 1: ~0.79), not an easy nprobe = 1 or 2."""

    def __init__(self, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((clusters, LATENT)).astype(np.float32)  # [C, 64]
        self.spread = rng.uniform(1.0, 1.4, clusters).astype(np.float32)  # per-cluster radius
        self.proj = (rng.standard_normal((LATENT, DIM)) / np.sqrt(LATENT)).astype(np.float32)  # [64, 512]
        self.weights = rng.dirichlet(np.full(clusters, 2.0))  # uneven cluster sizes

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        j = rng.choice(len(self.centres), size=n, p=self.weights)
        z = self.centres[j] + self.spread[j, None] * rng.standard_normal((n, LATENT), dtype=np.float32)
        x = z @ self.proj + 0.1 * rng.standard_normal((n, DIM), dtype=np.float32)  # [n, 512]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def make_embeddings(root: Path, n: int, clusters: int, seed: int) -> Path:
    """An embeddings directory with ``n`` vectors (cached: reused when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.search.layout import EMB_FORMAT

    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    mix, rng = Mixture(clusters, seed), np.random.default_rng(seed + 1)
    parts = -(-n // PART)
    for k in range(parts):
        lo, hi = k * PART, min((k + 1) * PART, n)
        np.save(root / "img_emb" / f"img_emb_{k:05d}.npy", mix.sample(hi - lo, rng).astype(np.float16))
        meta = pa.table({"path": [f"synthetic/{i:08d}.jpg" for i in range(lo, hi)],
                         "position": pa.array(range(lo, hi), pa.int64())})
        pq.write_table(meta, root / "metadata" / f"metadata_{k:05d}.parquet")
    manifest = {"format": EMB_FORMAT, "kind": "image", "inputs": n, "input": f"synthetic mixture (seed {seed})",
                "input_fingerprint": f"synthetic-{n}-{clusters}-{seed}", "part_size": PART, "parts": parts,
                "embed_dim": DIM, "model": "synthetic", "model_fingerprint": "synthetic", "text_embeddings": False}
    (root / "embeddings.json").write_text(json.dumps(manifest, indent=2))
    done.touch()
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq", "ivfpqr"])
    ap.add_argument("--k-factor", type=int, default=10, help="ivfpqr: candidates re-ranked, x k")
    ap.add_argument("--fs-m", type=int, default=None, help="ivfpqr: 4-bit PQ sub-quantisers (default d/4)")
    ap.add_argument("--build-threads", type=int, default=None, help="FAISS threads while building (default: all)")
    ap.add_argument("--nlist", type=int, default=None, help="IVF lists (default: clipforge's choice)")
    ap.add_argument("--memory-budget-gb", type=float, default=4.0, help="IndexConfig.memory_budget")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--omp-threads", type=int, default=1, help="FAISS threads while searching (build: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "clipforge-bench-vectors")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import faiss

    from clipforge.search.build import build_or_update
    from clipforge.search.index import IndexConfig, exact_topk, recall_at_k, scan_embeddings, set_params
    from clipforge.search.searcher import SearchIndex

    t0 = time.perf_counter()
    emb = make_embeddings(args.cache / f"v2-n{args.n}-c{args.clusters}-s{args.seed}", args.n, args.clusters, args.seed)
    gen_s = time.perf_counter() - t0
    queries = Mixture(args.clusters, args.seed).sample(args.queries, np.random.default_rng(args.seed + 99))

    index_dir = Path(tempfile.mkdtemp(prefix="cf-bench-index-")) / "idx"
    cfg = IndexConfig(kind=args.kind, nlist=args.nlist, memory_budget=int(args.memory_budget_gb * 2**30),
                      target_recall=args.target_recall, recall_k=args.k, seed=args.seed, progress=False,
                      k_factor=args.k_factor, fs_m=args.fs_m)
    if args.build_threads:
        faiss.omp_set_num_threads(args.build_threads)
    build_threads = faiss.omp_get_max_threads()
    t0 = time.perf_counter()
    report = build_or_update([str(emb)], index_dir, cfg)
    build_s = time.perf_counter() - t0
    print(f"built {report.kind} ({report.reason}) over {report.total} vectors in {build_s:.1f} s; "
          f"tuned {report.params} -> {report.recall}")

    faiss.omp_set_num_threads(args.omp_threads)
    idx = SearchIndex(index_dir)
    for q in queries[:50]:  # warm-up: page in the index, allocator
        idx.search_ids(q[None], args.k)

    def timed_queries() -> tuple[list[float], np.ndarray]:
        lat, found = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = idx.search_ids(q[None], args.k)
            lat.append((time.perf_counter() - t) * 1000)
            found.append(ids[0])
        return lat, np.array(found)

    lat, found = timed_queries()
    # Batched throughput as well (the embed-and-dedup use), same parameters.
    t = time.perf_counter()
    idx.search_ids(queries, args.k)
    batch_ms = (time.perf_counter() - t) * 1000 / len(queries)

    faiss.omp_set_num_threads(build_threads)
    parts, _ = scan_embeddings(emb)
    first = 0
    for p in parts:  # ids as the index assigned them: consecutive over the parts
        p.first_id, first = first, first + p.rows
    t = time.perf_counter()
    exact = exact_topk(parts, queries, args.k)
    exact_s = time.perf_counter() - t
    no_self = np.full(len(queries), -1)  # fresh queries: no id of their own to leave out
    recall = recall_at_k(found, exact, no_self, args.k)

    # The same index at other search parameters: what latency the recall target costs.
    faiss.omp_set_num_threads(args.omp_threads)
    sweep = []
    key = "efSearch" if report.kind == "hnsw" else "nprobe" if report.kind in ("ivf", "ivfpq", "ivfpqr") else None
    for v in (SWEEP.get(key, ()) if key else ()):
        set_params(idx.index, report.kind, {**report.params, key: v})
        sl, sf = timed_queries()
        sweep.append({key: v, "p50_ms": round(percentile(sl, 50), 3), "p99_ms": round(percentile(sl, 99), 3),
                      "recall_at_k": round(recall_at_k(sf, exact, no_self, args.k), 4)})
        print(f"  {key}={v}: p50 {sweep[-1]['p50_ms']} ms, p99 {sweep[-1]['p99_ms']} ms, "
              f"recall@{args.k} {sweep[-1]['recall_at_k']}", flush=True)
    idx.close()
    index_bytes = (index_dir / "index.faiss").stat().st_size
    shutil.rmtree(index_dir.parent, ignore_errors=True)
    meets = [s for s in sweep if s["recall_at_k"] >= 0.95]

    res = {
        "n": args.n, "dim": DIM, "dtype": "float16 on disk (the index holds what clipforge's plan chose)",
        "clusters": args.clusters, "queries": args.queries, "k": args.k,
        "index": {"kind": report.kind, "reason": report.reason, "params": report.params,
                  "build_tuning_recall": report.recall, "index_file_mb": round(index_bytes / 2**20, 1)},
        "build_s": round(build_s, 2), "generate_s": round(gen_s, 2), "build_threads": build_threads,
        "search_threads": args.omp_threads,
        "latency_ms": {"p50": round(percentile(lat, 50), 3), "p90": round(percentile(lat, 90), 3),
                       "p99": round(percentile(lat, 99), 3), "mean": round(sum(lat) / len(lat), 3)},
        "batched_ms_per_query": round(batch_ms, 4),
        "recall_at_k": round(recall, 4), "exact_search_s": round(exact_s, 2),
        "sweep": sweep, "cheapest_sweep_point_with_recall_0.95": meets[0] if meets else None,
        "targets": {"p50_ms<=2": percentile(lat, 50) <= 2.0, "recall@10>=0.95": recall >= 0.95},
    }
    res["table"] = print_table(
        [(f"{args.n:,} x {DIM}", report.kind, json.dumps(report.params), f"{build_s:.1f}",
          f"{res['latency_ms']['p50']:.3f}", f"{res['latency_ms']['p99']:.3f}", f"{recall:.4f}")],
        ("vectors", "index", "params", "build s", "p50 ms", "p99 ms", f"recall@{args.k}"))
    record = {
        "setup": "synthetic clustered embeddings (overlapping 64-d latent Gaussian mixture -> 512-d + noise, "
        "unit norm, "
        "float16 parts); queries are fresh draws; build = clipforge.search.build.build_or_update; "
        "search = SearchIndex.search_ids one query per call",
        "method": "50 warm-up queries, then every query timed alone; recall against brute-force float32 search, "
        "on fresh queries (not the build's tuning queries, which were collection vectors held out of the index "
        "while it was tuned)",
        "results": res,
    }
    path = write_record("search", record, "cpu", args.out, code_paths=("src/clipforge/search",))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""``clipforge index``: a FAISS index + SQLite metadata from embedding parts.

Exact search for small collections; HNSW, IVF, IVF-PQ or IVF-PQ with exact re-ranking (ivfpqr) for large ones, chosen by size and
``--memory-budget``; the approximate index's recall@k against exact search on held-out
queries is measured and printed. Run again on an existing INDEX_DIR to add new parts (from
the same or other EMB_DIRs) without a rebuild; ``--remove`` / ``--prune-missing`` drop items.
"""

from __future__ import annotations

import argparse
import json

# Mirrors clipforge.search.index.Kind (kept literal so --help needs no FAISS import; a test checks it).
INDEX_KINDS = ["auto", "flat", "hnsw", "ivf", "ivfpq", "ivfpqr"]


def _bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M)") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build or update a vector index from embedding parts", description=__doc__)
    p.add_argument("--embeddings", nargs="*", default=[], metavar="EMB_DIR", help="embedding directories to add")
    p.add_argument("--out", required=True, help="index directory (INDEX_DIR)")
    p.add_argument("--kind", default="auto", choices=INDEX_KINDS,
                   help="index type for a new build or --rebuild (default auto: by size and memory budget)")
    p.add_argument("--memory-budget", type=_bytes, default="4G", help="RAM the index may use (default 4G)")
    p.add_argument("--exact-below", type=int, default=50_000,
                   help="exact search up to this many vectors (default 50000)")  # fmt: skip
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@k to tune search parameters for")
    p.add_argument("--recall-queries", type=int, default=500, help="held-out queries for measuring recall")
    p.add_argument("--recall-k", type=int, default=10, help="k of recall@k (default 10)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    p.add_argument("--pq-m", type=int, default=None, help="PQ bytes per vector (default: what the budget allows)")
    p.add_argument("--rebuild", action="store_true", help="build INDEX_DIR afresh from --embeddings")
    p.add_argument("--remove", metavar="PATHS_FILE", default=None, help="drop the paths listed (one per line)")
    p.add_argument("--prune-missing", action="store_true", help="drop items whose file no longer exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipforge.cli import CliError
    from clipforge.search.build import build_or_update, remove_paths
    from clipforge.search.index import IndexConfig

    if not args.embeddings and not (args.remove or args.prune_missing):
        raise CliError("give --embeddings EMB_DIR (to build or add), or --remove / --prune-missing")
    if not 0 < args.target_recall <= 1:
        raise CliError("--target-recall must be in (0, 1]")
    cfg = IndexConfig(
        kind=args.kind, memory_budget=args.memory_budget, exact_below=args.exact_below,
        target_recall=args.target_recall, recall_queries=args.recall_queries, recall_k=args.recall_k,
        nlist=args.nlist, pq_m=args.pq_m, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    reports = []
    if args.embeddings:
        reports.append(build_or_update(args.embeddings, args.out, cfg, rebuild=args.rebuild))
    if args.remove or args.prune_missing:
        lines = Path(args.remove).read_text().splitlines() if args.remove else []
        paths = [line.strip() for line in lines if line.strip()]
        reports.append(remove_paths(args.out, paths, missing=args.prune_missing))
    for r in reports:
        _print(r)
    return 0


def _print(r) -> None:
    from dataclasses import asdict

    rec = r.recall
    if rec and rec.get("exact"):
        line = "exact search (recall 1.0)"
    elif rec:
        knob = ", ".join(f"{k}={rec[k]}" for k in ("nprobe", "efSearch") if k in rec)
        line = (f"recall@{rec['k']} = {rec['recall']:.3f} vs exact search on {rec['queries']} held-out queries "
                f"({knob}, {rec['ms_per_query']} ms/query)")  # fmt: skip
    else:
        line = "recall not measured"
    print(f"{r.kind} index: {r.total} items (+{r.added} added, -{r.removed} removed) in {r.seconds:.1f}s; {r.reason}")
    print(line)
    for note in r.notes:
        print(f"note: {note}")
    print(json.dumps({k: v for k, v in asdict(r).items()}))

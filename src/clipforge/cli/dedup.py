"""``clipforge dedup``: near-duplicate groups in an index (cosine >= --threshold).

Reuses the index itself: every item's neighbours are looked up, pairs above the threshold are
joined into groups, and the first-indexed item of each group is kept. Writes a CSV
(group, id, path, keep, score); ``--drop`` also removes the duplicates from the index.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dedup", help="find (and optionally drop) near-duplicate images in an index",
                       description=__doc__)  # fmt: skip
    p.add_argument("--index", required=True, help="index directory from clipforge index")
    p.add_argument("--out", required=True, help="CSV of duplicate groups")
    p.add_argument("--threshold", type=float, default=0.96, help="cosine similarity of near duplicates (default 0.96)")
    p.add_argument("--neighbours", type=int, default=10, help="neighbours examined per item (default 10)")
    p.add_argument("--drop", action="store_true", help="remove all but the kept item of each group from the index")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.cli import CliError
    from clipforge.search.dedup import drop_duplicates, find_duplicates, write_groups

    if not -1 <= args.threshold <= 1:
        raise CliError("--threshold is a cosine similarity in [-1, 1]")
    groups = find_duplicates(args.index, args.threshold, args.neighbours, progress=not args.no_progress)
    write_groups(groups, args.out)
    n_dup = sum(len(g.members) - 1 for g in groups)
    print(f"{len(groups)} duplicate groups, {n_dup} duplicates (threshold {args.threshold}); written to {args.out}")
    if args.drop and n_dup:
        report = drop_duplicates(args.index, groups)
        print(f"dropped {report.removed} items; {report.total} left")
    return 0

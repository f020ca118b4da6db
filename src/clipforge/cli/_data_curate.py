"""``clipforge data curate``: keep the image-caption pairs worth training on.

Optional steps, applied in this order, each dropped pair counted under the first reason that
removed it: exact image duplicates (--exact-images), exact caption duplicates
(--exact-captions), near-duplicate images (--near-duplicates COS), CLIP-score filtering
(--min-score, --top-fraction; image-caption cosine under --model), and MetaCLIP balancing
(--metadata FILE: captions matched against its entries, at most about --per-entry pairs per
entry, unmatched pairs dropped). Writes OUT (the kept rows, image paths valid from OUT's folder),
OUT.report.json (counts by reason) and OUT.dropped.csv (each dropped row and its reason).
"""

from __future__ import annotations

import argparse

from clipforge.cli._types import fraction, whole_number

_fraction, _positive = fraction(closed=False), whole_number(1)


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("curate", help="deduplicate, CLIP-score filter and MetaCLIP-balance training pairs",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--input", required=True,
                   help="CSV/TSV/Parquet of image paths (relative to it) and captions, or WebDataset shards")
    p.add_argument("--out", required=True,
                   help="curated table (.csv, .tsv or .parquet); a folder of shards when --input is shards")
    p.add_argument("--model", default=None, help="checkpoint or pretrained name for scores and near-duplicates")
    p.add_argument("--embeddings", default=None,
                   help="precomputed clipforge embed --embed-captions parts of --input (instead of embedding)")
    p.add_argument("--work", default=None, help="folder for the embeddings made here (default: curate_work beside "
                                                "--out; reused by later runs)")
    p.add_argument("--exact-images", action="store_true", help="drop pairs whose image bytes repeat an earlier one")
    p.add_argument("--exact-captions", action="store_true", help="drop pairs whose caption repeats an earlier one")
    p.add_argument("--near-duplicates", type=float, default=None, metavar="COS",
                   help="drop images at cosine >= COS to an earlier kept one")
    p.add_argument("--min-score", type=float, default=None, help="drop pairs whose image-caption cosine is below this")
    p.add_argument("--top-fraction", type=_fraction, default=None,
                   help="keep only this fraction of the pairs with the highest image-caption cosine")
    p.add_argument("--metadata", default=None, metavar="FILE",
                   help="MetaCLIP entries, one per line (e.g. class names); unmatched pairs are dropped")
    p.add_argument("--per-entry", type=_positive, default=20000, help="MetaCLIP's t: pairs kept per entry" + d)
    p.add_argument("--image-column", default=None, help="image path column (default: image, path, ...)")
    p.add_argument("--caption-column", default=None, help="caption column (default: caption, text, ...)")
    p.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass" + d)
    p.add_argument("--seed", type=int, default=0, help="MetaCLIP sampling" + d)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.cli import CliError
    from clipforge.hygiene.curate import CurateJob, curate

    for flag in ("near_duplicates", "min_score"):
        v = getattr(args, flag)
        if v is not None and not -1 <= v <= 1:
            raise CliError(f"--{flag.replace('_', '-')} is a cosine similarity in [-1, 1]")
    if not (args.exact_images or args.exact_captions or args.near_duplicates is not None or args.min_score is not None
            or args.top_fraction is not None or args.metadata):
        raise CliError("nothing to do: give at least one of --exact-images, --exact-captions, --near-duplicates, "
                       "--min-score, --top-fraction, --metadata")
    needs_vectors = args.near_duplicates is not None or args.min_score is not None or args.top_fraction is not None
    if needs_vectors and not (args.model or args.embeddings):
        raise CliError("--near-duplicates, --min-score and --top-fraction need --model or --embeddings")
    model = None
    if args.model:
        import clipforge

        model, _ = clipforge.load(args.model)
        model.eval()
    report = curate(CurateJob(
        input=args.input, out=args.out, model=model, embeddings=args.embeddings, work=args.work,
        exact_images=args.exact_images, exact_captions=args.exact_captions, near_threshold=args.near_duplicates,
        min_score=args.min_score, top_fraction=args.top_fraction, metadata=args.metadata, per_entry=args.per_entry,
        image_column=args.image_column, caption_column=args.caption_column, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress))
    print(f"kept {report['rows_out']} of {report['rows_in']} pairs; written to {args.out}")
    for why, count in report["dropped"].items():
        print(f"  dropped {count:>8}  {why}")
    if report["score_threshold"] is not None:
        print(f"CLIP-score threshold: {report['score_threshold']:.4f}")
    print(f"report: {report['report']}")
    return 0

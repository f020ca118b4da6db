"""``clipforge data pack``: turn a CSV/TSV/Parquet table or an image folder into WebDataset shards.

Images are decoded (EXIF rotation applied, CMYK/16-bit/alpha converted), shrunk so the longer
side is at most --max-side, and stored as JPEG next to their caption: 00000.tar, 00001.tar,
... plus stats.json. Unusable samples are skipped and counted by kind. Prints the brace
pattern to give to ``clipforge train --data``.
"""

from __future__ import annotations

import argparse

from clipforge.cli._types import whole_number

_positive, _quality = whole_number(1), whole_number(1, 100, "JPEG quality is")


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("pack", help="convert a table or image folder into WebDataset shards",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--input", required=True,
                   help="CSV/TSV/Parquet file (image paths relative to it) or folder of images + same-stem .txt")
    p.add_argument("--out", required=True, help="output folder for the shards and stats.json")
    p.add_argument("--image-key", default="image", help="image column of a table" + d)
    p.add_argument("--caption-key", default="caption", help="caption column of a table" + d)
    p.add_argument("--max-side", type=_positive, default=512, help="longest image side in pixels" + d)
    p.add_argument("--jpeg-quality", type=_quality, default=90, help="JPEG quality 1..100" + d)
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard" + d)
    p.add_argument("--workers", type=_positive, default=None, help="processes (default: up to 8 CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.data.config import DataConfig
    from clipforge.data.pack import pack_dataset

    src = DataConfig(args.input, image_key=args.image_key, caption_key=args.caption_key)
    stats = pack_dataset(src, args.out, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                         shard_size=args.shard_size, workers=args.workers, progress=not args.no_progress,
                         overwrite=args.overwrite)
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    print(f"packed {stats['samples']} samples into {stats['shards']} shards "
          f"({stats['bytes'] / 1e6:.1f} MB) in {stats['seconds']:.1f}s; skipped: {skipped}")
    print(f"train with: --data '{stats['pattern']}'")
    return 0

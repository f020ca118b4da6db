"""``clipforge data synth``: generate the built-in data world of captioned shapes.

Writes train/val/test splits, a held-out-composition split and four shifted test sets
(sketch, noise, texture, scale+rotation) as images + CSV (or WebDataset shards), zero-shot
task files under tasks/, and world.json. Every sample is a pure function of (seed, split,
index); an existing complete world with the same settings is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.cli._types import fraction, whole_number

_count, _positive, _rate = whole_number(0), whole_number(1), fraction()


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "synth", help="generate the built-in data world", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    # Defaults mirror SynthConfig's (a test keeps them equal); the import waits for run().
    d = " (default: %(default)s)"
    p.add_argument("--train", type=_count, default=20000, help="training samples" + d)
    p.add_argument("--val", type=_count, default=1000, help="validation samples" + d)
    p.add_argument("--test", type=_count, default=2000, help="test samples" + d)
    p.add_argument("--shifted", type=_count, default=1000, help="samples in test_heldout and each shifted test set" + d)
    p.add_argument("--image-size", type=_positive, default=64, help="image side in pixels, 32..224" + d)
    p.add_argument("--seed", type=_count, default=0, help="world seed: same seed, same bytes" + d)
    p.add_argument("--workers", type=_positive, default=None, help="processes (default: all CPUs)")
    p.add_argument("--format", choices=("csv", "wds"), default="csv",
                   help="images + CSV per split, or WebDataset tar shards" + d)
    p.add_argument("--image-format", choices=("png", "jpg", "bmp"), default="png",
                   help="JPEG is written at quality 95; BMP uncompressed (fastest to write and read)" + d)
    p.add_argument("--heldout-pairs", type=_count, default=5,
                   help="(colour, shape) pairs seen only in test_heldout" + d)
    p.add_argument("--max-objects", type=_positive, default=3, help="most objects in one image, 1..3" + d)
    p.add_argument("--shard-size", type=_positive, default=1000, help="samples per tar shard with --format wds" + d)
    # The paper's mechanisms, each off by default (the plain world keeps its bytes).
    p.add_argument("--caption-style", choices=("alt", "sentence"), default="alt",
                   help="keyword-style alt text (often a bare label) or full sentences (a bare label is rare)" + d)
    p.add_argument("--polysemy", action="store_true",
                   help="add a gemstone that captions also call 'diamond', and a 'sense' task on the two")
    p.add_argument("--spurious", type=_rate, default=0.0, metavar="P",
                   help="P(background texture follows the shape) in train/val/test; the shifted splits break "
                        "it" + d)
    p.add_argument("--template-set", choices=("basic", "paper"), default="basic",
                   help="the tasks' template ensembles: 4-6 templates, or the paper's 80 of varied context" + d)
    p.add_argument("--mismatch-rate", type=_rate, default=0.0,
                   help="also write train_flawed.csv with this fraction of captions swapped among rows" + d)
    p.add_argument("--plant-duplicates", type=_count, default=0,
                   help="also put this many edited copies of test images into train_flawed.csv (flaws.json "
                        "records which)" + d)
    p.add_argument("--force", action="store_true", help="regenerate even if OUT already holds this world")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from clipforge.data.synth import SynthConfig, generate_world

    if (args.mismatch_rate or args.plant_duplicates) and args.format != "csv":
        from clipforge.cli import CliError

        raise CliError("--mismatch-rate and --plant-duplicates need --format csv")
    cfg = SynthConfig(  # validates ranges, raising DataError with a one-line message
        seed=args.seed, image_size=args.image_size, train=args.train, val=args.val, test=args.test,
        shifted=args.shifted, format=args.format, image_format=args.image_format,
        heldout_pairs=args.heldout_pairs, max_objects=args.max_objects, shard_size=args.shard_size,
        caption_style=args.caption_style, polysemy=args.polysemy, spurious=args.spurious,
        template_set=args.template_set,
    )
    start = time.perf_counter()
    manifest = generate_world(cfg, args.out, workers=args.workers, progress=not args.no_progress, force=args.force)
    seconds = time.perf_counter() - start
    for name, split in manifest["splits"].items():
        where = split.get("csv") or split.get("shards") or "-"
        print(f"{name:<22}{split['size']:>8}  {where}")
    print(f"tasks: {', '.join(manifest['tasks'])} (in {args.out / 'tasks'})")
    print(f"held-out pairs: {', '.join(' '.join(p) for p in manifest['heldout_pairs']) or 'none'}")
    if manifest.get("mechanisms"):
        print(f"mechanisms: {', '.join(manifest['mechanisms'])} (world.json)")
    if args.mismatch_rate or args.plant_duplicates:
        from clipforge.data.synth.flaws import FlawConfig, add_flaws

        flaws = add_flaws(args.out, FlawConfig(args.mismatch_rate, args.plant_duplicates, seed=args.seed))
        print(f"train_flawed.csv: {len(flaws['mismatched'])} mismatched captions, {len(flaws['planted'])} planted "
              f"near-duplicates of test images (flaws.json)")
    print(f"world written to {args.out} in {seconds:.1f}s")
    return 0

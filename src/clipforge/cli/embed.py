"""``clipforge embed``: images (folder, CSV/TSV/Parquet of paths, WebDataset shards) or texts into
float16 L2-normalised ``.npy`` parts plus Parquet metadata (the clip-retrieval layout).

Resumable: run the same command again after an interruption and finished parts are skipped.
Unreadable images go to ``OUT/skipped.tsv``. Several GPUs or nodes:
``torchrun --nproc_per_node=N -m clipforge embed ...`` (rank r writes parts r, r+N, ...).
"""

from __future__ import annotations

import argparse
import json
import os

from clipforge.cli.convert import HELP_RUNTIME, HELP_TEXT_MODEL_DIR, RUNTIMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="embed images or texts into resumable .npy + Parquet parts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="checkpoint path or pretrained name: anything clipforge.load accepts")
    p.add_argument("--arch", default=None, help="architecture name for state dicts that do not reveal it")
    p.add_argument("--text-model-dir", default=None, metavar="DIR", help=HELP_TEXT_MODEL_DIR)
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=HELP_RUNTIME)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="image folder (recursive), .csv/.tsv/.parquet of paths, .tar shard(s) or "
                                     "a brace pattern like 'shards/{00000..00099}.tar'")  # fmt: skip
    src.add_argument("--texts", help="texts to embed: a .txt file (one per line) or a table with a caption column")
    p.add_argument("--out", required=True, help="output directory (EMB_DIR)")
    p.add_argument("--path-column", default=None, help="image path column of a table (default: path, image, ...)")
    p.add_argument("--caption-column", default=None, help="caption column (default: caption, text, title, ...)")
    p.add_argument("--embed-captions", action="store_true", help="also write text_emb parts for the captions")
    p.add_argument("--only-new", metavar="INDEX_DIR", default=None,
                   help="embed only images whose path is not in this index yet (for incremental updates)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--part-size", type=int, default=10_000, help="inputs per output part (default 10000)")
    p.add_argument("--workers", type=int, default=None, help="decoding worker processes (default: CPUs - 1, at most 8)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: fp16 on CUDA, fp32 on CPU)")  # fmt: skip
    p.add_argument("--decode", default="auto", choices=["auto", "pil", "torch"],
                   help="pil: Pillow in workers; torch: batched JPEG decoding on the device (auto: torch on CUDA)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (no 1/2-1/8 draft scaling)")
    p.add_argument("--max-image-pixels", type=int, default=2**27, help="larger images are skipped (default 2^27)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import clipforge
    from clipforge.cli import CliError
    from clipforge.search import decode, sources
    from clipforge.search.embed import EmbedConfig, embed_images, embed_texts, summary_dict

    if args.batch_size < 1 or args.part_size < 1:
        raise CliError("--batch-size and --part-size must be at least 1")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model, _ = clipforge.load(args.model, arch=args.arch, text_model_dir=args.text_model_dir, runtime=args.runtime)
    if getattr(model, "runtime", "torch") == "onnx":
        _onnx_settings(args)
    cfg = EmbedConfig(
        batch_size=args.batch_size, part_size=args.part_size,
        num_workers=decode.default_workers() if args.workers is None else args.workers,
        device=args.device, precision=args.precision, decode=args.decode, draft=not args.no_draft,
        max_image_pixels=args.max_image_pixels, embed_captions=args.embed_captions,
        rank=rank, world_size=world, progress=not args.no_progress,
    )  # fmt: skip
    if args.texts:
        texts = sources.read_texts(args.texts, args.caption_column)
        summary = embed_texts(model, texts, args.out, cfg, source=os.path.abspath(args.texts))
    else:
        spec = sources.InputSpec(args.input, args.path_column, args.caption_column)
        table = sources.list_images(spec)
        if args.only_new:
            table = _only_new(table, args.only_new)
            if table.num_rows == 0:
                print(f"nothing new to embed: every image is already in {args.only_new}")
                return 0
        summary = embed_images(model, table, args.out, cfg, source=args.input)
    s = summary_dict(summary)
    if rank == 0 or world == 1:
        print(json.dumps(s))
        if summary.unreadable:
            print(f"{summary.unreadable} unreadable input(s) listed in {os.path.join(args.out, 'skipped.tsv')}")
    return 0


def _onnx_settings(args: argparse.Namespace) -> None:
    """An ONNX export runs on the CPU in its own precision: other settings are refused, "auto" becomes those."""
    from clipforge.cli import CliError

    wrong = [f"--device {args.device}"] if args.device not in ("auto", "cpu") else []
    wrong += [f"--precision {args.precision}"] if args.precision not in ("auto", "fp32") else []
    if wrong:
        raise CliError(f"the onnx runtime runs on the CPU in the export's precision; drop {' and '.join(wrong)}")
    args.device, args.precision = "cpu", "fp32"


def _only_new(table, index_dir: str):
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.compute as pc

    from clipforge.search.layout import index_files
    from clipforge.search.store import Store

    store = Store(index_files(Path(index_dir))[1], readonly=True)
    known = store.paths(with_duplicates=True)  # dropped near-duplicates stay out
    store.close()
    keep = pc.invert(pc.is_in(table.column("path"), value_set=pa.array(sorted(known), pa.string())))
    return table.filter(keep)

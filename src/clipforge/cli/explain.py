"""``clipforge explain``: where in an image a model finds a text (or another image).

Writes the map laid over the part of the image the model sees (its centre crop); several
``--text`` / ``--query-image`` give a panel, one map per query. ``--npy`` also saves the raw maps
([H, W], or [T, H, W] for several queries; values in [0, 1], at the model's input size).
"""

from __future__ import annotations

import argparse

from clipforge.cli.convert import HELP_TEXT_MODEL_DIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="explanation maps: where the model finds a text or image in an image",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint path or pretrained name: anything clipforge.load accepts")
    p.add_argument("--arch", default=None, help="architecture name for state dicts that do not reveal it")
    p.add_argument("--text-model-dir", default=None, metavar="DIR", help=HELP_TEXT_MODEL_DIR)
    p.add_argument("--image", required=True, help="the image to explain")
    p.add_argument("--text", action="append", default=[], help="a text query (repeat for a panel)")
    p.add_argument("--query-image", action="append", default=[], metavar="PATH",
                   help="an image query: where the image resembles it (repeatable)")
    p.add_argument("--method", default="auto", choices=["auto", "dense", "relevance", "gradcam"],
                   help="auto: the image tower's default (README: Explanation maps) [auto]")
    p.add_argument("--shifts", type=int, default=1, metavar="N",
                   help="average N x N passes over the image shifted by fractions of a patch: finer maps, "
                        "N^2 times the work [1]")
    p.add_argument("--refine", default="guided", choices=["guided", "none"],
                   help="guided: fit the map to the image's colour edges (a peak lands on the object, not beside "
                        "it); none: the bilinear map [guided]")
    p.add_argument("--out", required=True, help="PNG: the map over the image, or a panel for several queries")
    p.add_argument("--npy", default=None, metavar="PATH", help="also save the raw maps as a NumPy array")
    p.add_argument("--alpha", type=float, default=0.55, help="opacity of the map over the image [0.55]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... [cpu]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.cli import CliError

    if not args.text and not args.query_image:
        raise CliError("give at least one --text or --query-image")
    if not 1 <= args.shifts <= 16:
        raise CliError("--shifts is between 1 and 16")
    if not 0 <= args.alpha <= 1:
        raise CliError("--alpha is an opacity in [0, 1]")
    if not args.out.lower().endswith(".png"):
        raise CliError("--out is a .png file")

    import numpy as np

    import clipforge
    from clipforge.explanations import explain, methods_for
    from clipforge.explanations.render import model_view, overlay, panel

    image = _read_image(args.image)
    queries: list = list(args.text) + [_read_image(p) for p in args.query_image]
    labels = list(args.text) + [f"image: {p}" for p in args.query_image]
    model, preprocess = clipforge.load(args.model, arch=args.arch, text_model_dir=args.text_model_dir,
                                       device=args.device, runtime="torch")
    options = methods_for(model)
    method = options[0] if args.method == "auto" else args.method
    if method not in options:
        raise CliError(f"--method {method} is not available for this model's image tower; it has: {', '.join(options)}")
    maps = explain(model, image, queries, method=method, shifts=args.shifts, refine=args.refine,
                   preprocess=preprocess).numpy()  # [T, H, W]
    view = model_view(image, model.config.preprocess)
    picture = overlay(view, maps[0], args.alpha) if len(maps) == 1 else panel(view, maps, labels, args.alpha)
    picture.save(args.out)
    if args.npy:
        np.save(args.npy, maps[0] if len(maps) == 1 else maps)
    print(f"{method} map{'s' if len(maps) > 1 else ''} for {len(maps)} quer{'ies' if len(maps) > 1 else 'y'} "
          f"written to {args.out}" + (f" (raw: {args.npy})" if args.npy else ""))
    return 0


def _read_image(path: str):
    import io

    from PIL import Image

    from clipforge.errors import ClipforgeError
    from clipforge.imageio import RefusedFile, as_rgb, read_limited

    try:
        return as_rgb(Image.open(io.BytesIO(read_limited(path))))
    except FileNotFoundError:
        raise ClipforgeError(f"no such image: {path}") from None
    except RefusedFile as e:
        raise ClipforgeError(f"{path}: {e}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClipforgeError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None

"""``clipforge pretrained``: list the named weights that ``clipforge.load`` and every ``--model`` accept.

Each row is loaded as ``ARCH/TAG`` (or ``clipforge.load("ARCH", pretrained="TAG")``); the weights are
downloaded on first use into the cache (``$CLIPFORGE_CACHE``, default ``~/.cache/clipforge``; hub
repos go to huggingface_hub's cache) and verified. Any Hugging Face repo also loads as
``hf-hub:org/repo``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("pretrained", help="list named pretrained weights", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arch", nargs="?", help="only this architecture's weights")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from clipforge.errors import ClipforgeError
    from clipforge.model.pretrained import list_entries

    entries = [e for e in list_entries() if args.arch in (None, e.arch)]
    if args.arch is not None and not entries:
        raise ClipforgeError(f"no named weights for {args.arch!r}; `clipforge pretrained` lists them all")
    rows = [{"name": e.name, "arch": e.arch, "tag": e.tag, "source": e.source,
             "activation": "QuickGELU" if e.quick_gelu else "GELU", "sha256": e.sha256 or None,
             "hf_hub": e.hf_hub or None, "tokenizer": e.tokenizer, "context_length": e.context_length,
             "mean": e.mean, "std": e.std, "interpolation": e.interpolation, "resize_mode": e.resize_mode}
            for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows) + 2
    print(f"{'name':<{width}}{'activation':<12}source")
    for r in rows:
        print(f"{r['name']:<{width}}{r['activation']:<12}{r['source']}")
    return 0

"""``clipforge data {synth,pack,overlap,curate}``: generate the built-in data world; pack datasets into
shards; find train/test overlap; curate training pairs.

Each action registers itself from its own module (``_data_<action>.py``).
"""

from __future__ import annotations

import argparse
import importlib

ACTIONS = ("synth", "pack", "overlap", "curate")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="generate or convert datasets", description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name in ACTIONS:
        try:
            module = importlib.import_module(f"clipforge.cli._data_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"clipforge.cli._data_{name}":
                raise
            continue
        module.register(actions)

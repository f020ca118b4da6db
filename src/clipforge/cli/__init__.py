"""The ``clipforge`` command line: parses arguments, then calls the library.

Each sub-command lives in its own module here and exposes ``register(subparsers)``,
which adds a parser whose ``func`` default receives the parsed namespace. Modules are
discovered by name, so adding a command never edits this file. Heavy imports (torch,
the library) happen inside the command functions, keeping ``--help`` instant.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys


from clipforge.errors import ClipforgeError


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class CliError(ClipforgeError):
    """Misuse of a command: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge",
        description="Train, load, evaluate, embed and search with CLIP models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ClipforgeError, FileNotFoundError) as e:
        # Errors about the user's input or files: one clear line, no traceback.
        print(f"clipforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        # A full or read-only disk met outside the writers that already explain it (a log line,
        # a summary): the machine's state, not a bug. Checkpoints and finished parts stay intact.
        print(f"clipforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        # An input larger than this machine's memory is the input's size, not a bug: one line.
        print(f"clipforge {args.command}: error: out of memory (an input larger than this machine can hold; "
              "lower the batch size or the input's size)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)

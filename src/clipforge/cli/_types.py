"""Argument types shared by the commands: a bad value is argparse's one-line usage error naming
the flag, not a traceback from deep in the library."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(minimum: int = 0, maximum: int | None = None, what: str = "") -> Callable[[str], int]:
    """An int flag within [minimum, maximum]; ``what`` names the quantity in the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if maximum is not None and not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{what or 'must be'} {minimum}..{maximum}, got {value}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if minimum == 0 else f'at least {minimum}'}, "
                                             f"got {value}")
        return value
    return parse


def fraction(closed: bool = True) -> Callable[[str], float]:
    """A float flag within 0..1 (``closed``) or strictly between 0 and 1."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if closed and not 0 <= value <= 1:
            raise argparse.ArgumentTypeError(f"must be within 0..1, got {value}")
        if not closed and not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
        return value
    return parse

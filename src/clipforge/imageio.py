"""Image inputs, read one way everywhere: training (``data``), evaluation (``eval``), embedding and
the service (``search``) all find, read and decode images through this module, so the same file
gives the same RGB pixels wherever it goes.

- ``as_rgb``: the decoded image as 8-bit RGB: EXIF orientation applied, the first frame of an
  animation, 16/32-bit greys rescaled (not clipped to white), transparency composited onto
  **white**, palette/CMYK/LA/... converted.
- ``read_limited``: a file's bytes, refusing (before reading) what is not a regular file (a FIFO
  would block, ``/dev/zero`` never ends) and what is larger than a limit.
- ``walk_files``: a folder's files, recursively, following links to folders but never into a
  cycle and never listing a folder or a linked file twice.

A base module: PIL and NumPy only, nothing of the package (no torch).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

MAX_FILE_BYTES = 256 * 2**20  # an image file larger than this is refused unread (40 MP TIFF: ~160 MB)
BACKGROUND = (255, 255, 255)  # what transparent pixels show: white, as training always composited
_ORIENTATION = 0x0112  # the EXIF tag; 1 (or none) = upright, 2..8 = mirrored and/or rotated
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


class RefusedFile(Exception):
    """A file refused before reading; ``kind`` is the skip kind ('unreadable_file' or 'too_large')."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def read_limited(path: str, limit: int = MAX_FILE_BYTES, truncate: bool = False) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    Raises ``RefusedFile`` for a FIFO, device, socket or directory (opened non-blocking, so a FIFO
    with no writer does not hang) and for a file larger than ``limit`` (from its size, unread;
    with ``truncate``, its first ``limit`` bytes instead); ``OSError`` (e.g. ``FileNotFoundError``)
    when it cannot be opened at all."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", closefd=True) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, device or socket)"
            raise RefusedFile("unreadable_file", f"{path}: {what}")
        if st.st_size > limit and not truncate:
            raise RefusedFile("too_large", f"{path}: {st.st_size} bytes > {limit} (refused unread)")
        data = f.read(limit + 1)
    if truncate:
        return data[:limit]
    if len(data) > limit:  # grew while we looked
        raise RefusedFile("too_large", f"{path}: more than {limit} bytes (refused)")
    return data


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) read from the header; 1 when absent or unreadable. Cheap for
    JPEG/WebP/TIFF (parsed at open); PNG keeps EXIF after the pixels, so there it loads them."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is shown: swapped for a 90/270-degree EXIF orientation."""
    w, h = img.size
    return (h, w) if orientation(img) in _TRANSPOSED else (w, h)


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (no copy when it is already upright)."""
    if orientation(img) == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the pixels
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB. 16/32-bit greys are rescaled (Pillow's convert would clip them to white);
    transparency is composited onto ``BACKGROUND`` (white) rather than exposing whatever colour
    hides under it; palette, CMYK, greyscale, LA, ... are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info:  # a palette entry or colour key
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        back = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(back, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def as_rgb(img: Image.Image) -> Image.Image:
    """The one decoding step every reader uses: pixels loaded (the first frame of an animation),
    EXIF orientation applied, then ``to_rgb``. Decoding errors propagate (OSError, ValueError, ...)."""
    img.load()
    return to_rgb(upright(img))


def walk_files(root: str, keep: Callable[[str], bool], skip_hidden: bool = False) -> list[str]:
    """Paths (``root`` joined with the relative path) of the files under ``root`` whose name
    ``keep`` accepts, recursively, links followed. Every folder is walked once, remembered by
    (device, inode): a link to a folder already walked (``.``, a parent, a second link to the same
    place) adds nothing, so cycles end. Real folders are walked before linked ones and real files
    kept before links to them, so the path kept is the real one when both are under ``root``.
    A link to a file already listed is dropped; hard links (two names, one inode) are two files.
    Unreadable folders are passed over, as ``os.walk`` does. Order: unspecified (callers sort)."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    out: list[str] = []
    linked_files: list[str] = []
    real: list[str] = [root]
    linked: list[str] = []
    while real or linked:
        top = real.pop() if real else linked.pop(0)
        try:
            st = os.stat(top)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_ino and key in seen_dirs:
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs, sublinks = [], []
        for e in entries:
            if skip_hidden and e.name.startswith("."):
                continue
            try:
                is_link = e.is_symlink()
                is_dir = e.is_dir()  # follows links
            except OSError:
                continue
            if is_dir:
                (sublinks if is_link else subdirs).append(e.path)
            elif keep(e.name):
                if is_link:
                    linked_files.append(e.path)
                else:  # a FIFO or device named like an image is listed too: its reader refuses it, counted
                    seen_files.add((st.st_dev, e.inode()))
                    out.append(e.path)
        real.extend(reversed(subdirs))  # depth first, in name order
        linked.extend(sublinks)
    for path in sorted(linked_files):
        try:
            st = os.stat(path)
        except OSError:  # a dangling link: listed as the file it names, so the reader reports it
            out.append(path)
            continue
        key = (st.st_dev, st.st_ino)
        if st.st_ino and key in seen_files:
            continue
        seen_files.add(key)
        out.append(path)
    return out

"""What makes a sample unusable, and turning raw bytes into an RGB image and a caption.

Every failure becomes a ``Skip(kind, detail)``, never an exception, so one bad file costs
one sample. The kinds (the keys of every ``skipped`` count):
"""

from __future__ import annotations

import io
import logging
import warnings
from collections import Counter
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from clipforge.imageio import RefusedFile, as_rgb, read_limited, to_rgb, upright

__all__ = ["SKIP_KINDS", "Skip", "RawSample", "note_skip", "read_file", "decode_caption", "decode_image", "to_rgb",
           "upright", "load_sample"]

log = logging.getLogger("clipforge.data")

SKIP_KINDS = {
    "missing_file": "image file (or tar member) not found",
    "unreadable_file": "image file exists but could not be read (permissions, a directory, a pipe or device, I/O "
                       "error)",
    "empty_file": "zero-byte image file",
    "not_an_image": "not a recognised image format (e.g. a text file named .jpg)",
    "corrupt_image": "image header parsed but pixels failed to decode (truncated JPEG, bad data)",
    "too_small": "shorter side below min_image_side (e.g. 1x1 pixels)",
    "too_large": "more pixels than max_image_pixels, or a file or tar member of more than 256 / 64 MiB (refused "
                 "from its header or size, before decoding or reading)",
    "missing_caption": "no caption (.txt sidecar or tar member missing)",
    "empty_caption": "caption empty or only whitespace",
    "bad_caption_encoding": "caption bytes are not valid UTF-8",
    "bad_caption": "the tokenizer failed on the caption",
    "malformed_row": "a CSV row with the wrong number of fields or broken quoting",
    "truncated_tar": "a shard ended early or was corrupt (its last, partial sample is dropped)",
    "unreadable_shard": "a shard file missing or not a tar archive",
    "sparse_member": "a sparse tar member (GNU/PAX sparse: a few bytes that expand to any size), refused unread; "
                     "its whole sample is dropped",
}
__doc__ += "".join(f"\n- ``{k}``: {v}" for k, v in SKIP_KINDS.items())

_LOG_PER_KIND = 5  # per process: enough to find the culprit without flooding the log
_logged: Counter = Counter()


class Skip(NamedTuple):
    kind: str
    detail: str = ""


def note_skip(skip: Skip, counts: Counter) -> None:
    """Count a skip and log the first few of each kind (with the file that caused them)."""
    counts[skip.kind] += 1
    _logged[skip.kind] += 1
    if _logged[skip.kind] <= _LOG_PER_KIND:
        more = " (further ones are counted, not logged)" if _logged[skip.kind] == _LOG_PER_KIND else ""
        log.warning("skipped sample (%s): %s%s", skip.kind, skip.detail, more)


def read_file(path: str) -> bytes | Skip:
    """The file's bytes; a pipe, device or directory ('unreadable_file') and a file over
    ``imageio.MAX_FILE_BYTES`` ('too_large') are refused without reading (a FIFO never blocks)."""
    try:
        return read_limited(path)
    except RefusedFile as e:
        return Skip(e.kind, str(e))
    except FileNotFoundError:
        return Skip("missing_file", path)
    except OSError as e:
        return Skip("unreadable_file", f"{path}: {e.strerror or e}")


def decode_caption(raw: bytes | str | None, where: str = "") -> str | Skip:
    """UTF-8 text, stripped. Long captions are kept whole: the tokenizer truncates them."""
    if raw is None:
        return Skip("missing_caption", where)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Skip("bad_caption_encoding", f"{where}: {e}")
    text = raw.replace("\x00", " ").lstrip("\ufeff").strip()
    return text if text else Skip("empty_caption", where)


def decode_image(data: bytes, min_side: int, max_pixels: int, where: str = "") -> Image.Image | Skip:
    """An RGB image, decoded by ``clipforge.imageio.as_rgb`` as evaluation, embedding and the
    service decode it: EXIF rotation applied, first frame of animations, CMYK/16-bit/alpha converted.

    The size is checked from the header, before any pixel is decoded, so a decompression bomb
    costs nothing; Pillow's own bomb guard is turned into the same 'too_large' skip.
    """
    if len(data) == 0:
        return Skip("empty_file", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return Skip("too_large", f"{where}: {e}")
    except UnidentifiedImageError:
        return Skip("not_an_image", where)
    except Exception as e:  # noqa: BLE001 - any parser failure means this one file is bad
        return Skip("corrupt_image", f"{where}: {type(e).__name__}: {e}")
    w, h = img.size
    if w * h > max_pixels:
        return Skip("too_large", f"{where}: {w}x{h} > {max_pixels} pixels")
    if min(w, h) < min_side:
        return Skip("too_small", f"{where}: {w}x{h}, shorter side < {min_side}")
    try:
        return as_rgb(img)  # the decoding every reader shares (clipforge.imageio): first frame, EXIF, RGB
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data (or out of memory for it)
        return Skip("corrupt_image", f"{where}: {type(e).__name__}: {e}")


class RawSample(NamedTuple):
    """One entry of a table or folder, before anything is read."""

    where: str  # names the sample in logs: a path, or file:row
    image: str | bytes | None  # a path, or the encoded image itself (Parquet binary column)
    caption: bytes | str | None  # the caption, or None to read ``caption_path``
    caption_path: str | None = None
    bad: str | None = None  # already known to be unusable (a malformed row): the skip kind


def load_caption(raw: RawSample) -> str | Skip:
    """One entry's caption, read from its own file where it has one; the image is left unread."""
    if raw.bad is not None:
        return Skip(raw.bad, raw.where)
    caption_raw = raw.caption
    if caption_raw is None and raw.caption_path is not None:
        got = read_file(raw.caption_path)
        if isinstance(got, Skip):
            return Skip("missing_caption", raw.caption_path) if got.kind == "missing_file" else got
        caption_raw = got
    return decode_caption(caption_raw, raw.where)


def load_sample(raw: RawSample, min_side: int, max_pixels: int) -> tuple[Image.Image, str] | Skip:
    """Read and decode one entry. The caption is checked first: it is the cheaper of the two."""
    caption = load_caption(raw)
    if isinstance(caption, Skip):
        return caption
    if raw.image is None or raw.image == "":
        return Skip("missing_file", f"{raw.where}: no image given")
    data = read_file(raw.image) if isinstance(raw.image, str) else raw.image
    if isinstance(data, Skip):
        return data
    img = decode_image(data, min_side, max_pixels, raw.where)
    return img if isinstance(img, Skip) else (img, caption)

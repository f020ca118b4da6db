"""Image bytes for tests: named solid colours, numbered colours, odd-but-valid files and hostile ones."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 160), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (10, 10, 10)}
NAMES = list(COLOURS)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png(colour: str, size: int = 24) -> bytes:
    """A solid square of one of ``COLOURS``."""
    return encode(Image.new("RGB", (size, size), COLOURS[colour]), "PNG")


def color(i: int) -> tuple[int, int, int]:
    """The colour of numbered sample ``i`` (distinct for the sample counts the tests use)."""
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def image_bytes(i: int, size: int = 24, fmt: str = "PNG", noise: bool = False) -> bytes:
    """Numbered sample ``i``: a square of ``color(i)``, or seeded noise."""
    if noise:
        a = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(a, "RGB")
    else:
        img = Image.new("RGB", (size, size), color(i))
    return encode(img, fmt)


def noise_jpeg(seed: int = 0, size: int = 64) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)), "JPEG")


def png_claiming_size(w: int, h: int) -> bytes:
    """A tiny valid PNG whose header claims w x h pixels: a 50-megapixel image (or a
    decompression bomb) that must be refused before any pixel is decoded."""
    data = bytearray(png("red", 4))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


# -- unusual images that are nonetheless fine: each must be used, never skipped -------------------
def cmyk_jpeg(size: int = 16) -> bytes:
    return encode(Image.new("CMYK", (size, size), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def png16(size: int = 16) -> bytes:
    return encode(Image.fromarray(np.full((size, size), 32896, dtype=np.uint16)), "PNG")  # mid grey, 16-bit


def animated_gif(size: int = 16) -> bytes:
    red, blue = Image.new("RGB", (size, size), (255, 0, 0)), Image.new("RGB", (size, size), (0, 0, 255))
    return encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)  # first frame red


def exif_rotated_jpeg(w: int = 16, h: int = 8) -> bytes:
    img = Image.new("RGB", (w, h), (0, 128, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate by 90 degrees to display
    return encode(img, "JPEG", exif=exif)


def transparent_png(size: int = 16) -> bytes:
    return encode(Image.new("RGBA", (size, size), (10, 20, 30, 0)), "PNG")  # decodes as white


def odd_valid_images() -> dict[str, bytes]:
    """One of each odd-but-valid kind, by file name."""
    return {
        "cmyk.jpg": cmyk_jpeg(24),
        "grey16.png": png16(24),
        "anim.gif": animated_gif(24),
        "exif.jpg": exif_rotated_jpeg(32, 16),
        "alpha.png": transparent_png(24),
        "palette.png": encode(Image.new("P", (24, 24), 3), "PNG", transparency=0),
    }


def solid_png(w: int, h: int, mode: str = "RGBA") -> bytes:
    """A valid w x h PNG of one colour, written row by row (never w x h pixels in memory):
    154 KB for 6300 x 6300 RGBA, as in the issue."""
    channels = {"RGB": 3, "RGBA": 4}[mode]
    ctype = {"RGB": 2, "RGBA": 6}[mode]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\x00" + bytes([200, 30, 30, 255][:channels]) * w
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, ctype, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")

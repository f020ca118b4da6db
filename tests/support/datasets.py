"""Training data on disk, in every format clipforge reads.

Two families of samples:

- colour squares (``write_csv``, ``write_parquet``, ``write_folder``, ``write_shards``): sample i
  is a square of ``NAMES[i % 8]`` captioned "a <colour> square": a task nano learns in ten steps;
- numbered samples (``write_numbered_csv``, ``write_numbered_shards``): sample i is a square of
  ``color(i)`` captioned "caption i", so a test reads sample ids back from the tokens
  (``support.fakes.ids``) and checks order, splits and pairing exactly.

And the bad-input zoos, with the exact skip counts a pass over them must report.
"""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

from PIL import Image

from support.images import (
    NAMES,
    animated_gif,
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    image_bytes,
    noise_jpeg,
    odd_valid_images,
    png,
    png16,
    png_claiming_size,
)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """One WebDataset shard: ``samples`` as (key, {extension: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)


# -- colour squares --------------------------------------------------------------------------------
def pairs(n: int) -> list[tuple[str, str]]:
    """(key, colour) of the first n colour-square samples."""
    return [(f"{i:03d}", NAMES[i % len(NAMES)]) for i in range(n)]


def write_csv(root: Path, n: int = 32, bad: dict[str, int] | None = None) -> Path:
    """``root/train.csv``: n good rows, then broken ones, as
    ``{"not_an_image": k, "missing_file": k, "empty_file": k, "corrupt_image": k}``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for key, colour in pairs(n):
        (root / "img" / f"{key}.png").write_bytes(png(colour))
        rows.append((f"img/{key}.png", f"a {colour} square"))
    for kind, count in (bad or {}).items():
        for j in range(count):
            name = f"img/{kind}{j}.png"
            if kind == "not_an_image":
                (root / name).write_text("this is text, not a picture")
            elif kind == "empty_file":
                (root / name).write_bytes(b"")
            elif kind == "corrupt_image":
                (root / name).write_bytes(png("red", 64)[:120])  # header intact, pixels cut off
            rows.append((name, "a broken picture"))  # missing_file: nothing written
    path = root / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


def write_parquet(root: Path, n: int = 32) -> Path:
    """``root/train.parquet`` with the images inline: columns ``pixels`` and ``text``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    items = pairs(n)
    table = pa.table({"pixels": [png(c) for _, c in items], "text": [f"a {c} square" for _, c in items]})
    pq.write_table(table, root / "train.parquet")
    return root / "train.parquet"


def write_folder(root: Path, n: int = 32) -> Path:
    """A folder of ``key.png`` with their ``key.txt`` captions."""
    root.mkdir(parents=True, exist_ok=True)
    for key, colour in pairs(n):
        (root / f"{key}.png").write_bytes(png(colour))
        (root / f"{key}.txt").write_text(f"a {colour} square\n")
    return root


def write_shards(root: Path, n: int = 32, shards: int = 2) -> str:
    """n samples dealt round-robin over ``shards`` shards; returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    items = pairs(n)
    for s in range(shards):
        samples = [(key, {"png": png(colour), "txt": f"a {colour} square".encode()}) for key, colour in items[s::shards]]
        write_shard(root / f"{s:05d}.tar", samples)
    return str(root / ("{00000..%05d}.tar" % (shards - 1)))


# -- numbered samples ------------------------------------------------------------------------------
def write_numbered_images(root: Path, n: int, noise: bool = False) -> list[str]:
    """n PNGs ``img/00i.png``; returns the paths relative to ``root``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rel = []
    for i in range(n):
        (root / "img" / f"{i:03d}.png").write_bytes(image_bytes(i, noise=noise))
        rel.append(f"img/{i:03d}.png")
    return rel


def write_numbered_csv(root: Path, n: int, noise: bool = False, sep: str = ",", name: str = "data.csv") -> Path:
    rel = write_numbered_images(root, n, noise)
    path = root / name
    path.write_text("image" + sep + "caption\n" + "".join(f"{p}{sep}caption {i}\n" for i, p in enumerate(rel)))
    return path


def write_numbered_shards(root: Path, n_shards: int, per_shard: int, noise: bool = False) -> str:
    """Shards 000..; sample ids are global (shard * per_shard + j); returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            samples.append((f"{i:06d}", {"png": image_bytes(i, noise=noise), "txt": f"caption {i}".encode()}))
        write_shard(root / f"{s:03d}.tar", samples)
    return str(root / f"{{000..{n_shards - 1:03d}}}.tar")


# -- the bad-input zoos ----------------------------------------------------------------------------
def write_loader_zoo(root: Path) -> tuple[Path, int, dict[str, int]]:
    """``root/zoo.csv``: one of every kind of bad input, odd-but-valid images, six good numbered
    ones (captions "caption <file name>") and a 10,000-character caption.

    Returns (csv path, number of rows, the exact skip counts of one pass)."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "truncated.jpg": noise_jpeg(0)[:600],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "tiny.png": image_bytes(1, size=1),
        "huge.png": png_claiming_size(8700, 5800),  # 50 megapixels
        "cmyk.jpg": cmyk_jpeg(), "grey16.png": png16(), "anim.gif": animated_gif(), "exif.jpg": exif_rotated_jpeg(),
    }
    for i in range(6):
        files[f"good{i}.png"] = image_bytes(i)
    for name, data in files.items():
        (root / name).write_bytes(data)
    rows = [f"{n},caption {n}".encode() for n in files]
    rows += [b"good0.png,", b"good1.png,\"\xff\xfe not utf-8\"", b"good2.png," + b"long " * 2000,
             b"missing.png,caption missing", b"good3.png,too,many,fields"]
    (root / "zoo.csv").write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    expected = {"corrupt_image": 1, "empty_file": 1, "not_an_image": 1, "too_small": 1, "too_large": 1,
                "empty_caption": 1, "bad_caption_encoding": 1, "missing_file": 1, "malformed_row": 1}
    return root / "zoo.csv", len(rows), expected


def write_zoo_csv(root: Path, good: int = 90) -> tuple[Path, dict[str, int], int]:
    """A table of ``good`` usable rows (odd-but-valid images and a 10,000-character caption
    among them) and ``good / 9`` broken ones: a tenth of all rows.

    Returns (csv path, the exact skip counts one pass must report, number of rows)."""
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    lines: list[bytes] = []
    odd = odd_valid_images()
    for i in range(good):
        if i < len(odd):
            name, data = list(odd.items())[i]
            caption = f"an odd picture {name}".encode()
        else:
            name, data = f"{i:03d}.png", png(NAMES[i % len(NAMES)])
            caption = f"a {NAMES[i % len(NAMES)]} square".encode()
        if i == len(odd):
            caption = b"a very long caption " + b"word " * 2000  # 10,000+ characters: kept, truncated by the tokenizer
        (img / name).write_bytes(data)
        lines.append(b"img/" + name.encode() + b"," + caption)
    broken = {
        "truncated.jpg": (noise_jpeg(0)[:600], b"a truncated jpeg", "corrupt_image"),
        "truncated2.jpg": (noise_jpeg(1)[:900], b"another truncated jpeg", "corrupt_image"),
        "zero.jpg": (b"", b"a zero-byte file", "empty_file"),
        "text.jpg": (b"this is a text file, not a jpeg\n", b"text named jpg", "not_an_image"),
        "one.png": (encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), b"a 1x1 image", "too_small"),
        "fifty_mp.png": (png_claiming_size(8700, 5800), b"a 50 megapixel image", "too_large"),
    }
    expected: dict[str, int] = {}
    for name, (data, caption, kind) in broken.items():
        (img / name).write_bytes(data)
        lines.append(b"img/" + name.encode() + b"," + caption)
        expected[kind] = expected.get(kind, 0) + 1
    (img / "fine.png").write_bytes(png("red"))
    lines += [
        b"img/fine.png,",  # empty caption
        b'img/fine.png,"\xff\xfe caption in invalid utf-8"',
        b"img/not_there.png,a missing file",
        b"img/fine.png,too,many,fields",  # a malformed row
    ]
    for kind in ("empty_caption", "bad_caption_encoding", "missing_file", "malformed_row"):
        expected[kind] = expected.get(kind, 0) + 1
    assert sum(expected.values()) * 10 == good + sum(expected.values()), "a tenth of the rows must be broken"
    path = root / "zoo.csv"
    path.write_bytes(b"image,caption\n" + b"\n".join(lines) + b"\n")
    return path, dict(sorted(expected.items())), len(lines)


def write_zoo_shards(root: Path, good: int = 45) -> tuple[str, dict[str, int]]:
    """WebDataset shards with broken samples, a truncated shard and a shard that does not exist.

    Shard 0 holds ``good`` usable samples and 7 broken ones; shard 1 is cut in the middle of a
    member (its earlier samples are kept, one 'truncated_tar' counted); shard 2 is missing
    ('unreadable_shard'). Returns (brace pattern, exact skip counts of one pass)."""
    root.mkdir(parents=True, exist_ok=True)
    odd = list(odd_valid_images().items())
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(good):
            ext, data = ("png", png(NAMES[i % len(NAMES)]))
            if i < len(odd):
                ext, data = odd[i][0].rsplit(".", 1)[1], odd[i][1]
            add_member(tar, f"{i:04d}.{ext}", data)
            add_member(tar, f"{i:04d}.txt", f"a {NAMES[i % len(NAMES)]} thing".encode())
        broken = [
            ("b0", b"text, not a jpeg", b"text named jpg"),  # not_an_image
            ("b1", b"", b"zero bytes"),  # empty_file
            ("b2", png("red"), None),  # missing_caption (no .txt member)
            ("b3", png("red"), b"\xff\xfe\xfa"),  # bad_caption_encoding
            ("b4", png("red"), b"   \n"),  # empty_caption
            ("b5", encode(Image.new("RGB", (1, 1)), "PNG"), b"1x1"),  # too_small
            ("b6", png_claiming_size(8700, 5800), b"50 megapixels"),  # too_large
        ]
        for key, data, caption in broken:
            add_member(tar, f"{key}.jpg", data)
            if caption is not None:
                add_member(tar, f"{key}.txt", caption)
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for i in range(6):
            add_member(tar, f"t{i:03d}.png", png(NAMES[i % len(NAMES)], 48))
            add_member(tar, f"t{i:03d}.txt", f"a {NAMES[i % len(NAMES)]} square".encode())
    raw = full.getvalue()
    (root / "00001.tar").write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    expected = {"not_an_image": 1, "empty_file": 1, "missing_caption": 1, "bad_caption_encoding": 1,
                "empty_caption": 1, "too_small": 1, "too_large": 1, "truncated_tar": 1, "unreadable_shard": 1}
    return str(root / "{00000..00002}.tar"), dict(sorted(expected.items()))

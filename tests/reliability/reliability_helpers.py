"""Shared pieces of the reliability tests and the fault suite (benchmarks/faults/).

- ``write_pairs_csv``: a small solid-colour training table, optionally with broken rows;
- ``write_zoo_csv`` / ``write_zoo_shards``: datasets where a tenth of the samples are broken
  in every way the reliability issue lists, with the exact skip counts a run must report;
- ``children``: the processes a process started (DataLoader workers), read from /proc;
- ``checkpoint_health``: what a crash left in a checkpoint directory.

Not a test module (no ``test_`` prefix): the tests and the fault suite import it.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 160), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (10, 10, 10)}
NAMES = list(COLOURS)
FAULT_DRIVER = Path(__file__).with_name("fault_driver.py")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png(colour: str, size: int = 24) -> bytes:
    return encode(Image.new("RGB", (size, size), COLOURS[colour]), "PNG")


def png_claiming_size(w: int, h: int) -> bytes:
    """A tiny valid PNG whose header claims w x h pixels: a 50-megapixel image (or a
    decompression bomb) that must be refused before any pixel is decoded."""
    data = bytearray(png("red", 4))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", w, h)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def noise_jpeg(seed: int = 0, size: int = 64) -> bytes:
    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)), "JPEG")


def odd_valid_images() -> dict[str, bytes]:
    """Unusual images that are nonetheless fine: each must be used, never skipped."""
    red, blue = Image.new("RGB", (24, 24), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))
    exif_img = Image.new("RGB", (32, 16), (0, 128, 0))
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate by 90 degrees to display
    return {
        "cmyk.jpg": encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG", quality=95),
        "grey16.png": encode(Image.fromarray(np.full((24, 24), 32896, dtype=np.uint16)), "PNG"),
        "anim.gif": encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0),
        "exif.jpg": encode(exif_img, "JPEG", exif=exif),
        "alpha.png": encode(Image.new("RGBA", (24, 24), (10, 20, 30, 0)), "PNG"),
        "palette.png": encode(Image.new("P", (24, 24), 3), "PNG", transparency=0),
    }


# -- a plain training table --------------------------------------------------------------------
def write_pairs_csv(root: Path, n: int, bad: dict[str, int] | None = None) -> Path:
    """n good rows ("a red square", ...), then broken ones: {"not_an_image": k, "missing_file": k, "empty_file": k}."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = NAMES[i % len(NAMES)]
        (root / "img" / f"{i:03d}.png").write_bytes(png(colour))
        rows.append((f"img/{i:03d}.png", f"a {colour} square"))
    for kind, count in (bad or {}).items():
        for j in range(count):
            name = f"img/{kind}{j}.png"
            if kind == "not_an_image":
                (root / name).write_text("this is text, not a picture")
            elif kind == "empty_file":
                (root / name).write_bytes(b"")
            rows.append((name, "a broken picture"))  # missing_file: nothing written
    path = root / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


# -- the bad-input zoo -------------------------------------------------------------------------
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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


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
            _add(tar, f"{i:04d}.{ext}", data)
            _add(tar, f"{i:04d}.txt", f"a {NAMES[i % len(NAMES)]} thing".encode())
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
            _add(tar, f"{key}.jpg", data)
            if caption is not None:
                _add(tar, f"{key}.txt", caption)
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tar:
        for i in range(6):
            _add(tar, f"t{i:03d}.png", png(NAMES[i % len(NAMES)], 48))
            _add(tar, f"t{i:03d}.txt", f"a {NAMES[i % len(NAMES)]} square".encode())
    raw = full.getvalue()
    (root / "00001.tar").write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    expected = {"not_an_image": 1, "empty_file": 1, "missing_caption": 1, "bad_caption_encoding": 1,
                "empty_caption": 1, "too_small": 1, "too_large": 1, "truncated_tar": 1, "unreadable_shard": 1}
    return str(root / "{00000..00002}.tar"), dict(sorted(expected.items()))


# -- processes and checkpoints -----------------------------------------------------------------
def children(pid: int | None = None, forked: bool = False) -> list[int]:
    """Processes whose parent is ``pid`` (default: this one), from /proc (Linux); with
    ``forked``, only those running the parent's command line (forked DataLoader workers)."""
    pid = os.getpid() if pid is None else pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if forked else None
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        try:
            if cmdline is None or Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline:
                out.append(int(entry))
        except OSError:
            continue
    return sorted(out)


def checkpoint_health(root: Path) -> dict:
    """What a crash left behind: complete checkpoints (each loaded, to prove it), and the
    partial ones that must be ignored. ``broken`` lists complete-marked ones that fail to load."""
    import clipforge
    from clipforge.train import checkpointing as ckpt

    complete, broken = [], []
    for step, d in ckpt.list_checkpoints(root):
        try:
            ckpt.load_checkpoint(d)
            clipforge.load(d)
            complete.append(step)
        except Exception as e:  # noqa: BLE001 - any failure here is what the caller reports
            broken.append((step, f"{type(e).__name__}: {e}"))
    partial = sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []
    unmarked = sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and not (p / ckpt.MARKER).exists()) \
        if root.is_dir() else []
    return {"complete": complete, "broken": broken, "partial": partial, "unmarked": unmarked}


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ between two model directories (empty: bitwise equal)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if x.keys() != y.keys():
        return sorted(set(x) ^ set(y))
    return [k for k in x if not (x[k] == y[k]).all()]


# -- synthetic embeddings (search tests, load test) ---------------------------------------------
LABELS = ("cat", "dog", "car", "tree", "boat", "house", "bird", "flower")


def write_synthetic_embeddings(out: Path, rows: int, part_size: int, dim: int = 64, seed: int = 0,
                               prefix: str = "img", fingerprint: str = "synthetic") -> np.ndarray:
    """An embeddings directory as ``clipforge embed`` writes it (float16 unit vectors, Parquet
    metadata with path/caption/label, manifest), without a model or images. Returns the vectors."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.search.embed import FORMAT, part_name

    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((rows, dim)).astype(np.float32)
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float16)  # [rows, dim]
    for sub in ("img_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_parts = -(-rows // part_size)
    for p in range(n_parts):
        lo, hi = p * part_size, min((p + 1) * part_size, rows)
        np.save(out / part_name("img_emb", p, "npy"), vecs[lo:hi])
        table = pa.table({
            "path": [f"/data/{prefix}/{i:07d}.jpg" for i in range(lo, hi)],
            "caption": [f"a photo of a {LABELS[i % len(LABELS)]} number {i}" for i in range(lo, hi)],
            "label": [LABELS[i % len(LABELS)] for i in range(lo, hi)],
            "width": pa.array([256] * (hi - lo), pa.int32()), "height": pa.array([256] * (hi - lo), pa.int32()),
            "nbytes": pa.array([20_000] * (hi - lo), pa.int64()),
            "position": pa.array(range(lo, hi), pa.int64()),
        })
        pq.write_table(table, out / part_name("metadata", p, "parquet"))
    manifest = {"format": FORMAT, "kind": "image", "inputs": rows, "input": f"synthetic:{prefix}",
                "input_fingerprint": f"{prefix}-{seed}", "part_size": part_size, "parts": n_parts, "embed_dim": dim,
                "model": "nano", "model_fingerprint": fingerprint, "text_embeddings": False}
    (out / "embeddings.json").write_text(_json.dumps(manifest, indent=2))
    return vecs


def index_accounting(index_dir: Path, expected_paths: set[str] | None = None) -> dict:
    """Id bookkeeping of an index directory: items, duplicates, vectors without metadata (and
    the reverse), paths lost, and whether every vector finds itself first."""
    import faiss

    from clipforge.search.searcher import SearchIndex

    idx = SearchIndex(index_dir)
    try:
        live = idx.store.live_ids()
        paths = [p for batch in idx.store.iter_live() for _, p in batch]
        ntotal = int(idx.index.ntotal)
        out = {"items": len(live), "vectors": ntotal, "duplicate_paths": len(paths) - len(set(paths)),
               "vectors_without_item": 0, "items_without_vector": 0, "lost": 0, "self_hit_misses": 0}
        if idx.kind in ("flat", "ivf", "ivfpq"):
            id_map = faiss.vector_to_array(idx.index.id_map) if hasattr(idx.index, "id_map") else None
            if id_map is not None:
                have = set(id_map.tolist())
                out["vectors_without_item"] = len(have - set(live.tolist())) + (len(id_map) - len(have))
                out["items_without_vector"] = len(set(live.tolist()) - have)
        if expected_paths is not None:
            out["lost"] = len(expected_paths - set(paths))
        sample = live[:: max(1, len(live) // 200)]
        vecs = idx.vectors(sample.tolist())
        _, found = idx.search_ids(vecs, 1)
        out["self_hit_misses"] = int((found[:, 0] != sample).sum())
        return out
    finally:
        idx.close()

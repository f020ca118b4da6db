"""Hostile inputs (issue 19): small files that cost a reader a lot, or make it run code it should not.

Used by tests/reliability/test_hostile_inputs.py and benchmarks/faults/hostile_inputs.py. Everything
here is built in a few milliseconds from a few kilobytes; what a reader does with it is the test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

MiB = 2**20


def _checksum(block: bytearray) -> None:
    """Rewrite a tar header's checksum after its bytes were patched."""
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def _gnu_number(n: int, width: int = 12) -> bytes:
    """A tar number field: octal while it fits, GNU base-256 beyond (8 GiB and up)."""
    if n < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, n)
    out = bytearray(width)
    out[0] = 0o200
    for i in range(width - 1, 0, -1):
        out[i] = n & 0xFF
        n >>= 8
    return bytes(out)


def sparse_member(name: str, real_size: int, stored: bytes = b"\xff" * 512) -> bytes:
    """An old-GNU sparse member ('S'): ``stored`` at offset 0, then a hole up to ``real_size``.
    A few hundred bytes in the shard; a reader that extracts it gets ``real_size`` bytes."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = len(stored)
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[386:398] = _gnu_number(0)  # first map entry: offset 0 ...
    block[398:410] = _gnu_number(len(stored))  # ... holding the stored bytes
    block[482] = 0  # no extension headers
    block[483:495] = _gnu_number(real_size)
    _checksum(block)
    return bytes(block) + stored + b"\0" * (-len(stored) % 512)


def oversized_member(name: str, declared: int, stored: bytes = b"x" * 1024) -> bytes:
    """A plain member whose header declares ``declared`` bytes while the shard holds ``stored``."""
    info = tarfile.TarInfo(name)
    info.size = declared
    return info.tobuf(tarfile.GNU_FORMAT) + stored


def write_shard(path: Path, members: list[bytes], end: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(members)
        if end:
            f.write(b"\0" * 1024)
    return path


def sparse_shard(path: Path, real_size: int, image: bytes, caption: bytes = b"a red square") -> Path:
    """Sample 000000 (fine), sample 000001 whose image is sparse, sample 000002 (fine)."""
    return write_shard(path, [
        _member("000000.png", image), _member("000000.txt", caption),
        sparse_member("000001.png", real_size), _member("000001.txt", caption),
        _member("000002.png", image), _member("000002.txt", caption),
    ])


def oversized_shard(path: Path, declared: int, image: bytes, caption: bytes = b"a red square") -> Path:
    """Sample 000000 (fine), then a member declaring ``declared`` bytes where the shard ends."""
    return write_shard(path, [_member("000000.png", image), _member("000000.txt", caption),
                              oversized_member("000001.png", declared)], end=False)


def torchscript_bomb(path: Path, inflated: int) -> Path:
    """A real TorchScript archive (one 4-float parameter) whose tensor entry is replaced by
    ``inflated`` zero bytes, deflated: about inflated / 1000 bytes on disk."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are still TorchScript
        torch.jit.save(torch.jit.script(Tiny()), buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            zi = zipfile.ZipInfo(info.filename)
            zi.compress_type = zipfile.ZIP_DEFLATED
            with out.open(zi, "w", force_zip64=True) as f:
                if info.filename.endswith("/data/0"):
                    chunk = b"\0" * MiB
                    for _ in range(inflated // MiB):
                        f.write(chunk)
                else:
                    f.write(src.read(info.filename))
    return path


CUSTOM_CODE = """open({marker!r}, "w").write("ran")
from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evilbert"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


def custom_code_text_dir(out: Path, marker: Path, source: Path) -> Path:
    """A copy of a BERT text model directory (``source``) whose config names custom code
    (``auto_map``, an unknown ``model_type``): loading it with remote code trusted writes ``marker``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "evilbert"
    cfg["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel"}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "evil_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    return out


def point_text_tower_at(model_dir: Path, text_dir: Path | str) -> Path:
    """Rewrite a saved model's config.json so that its Hugging Face text tower is ``text_dir``."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["text"]["hf_model"] = str(text_dir)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir


def link_loop_folder(root: Path, image: bytes, links: int = 2) -> Path:
    """One image (with its caption) and ``links`` symbolic links to the folder itself."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.png").write_bytes(image)
    (root / "a.txt").write_text("a red square")
    for i in range(links):
        os.symlink(".", root / f"loop{i}")
    return root


def bad_parts(root: Path, case: str, dim: int = 64, rows: int = 20) -> Path:
    """An embeddings directory of one part whose vectors are damaged: 'truncated' (the .npy cut
    in the middle), 'dim' (32-dim vectors under a 64-dim manifest), 'nan' (a NaN vector),
    'dtype' (int64 vectors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for sub in ("img_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    width = dim // 2 if case == "dim" else dim
    v = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v = v.astype(np.float16)
    if case == "nan":
        v[3] = np.nan
    if case == "dtype":
        v = np.arange(rows * width, dtype=np.int64).reshape(rows, width)
    npy = root / "img_emb" / "img_emb_00000.npy"
    np.save(npy, v)
    if case == "truncated":
        data = npy.read_bytes()
        npy.write_bytes(data[: len(data) // 2])
    pq.write_table(pa.table({"path": [f"/photos/{i}.jpg" for i in range(rows)],
                             "position": pa.array(range(rows), pa.int64())}),
                   root / "metadata" / "metadata_00000.parquet")
    manifest = {"format": "clipforge-embeddings/1", "kind": "image", "model": "nano", "model_fingerprint": "fp",
                "embed_dim": dim, "parts": 1, "part_size": rows, "inputs": rows}
    (root / "embeddings.json").write_text(json.dumps(manifest))
    return root


def odd_zoo() -> dict[str, bytes]:
    """Odd but valid images (16-bit, transparent, EXIF-rotated, palette, CMYK, LA, animated) by file name:
    every reader must decode each to the same RGB pixels."""
    from PIL import Image

    from support.images import encode, exif_rotated_jpeg, odd_valid_images

    ramp = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113).astype(np.uint16)  # 16-bit, up to 65k
    halves = Image.new("RGB", (40, 20), (0, 160, 0))
    halves.paste((0, 0, 200), (20, 0, 40, 20))
    exif = halves.getexif()
    exif[0x0112] = 6
    la = Image.new("LA", (24, 24), (90, 128))
    return {
        **odd_valid_images(),
        "red_clear.png": encode(Image.new("RGBA", (24, 24), (255, 0, 0, 0)), "PNG"),  # invisible red
        "red_half.png": encode(Image.new("RGBA", (24, 24), (255, 0, 0, 128)), "PNG"),
        "ramp16.png": encode(Image.fromarray(ramp), "PNG"),
        "halves_exif.jpg": encode(halves, "JPEG", exif=exif, quality=95),
        "tall_exif.jpg": exif_rotated_jpeg(48, 24),
        "la.png": encode(la, "PNG"),
        "cmyk.tif": encode(Image.new("CMYK", (24, 24), (0, 200, 255, 10)), "TIFF"),
    }

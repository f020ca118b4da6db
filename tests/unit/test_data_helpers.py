"""Builders shared by the data tests (images, tables, shards, a stand-in tokenizer)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T


def fake_tokenize(texts: list[str]) -> torch.Tensor:
    """Caption bytes as ids (0 = padding): reversible, so tests can read captions back."""
    out = torch.zeros(len(texts), 77, dtype=torch.long)
    for i, t in enumerate(texts):
        b = t.encode()[:77]
        out[i, : len(b)] = torch.tensor(list(b), dtype=torch.long)
    return out


def untokenize(tokens: torch.Tensor) -> list[str]:
    return [bytes(row[row > 0].tolist()).decode() for row in tokens]


def random_aug() -> T.Compose:
    """Uses torch's global RNG like real training transforms: exercises per-sample seeding."""
    return T.Compose([T.RandomResizedCrop(8, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def exact() -> T.Compose:
    return T.Compose([T.Resize((8, 8)), T.ToTensor()])


def color(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def image_bytes(i: int, size: int = 24, fmt: str = "PNG", noise: bool = False) -> bytes:
    if noise:
        a = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(a, "RGB")
    else:
        img = Image.new("RGB", (size, size), color(i))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_images(root: Path, n: int, noise: bool = False) -> list[str]:
    """n PNGs ``img/00i.png``; returns the paths relative to ``root``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rel = []
    for i in range(n):
        (root / "img" / f"{i:03d}.png").write_bytes(image_bytes(i, noise=noise))
        rel.append(f"img/{i:03d}.png")
    return rel


def write_csv(root: Path, n: int, noise: bool = False, sep: str = ",", name: str = "data.csv") -> Path:
    rel = write_images(root, n, noise)
    path = root / name
    path.write_text("image" + sep + "caption\n" + "".join(f"{p}{sep}caption {i}\n" for i, p in enumerate(rel)))
    return path


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write_shards(root: Path, n_shards: int, per_shard: int, noise: bool = False) -> str:
    """Shards 000..; sample ids are global (shard * per_shard + j); returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            samples.append((f"{i:06d}", {"png": image_bytes(i, noise=noise), "txt": f"caption {i}".encode()}))
        write_shard(root / f"{s:03d}.tar", samples)
    return str(root / f"{{000..{n_shards - 1:03d}}}.tar")


def ids(batch_tokens: torch.Tensor) -> list[int]:
    return [int(c.split()[1]) for c in untokenize(batch_tokens)]

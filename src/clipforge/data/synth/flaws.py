"""Flaws a web-scale training set has, added to a generated world so that cleaning can be measured.

    flaws = add_flaws("world", FlawConfig(mismatch_rate=0.3, plant=300))
    # world/train_flawed.csv: train.csv with 30% of captions swapped among those rows, plus 300
    #                         near-duplicates of test images (world/planted/*.png) appended
    # world/flaws.json:       which rows were mismatched, and each planted copy's test image and edit

The base world is left as it is (train.csv, world.json and every image keep their bytes): the
flawed training list is a separate file. Mismatched captions are a derangement among the chosen
rows, so no chosen row keeps its own caption. Planted copies take distinct test images, with
the edits of ``data/neardup.py`` in turn (crop, JPEG, resize, flip, jitter, rotation), and keep
the test image's caption, as a re-hosted copy usually does. Pure function of the world and
``seed``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.neardup import KINDS, augment
from clipforge.errors import DataError

FLAWED_CSV = "train_flawed.csv"
FLAWS_JSON = "flaws.json"
PLANTED_DIR = "planted"


@dataclass(frozen=True)
class FlawConfig:
    mismatch_rate: float = 0.0  # fraction of training rows whose caption belongs to another row
    plant: int = 0  # near-duplicates of test images added to the training rows
    kinds: tuple[str, ...] = KINDS  # the edits planted copies cycle through
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.mismatch_rate <= 1:
            raise DataError(f"mismatch rate must be within 0..1, got {self.mismatch_rate}")
        if self.plant < 0:
            raise DataError(f"planted duplicates must be 0 or more, got {self.plant}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise DataError(f"unknown near-duplicate kind(s) {bad or '(none given)'}; known: {', '.join(KINDS)}")


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise DataError(f"{path} not found: flaws need a world generated with --format csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(n) with no fixed point (n >= 2): a shuffled cycle."""
    order = rng.permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def add_flaws(world_dir: str | os.PathLike, cfg: FlawConfig) -> dict[str, Any]:
    """Write ``train_flawed.csv``, the planted images and ``flaws.json`` in a CSV world; return the record."""
    root = Path(world_dir)
    columns, train = _read(root / "train.csv")
    _, test = _read(root / "test.csv")
    rng = np.random.default_rng([cfg.seed, 0x464C4157])  # 'FLAW'
    rows = [dict(r) for r in train]
    n_mis = round(cfg.mismatch_rate * len(rows))
    mismatched = np.sort(rng.choice(len(rows), size=n_mis, replace=False)) if n_mis >= 2 else np.zeros(0, np.int64)
    if len(mismatched):
        perm = _derangement(len(mismatched), rng)
        captions = [train[int(i)]["caption"] for i in mismatched]
        for j, i in enumerate(mismatched):
            rows[int(i)]["caption"] = captions[int(perm[j])]
    if cfg.plant > len(test):
        raise DataError(f"cannot plant {cfg.plant} duplicates of {len(test)} test images")
    chosen = np.sort(rng.choice(len(test), size=cfg.plant, replace=False)) if cfg.plant else []
    planted: list[dict[str, Any]] = []
    (root / PLANTED_DIR).mkdir(exist_ok=True)
    for j, t in enumerate(chosen):
        src = test[int(t)]
        kind = cfg.kinds[j % len(cfg.kinds)]
        copy, params = augment(Image.open(root / src["image"]), kind, np.random.default_rng([cfg.seed, int(t), j]))
        rel = f"{PLANTED_DIR}/{j:06d}.png"
        copy.save(root / rel, "PNG", compress_level=1)
        rows.append({**src, "image": rel})
        planted.append({"train_row": len(rows) - 1, "image": rel, "test_index": int(t), "test_image": src["image"],
                        **params})
    tmp = root / (FLAWED_CSV + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, root / FLAWED_CSV)
    record = {"config": {**asdict(cfg), "kinds": list(cfg.kinds)}, "train_csv": FLAWED_CSV, "base_rows": len(train),
              "rows": len(rows), "mismatched": [int(i) for i in mismatched], "planted": planted}
    tmp = root / (FLAWS_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, root / FLAWS_JSON)
    return record

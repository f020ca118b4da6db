"""Train/test overlap: which test items have a near-duplicate among the training items.

The CLIP paper's Section 5 analysis, on clipforge's own pieces: the training side is searched
through a FAISS index (``search.build``, ``search.searcher``: built from embedding parts, or an
index the user already has), the test side's vectors are the queries (with their mirror images'
vectors too, when given: embeddings are not mirror-invariant), and each test item's ``k``
nearest training items per query are its candidates. The rule is ``calibrate.py``'s: a candidate
at or above ``floor`` is a duplicate when the perceptual check passes (both images readable: the
aligned thumbnails, then the sharper second look) or, when it cannot be checked, when its cosine
passes the embedding threshold.

    found = find_overlap(test, index_dir, calibration, OverlapConfig(k=10))
    found["flagged"], found["overlap_fraction"], found["items"][0]
    # {"test": ".../test/000017.png", "train": ".../planted/000003.png", "cosine": 0.991,
    #  "perceptual": 0.995, "signal": "both"}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from clipforge.hygiene import perceptual as P
from clipforge.hygiene.calibrate import Calibration
from clipforge.hygiene.inputs import VectorSet
from clipforge.search import decode
from clipforge.search.embed import EmbedConfig


@dataclass(frozen=True)
class OverlapConfig:
    k: int = 10  # training candidates per test item and query view
    use_perceptual: bool = True  # the perceptual check (needs readable images: files or shard members)
    batch: int = 2048  # queries per index search call
    progress: bool = True


def open_item(item: dict[str, Any]):
    """The image of an index item or metadata row (``path``: a file, or a WebDataset member
    ``SHARD.tar/KEY.EXT`` with its ``tar_offset`` and ``nbytes``), decoded to RGB as the embedder
    decodes it (``search.decode``: size limits, EXIF orientation), or None where it cannot be read
    (the check then abstains)."""
    path, offset = str(item.get("path", "")), item.get("tar_offset")
    if not path or (offset is None and not Path(path).is_file()):
        return None
    try:
        data = decode.read_bytes(path, offset, item.get("nbytes"))
        return decode.prepare(decode.open_image(data, EmbedConfig.max_image_pixels))
    except decode.UnreadableImage:
        return None


class _Descriptors:
    """Training descriptors computed on demand and remembered (a training image is often a candidate twice)."""

    def __init__(self) -> None:
        self.one: dict[str, np.ndarray | None] = {}

    def of(self, item: dict[str, Any]) -> np.ndarray | None:
        key = str(item.get("path", ""))
        if key not in self.one:
            im = open_item(item)
            self.one[key] = P.descriptor(im) if im is not None else None
        return self.one[key]


def _passes(q, q_views: np.ndarray, train: dict[str, Any], train_desc: np.ndarray, sim: float,
            cal: Calibration) -> bool:
    """The perceptual rule on a readable pair of cosine at or above the floor: thumbnails, then the second look."""
    if sim <= cal.perceptual_threshold:
        return False
    if cal.fine_threshold < 0:
        return True
    other = open_item(train)  # only pairs that passed the thumbnails get here: few, so not cached
    return other is not None and P.fine_similarity(q, other, q_views, train_desc) > cal.fine_threshold


def search_train(queries: np.ndarray, index, k: int, batch: int = 2048,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(scores [n, k], ids [n, k]) of every query's nearest training items."""
    n = len(queries)
    k = max(1, min(k, len(index)))
    scores = np.full((n, k), -np.inf, np.float32)
    ids = np.full((n, k), -1, np.int64)
    with tqdm(total=n, unit="query", desc="search", disable=not progress) as bar:
        for lo in range(0, n, batch):
            s, i = index.search_ids(queries[lo : lo + batch], k)
            scores[lo : lo + len(s)], ids[lo : lo + len(s)] = s, i
            bar.update(len(s))
    return scores, ids


def _merge(scores: np.ndarray, ids: np.ndarray, scores2: np.ndarray, ids2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidates of two query views, each training id once at its best cosine, best first."""
    s, i = np.concatenate([scores, scores2], 1), np.concatenate([ids, ids2], 1)  # [n, 2k]
    order = np.argsort(-s, 1, kind="stable")
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    dup = np.zeros_like(i, bool)
    for c in range(1, i.shape[1]):
        dup[:, c] = (i[:, :c] == i[:, c : c + 1]).any(1)
    return np.where(dup, -np.inf, s).astype(np.float32), np.where(dup, -1, i)


def find_overlap(test: VectorSet, index_dir: str | Path, cal: Calibration, cfg: OverlapConfig,
                 mirrored: np.ndarray | None = None) -> dict[str, Any]:
    """Flagged test items, each with its nearest training duplicate; plus every item's nearest cosine.

    mirrored [n, d]: the test images' mirror-image vectors, a second query view (optional).
    """
    from clipforge.search.searcher import SearchIndex

    index = SearchIndex(index_dir)
    try:
        n_train = len(index)
        scores, ids = search_train(test.vectors, index, cfg.k, cfg.batch, cfg.progress)
        if mirrored is not None:
            scores, ids = _merge(scores, ids, *search_train(mirrored, index, cfg.k, cfg.batch, cfg.progress))
        test_paths, test_where = test.paths, test.locations()
        check_on = cfg.use_perceptual and cal.perceptual_threshold >= 0
        gate = (scores >= min(cal.floor, cal.emb_threshold)) & (ids >= 0)
        rows = np.nonzero(gate.any(1))[0]
        items = index.items(sorted({int(i) for r in rows for i in ids[r][gate[r]]}))
        descs = _Descriptors()
        flagged: list[dict[str, Any]] = []
        dup_train: dict[int, list[str]] = {}
        for r in tqdm(rows, unit="item", desc="verify", disable=not cfg.progress or not len(rows)):
            q = open_item(test_where[r]) if check_on else None
            q_views = P.views(q) if q is not None else None
            best = None
            for s, i, ok in zip(scores[r], ids[r], gate[r]):
                if not ok:
                    continue
                by_emb = bool(s > cal.emb_threshold)
                item = items.get(int(i), {})
                d = descs.of(item) if q_views is not None else None
                sim = float(P.similarity(q_views, d)) if d is not None else None
                if sim is not None:  # both images readable: the pixels decide
                    if not (s >= cal.floor and _passes(q, q_views, item, d, sim, cal)):
                        continue
                    signal = "both" if by_emb else "perceptual"
                elif by_emb:
                    signal = "embedding"
                else:
                    continue
                dup_train.setdefault(int(i), []).append(test_paths[r])
                if best is None:
                    best = {"test": test_paths[r], "test_row": int(r), "train": items.get(int(i), {}).get("path", ""),
                            "train_id": int(i), "cosine": round(float(s), 6),
                            "perceptual": None if sim is None else round(sim, 6), "signal": signal}
            if best is not None:
                flagged.append(best)
    finally:
        index.close()
    n = len(test.vectors)
    mask = np.zeros(n, bool)
    mask[[f["test_row"] for f in flagged]] = True
    by_signal: dict[str, int] = {}
    for f in flagged:
        by_signal[f["signal"]] = by_signal.get(f["signal"], 0) + 1
    return {
        "test_items": n, "train_items": n_train, "flagged": len(flagged),
        "overlap_fraction": len(flagged) / n if n else 0.0, "by_signal": by_signal,
        "threshold": cal.as_dict(), "items": flagged, "flagged_mask": mask, "nearest": scores[:, 0].copy(),
        "train_duplicates": index_items_paths(dup_train, items),
    }


def index_items_paths(dup_train: dict[int, list[str]], items: dict[int, dict]) -> list[dict[str, Any]]:
    """Training items that duplicate a test item: id, path and the test items they copy."""
    return [{"train_id": i, "path": items.get(i, {}).get("path", ""), "duplicates_of": sorted(set(t))}
            for i, t in sorted(dup_train.items())]

"""The near-duplicate rule, calibrated on generated pairs rather than guessed.

Positives: sampled test images and near-duplicates made from them with each edit of
``data/neardup.py`` (crop, JPEG, resize, flip, jitter, rotation). Negatives: the same images
and the candidates a search would hand the check, their ``k`` nearest *other* test images by
embedding, queried as they are and mirrored (a test set holds few copies of itself): look-alikes,
the hardest unrelated images the data offers. The rule, each part set from these pairs:

- a candidate is checked only when its cosine reaches ``floor`` (the lowest cosine, best of the
  plain and mirrored query, that a generated duplicate reached);
- with both images readable, the perceptual check decides (``perceptual.py``): flagged when the
  best aligned thumbnail cosine is above ``perceptual_threshold``, the most permissive value whose
  false-positive rate on the negatives (per query, any candidate) stays at or below ``max_fpr``
  (-1: off), and the sharper second look (``perceptual.fine_similarity``) is above
  ``fine_threshold``;
- otherwise (precomputed vectors, no image files) the embedding decides: flagged when the cosine
  is above ``emb_threshold``, set the same way.

The last check decides at the search's scale: a training side ``search_size`` items large offers
each query about ``search_size / pool`` times the look-alikes the test pool does (pool: the other
test images), so ``fine_threshold`` is the lowest value at which the negative pairs passing the
first checks, counted per query and scaled by that ratio, stay at or below ``max_fpr`` (when the
sample cannot resolve that rate, above every such pair). The recall of every edit under each part
is in the result, so a report states what its detector finds and what it misses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.data.neardup import KINDS, augment
from clipforge.hygiene import perceptual as P


@dataclass
class Calibration:
    emb_threshold: float
    perceptual_threshold: float  # -1: the perceptual check is off
    max_fpr: float | None  # None: the thresholds were given, not calibrated
    floor: float  # candidates below this cosine are not checked
    negatives: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "calibrated"  # or "given" (a threshold passed by the user)
    fine_threshold: float = -1.0  # -1: no second look

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def embed_pil(model, images: Sequence[Image.Image], batch: int = 64) -> np.ndarray:
    """Unit image embeddings [n, E] of in-memory images, with the model's eval transform."""
    from clipforge.model.factory import get_preprocess

    pre = get_preprocess(model)
    model = model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = torch.stack([pre(im.convert("RGB")) for im in images[i : i + batch]])  # [b, 3, S, S]
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def mirrored(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im.convert("RGB").transpose(Image.FLIP_LEFT_RIGHT) for im in images]


def _threshold(neg: np.ndarray, max_fpr: float) -> float:
    """The smallest value that at most ``max_fpr`` of the negatives exceed."""
    if len(neg) == 0:
        return 1.0
    return float(np.quantile(neg, 1.0 - max_fpr, method="higher"))


def _scaled_threshold(neg: np.ndarray, queries: int, ratio: float, max_fpr: float) -> float:
    """The lowest negative value that at most ``max_fpr * queries / ratio`` negative pairs exceed (-1: none to pass)."""
    allowed = int(np.floor(max_fpr * queries / max(ratio, 1e-9) + 1e-9))
    if len(neg) <= allowed:
        return -1.0
    return float(np.sort(neg)[::-1][allowed])


def _topk(sims: np.ndarray, k: int) -> np.ndarray:
    k = min(k, sims.shape[1])
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [m, k] unordered


def calibrate(model, images: Sequence[Image.Image], test_vectors: np.ndarray, rows: np.ndarray,
              open_test: Callable[[int], Image.Image | None] | None, max_fpr: float = 0.01, per_kind: int = 50,
              seed: int = 0, k: int = 10, search_size: int | None = None) -> Calibration:
    """The rule from ``images`` (sampled test images, at test ``rows``) and their edited copies.

    test_vectors [n, d]: every test vector (the negatives' pool). open_test(row): that test image,
    or None when unreadable; None turns the perceptual check off. search_size: training items the
    search covers (default: the test pool's size, no scaling).
    """
    rng = np.random.default_rng([seed, 0x43414C])  # 'CAL'
    orig, flip = embed_pil(model, images), embed_pil(model, mirrored(images))  # [m, d] each
    kinds: dict[str, dict[str, Any]] = {}
    pos_cos, pos_perc, pos_fine = {}, {}, {}
    qviews = [P.views(im) for im in images] if open_test is not None else []
    for kind in KINDS:
        pick = rng.choice(len(images), size=min(per_kind, len(images)), replace=False)
        copies = [augment(images[i], kind, np.random.default_rng([seed, int(i), KINDS.index(kind)]))[0] for i in pick]
        e = embed_pil(model, copies)
        pos_cos[kind] = np.maximum((e * orig[pick]).sum(1), (e * flip[pick]).sum(1))  # [p] best query view
        if open_test is not None:
            descs = [P.descriptor(c) for c in copies]
            pos_perc[kind] = np.array([P.similarity(qviews[i], d) for i, d in zip(pick, descs)])
            pos_fine[kind] = np.array([P.fine_similarity(images[i], c, qviews[i], d)
                                       for i, c, d in zip(pick, copies, descs)])
    floor = float(min(c.min() for c in pos_cos.values()))
    s_orig, s_flip = orig @ test_vectors.T, flip @ test_vectors.T  # [m, n] each
    s_orig[np.arange(len(rows)), rows] = s_flip[np.arange(len(rows)), rows] = -np.inf  # not itself
    sims = np.maximum(s_orig, s_flip)
    # What a search of k neighbours per query view hands the check: up to 2k candidates.
    cand = np.concatenate([_topk(s_orig, k), _topk(s_flip, k)], 1)  # [m, 2k]
    cand_cos = np.take_along_axis(sims, cand, 1)
    neg = cand_cos.max(1)  # [m]
    emb_t = _threshold(neg, max_fpr)
    pool = max(1, len(test_vectors) - 1)
    ratio = (search_size or pool) / pool
    perc_t, fine_t, neg_p, neg_f = -1.0, -1.0, np.zeros(0), np.zeros(0)
    if open_test is not None:
        cache: dict[int, tuple[Image.Image, np.ndarray] | None] = {}

        def opened(i: int) -> tuple[Image.Image, np.ndarray] | None:
            if i not in cache:
                im = open_test(i)
                cache[i] = None if im is None else (im, P.descriptor(im))
            return cache[i]

        neg_p = np.full(len(rows), -1.0)
        pairs = []  # [(query, (candidate, its descriptor), coarse similarity)] of every checked negative pair
        for j in range(len(rows)):
            ids = np.unique(cand[j])  # a candidate both query views found is one pair
            got = [(int(i), o) for i, c in zip(ids, sims[j, ids]) if c >= floor and (o := opened(int(i))) is not None]
            if got:
                ps = P.similarity(qviews[j], np.stack([o[1] for _, o in got]))
                neg_p[j] = float(ps.max())
                pairs.extend((j, o, float(p)) for (_, o), p in zip(got, ps))
        perc_t = _threshold(neg_p, max_fpr)
        neg_f = np.array([P.fine_similarity(images[j], im, qviews[j], d) for j, (im, d), p in pairs if p > perc_t])
        fine_t = _scaled_threshold(neg_f, len(rows), ratio, max_fpr)
    for kind in KINDS:
        c = pos_cos[kind]
        entry: dict[str, Any] = {"pairs": len(c), "emb_recall": float(np.mean(c > emb_t)),
                                 "cosine_p05": float(np.quantile(c, 0.05)), "cosine_median": float(np.median(c))}
        if kind in pos_perc:
            p, f = pos_perc[kind], pos_fine[kind]
            entry.update(perceptual_recall=float(np.mean((p > perc_t) & (f > fine_t) & (c >= floor))),
                         perceptual_p05=float(np.quantile(p, 0.05)), perceptual_median=float(np.median(p)),
                         fine_p05=float(np.quantile(f, 0.05)), fine_median=float(np.median(f)))
        kinds[kind] = entry
    negatives = {"queries": len(neg), "candidates_per_query": int(cand.shape[1]),
                 "emb_fpr": float(np.mean(neg > emb_t)) if len(neg) else 0.0,
                 "cosine_median": float(np.median(neg)) if len(neg) else None,
                 "perceptual_fpr": float(np.mean(neg_p > perc_t)) if len(neg_p) else None,
                 "perceptual_median": float(np.median(neg_p[neg_p > -1])) if (neg_p > -1).any() else None,
                 "pool": pool, "search_size": search_size or pool, "fine_pairs": len(neg_f),
                 # Expected flags per clean query at the search's scale; the floor is the sample's resolution.
                 "fine_fpr_at_search_scale": float(ratio * np.sum(neg_f > fine_t) / len(rows)) if len(rows) else None,
                 "fine_fpr_resolution": float(ratio / len(rows)) if len(rows) else None}
    return Calibration(emb_t, perc_t, max_fpr, floor, negatives, kinds, fine_threshold=fine_t)


def given(threshold: float, perceptual_threshold: float = -1.0) -> Calibration:
    """A threshold the user chose (no model or images to calibrate with)."""
    return Calibration(float(threshold), float(perceptual_threshold), None, float(threshold), source="given")

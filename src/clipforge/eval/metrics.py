"""Evaluation metrics as pure functions: tensors in, numbers out, no I/O and no model.

Tie rule, used everywhere here: among equal scores the lower index ranks first, as
``argmax`` and a stable descending sort order them. Top-1 accuracy therefore always equals
the confusion matrix's diagonal, and results do not depend on the backend's ``topk``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "target_rank",
    "topk_accuracy",
    "confusion_matrix",
    "per_class_recall",
    "mean_per_class_recall",
    "classification_metrics",
    "retrieval_metrics",
]


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column: 0 means the target scored highest.

    scores [N, C], targets [N] -> LongTensor [N]. Ties break towards the lower column index.
    """
    targets = targets.to(scores.device).long()
    target_score = scores.gather(1, targets[:, None])  # [N, 1]
    cols = torch.arange(scores.shape[1], device=scores.device)[None, :]  # [1, C]
    ahead = (scores > target_score) | ((scores == target_score) & (cols < targets[:, None]))  # [N, C]
    return ahead.sum(dim=1)


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose target is among the ``k`` highest scores."""
    if scores.shape[0] == 0:
        return float("nan")
    return (target_rank(scores, targets) < k).float().mean().item()


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """LongTensor [C, C]: rows are true classes, columns predicted classes."""
    idx = targets.long().cpu() * num_classes + preds.long().cpu()  # [N]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_recall(confusion: torch.Tensor) -> list[float | None]:
    """Recall of each true class; ``None`` for a class with no samples (its recall is undefined)."""
    support = confusion.sum(dim=1)
    diag = confusion.diagonal()
    return [None if s == 0 else float(d) / float(s) for d, s in zip(diag.tolist(), support.tolist())]


def mean_per_class_recall(confusion: torch.Tensor) -> float:
    """Mean recall over the classes that have samples (balanced accuracy, as scikit-learn computes it)."""
    recalls = [r for r in per_class_recall(confusion) if r is not None]
    return float(np.mean(recalls)) if recalls else float("nan")


def classification_metrics(
    scores: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None
) -> dict[str, object]:
    """Top-1, top-5 (only with at least 5 classes), mean per-class recall and the confusion matrix.

    scores [N, C] (logits or similarities), targets [N] in [0, C).
    """
    num_classes = num_classes or scores.shape[1]
    ranks = target_rank(scores, targets)  # [N]
    preds = scores.argmax(dim=1)  # [N], first index among ties, consistent with target_rank
    conf = confusion_matrix(preds, targets, num_classes)
    out: dict[str, object] = {"acc1": (ranks < 1).float().mean().item() if len(ranks) else float("nan")}
    if num_classes >= 5:
        out["acc5"] = (ranks < 5).float().mean().item() if len(ranks) else float("nan")
    out["mean_per_class_recall"] = mean_per_class_recall(conf)
    out["per_class_recall"] = per_class_recall(conf)
    out["confusion_matrix"] = conf.tolist()
    out["num_samples"] = int(targets.shape[0])
    return out


# -- retrieval ---------------------------------------------------------------------------


def _text_to_image_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each caption, 0-based rank of its image among all images (one positive per caption)."""
    ranks = []
    for s in range(0, txt.shape[0], chunk):
        sims = txt[s : s + chunk] @ img.T  # [t, I]
        ranks.append(target_rank(sims, t2i[s : s + chunk]))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def _image_to_text_ranks(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each image with captions, 0-based rank of its best-ranked caption among all captions."""
    cols = torch.arange(txt.shape[0], device=txt.device)[None, :]  # [1, T]
    ranks = []
    for s in range(0, img.shape[0], chunk):
        sims = img[s : s + chunk] @ txt.T  # [i, T]
        rows = torch.arange(s, s + sims.shape[0], device=txt.device)[:, None]  # [i, 1]
        positive = t2i[None, :] == rows  # [i, T]
        has_pos = positive.any(dim=1)  # [i]
        best = sims.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values  # [i, 1]
        # The best positive is the first positive column holding the best score (the tie rule);
        # argmax returns the first maximum, and a uint8 mask keeps this temporary small.
        first = (positive & (sims == best)).to(torch.uint8).argmax(dim=1, keepdim=True)  # [i, 1]
        ahead = (sims > best) | ((sims == best) & (cols < first))  # [i, T]
        ranks.append(ahead.sum(dim=1)[has_pos])
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def _rank_summary(prefix: str, ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    r = ranks.cpu().numpy()
    for k in ks:
        out[f"{prefix}_recall@{k}"] = float((r < k).mean()) if len(r) else float("nan")
    out[f"{prefix}_mean_rank"] = float((r + 1).mean()) if len(r) else float("nan")  # 1-based
    out[f"{prefix}_median_rank"] = float(np.median(r + 1)) if len(r) else float("nan")
    return out


@torch.no_grad()
def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 512,
) -> dict[str, float]:
    """Recall@K and mean/median rank for both directions, in CLIP_benchmark's naming.

    image_features [I, E], text_features [T, E] (normalised here; cosine similarity), and
    text_to_image [T]: the index of each caption's image, so an image may own several captions.

    - ``image_retrieval_*``: text -> image; each caption retrieves among all images, its own is the
      one positive.
    - ``text_retrieval_*``: image -> text; a query is a hit at K if *any* of its captions is in the
      top K (the best-ranked positive counts). Images without captions are left out.

    Similarities are computed ``chunk_size`` queries at a time, so peak memory is a few
    ``chunk_size x max(I, T)`` blocks (float32 scores plus boolean masks) rather than ``I x T``:
    about 0.5 GB for 100k x 100k at the default chunk. Ranks are reported 1-based.
    """
    img = F.normalize(image_features.float(), dim=-1)  # [I, E]
    txt = F.normalize(text_features.float(), dim=-1)  # [T, E]
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=txt.device)  # [T]
    if t2i.shape[0] != txt.shape[0]:
        raise ValueError(f"text_to_image has {t2i.shape[0]} entries for {txt.shape[0]} captions")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= img.shape[0]):
        raise ValueError(f"text_to_image holds indices outside [0, {img.shape[0]})")
    img = img.to(txt.device)
    out = _rank_summary("image_retrieval", _text_to_image_ranks(img, txt, t2i, chunk_size), ks)
    out.update(_rank_summary("text_retrieval", _image_to_text_ranks(img, txt, t2i, chunk_size), ks))
    out["num_images"] = int(img.shape[0])
    out["num_texts"] = int(txt.shape[0])
    return out

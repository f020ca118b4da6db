"""Image-text retrieval: recall@K both ways, with several captions per image.

Naming follows CLIP_benchmark: ``image_retrieval_recall@K`` is text -> image (a caption finds
its image), ``text_retrieval_recall@K`` is image -> text (an image finds any of its captions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from clipforge.errors import DataError
from clipforge.eval.datasets import CaptionedImages
from clipforge.eval.features import FeatureOptions, Tokenizer, extract_image_features, extract_text_features
from clipforge.eval.metrics import retrieval_metrics

__all__ = ["retrieval_metrics", "evaluate_retrieval"]


def evaluate_retrieval(
    model: nn.Module,
    data: CaptionedImages,
    options: FeatureOptions = FeatureOptions(),
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Tokenizer | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 512,
) -> dict[str, Any]:
    """Encode the images and captions of ``data`` and compute :func:`retrieval_metrics`.

    Captions of an unreadable image are dropped with it (they have nothing to retrieve).
    """
    feats = extract_image_features(model, data.image_paths, preprocess, replace(options, project=True))
    if feats.features.shape[0] == 0:
        raise DataError(f"{data.name}: none of the {len(data.image_paths)} images could be read")
    # Re-index captions onto the readable images only.
    new_index = torch.full((len(data.image_paths),), -1, dtype=torch.long)
    new_index[feats.index] = torch.arange(len(feats.index))
    t2i = new_index[torch.tensor(data.text_to_image, dtype=torch.long)]  # [T], -1 where the image failed
    keep = (t2i >= 0).nonzero().squeeze(1).tolist()
    captions = [data.captions[j] for j in keep]
    text = extract_text_features(model, captions, options, tokenizer)  # [T', E]
    scores = retrieval_metrics(feats.features, text, t2i[keep], ks=ks, chunk_size=chunk_size)
    return {
        "metrics": scores | {"num_failed_images": feats.num_failed},
        "details": {"failed_images": feats.failed, "dropped_captions": len(data.captions) - len(keep)},
    }

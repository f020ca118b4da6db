"""CoCa's objective (Yu et al. 2022): CLIP's contrastive loss plus a captioning loss, the
cross-entropy of each next text token under the decoder, padding skipped; weighted as OpenCLIP's
``CoCaLoss`` weighs them (its training defaults: contrastive 1, caption 2).

``coca_loss`` is the whole objective on one process's batch. The trainer (``TrainStep``) adds
``caption_loss`` to its ``ContrastiveLoss``, which gathers features across ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from clipforge.train.loss import clip_loss


class CocaLosses(NamedTuple):
    contrastive: torch.Tensor  # weighted; 0 when its weight is 0
    caption: torch.Tensor  # weighted

    @property
    def total(self) -> torch.Tensor:
        return self.contrastive + self.caption


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Mean cross-entropy of ``labels`` [B, L] under ``logits`` [B, L, V] over the non-padding labels."""
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=pad_id)


def coca_loss(image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
              labels: torch.Tensor, logit_scale: torch.Tensor, *, caption_weight: float = 2.0,
              contrastive_weight: float = 1.0, pad_id: int = 0) -> CocaLosses:
    """The two weighted terms from ``CLIP.caption_forward``'s output (L2-normalised features,
    teacher-forced logits and their labels, the exp'd logit scale)."""
    if contrastive_weight:
        contrastive = contrastive_weight * clip_loss(image_features, text_features, logit_scale)
    else:  # no [N, N] logits at all: a captioning-only run
        contrastive = torch.zeros((), device=logits.device)
    return CocaLosses(contrastive, caption_weight * caption_loss(logits, labels, pad_id))

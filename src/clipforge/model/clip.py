"""The CLIP dual encoder: an image tower, a text tower and a learned temperature.

No loss lives here (see ``clipforge.train.loss``); ``forward`` returns what a loss needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ClipConfig
from clipforge.model.hf_text import HFTextTower
from clipforge.model.siglip_vision import SiglipVisionTower
from clipforge.model.text import TextTransformer
from clipforge.model.timm_vision import TimmVisionTower
from clipforge.model.vision import ModifiedResNet, VisionTransformer


class ClipOutput(NamedTuple):
    image_features: torch.Tensor  # [B, E], L2-normalised
    text_features: torch.Tensor  # [B, E], L2-normalised
    logit_scale: torch.Tensor  # scalar, exp(learned log-scale), clamped at 100
    logit_bias: torch.Tensor | None  # scalar for SigLIP-style training, else None


class CLIP(nn.Module):
    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.vision.arch == "vit":
            self.visual: nn.Module = VisionTransformer(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        elif cfg.vision.arch == "timm":  # timm's network; quick_gelu concerns only the text tower, as in OpenCLIP
            self.visual = TimmVisionTower(cfg.vision, cfg.embed_dim)
        elif cfg.vision.arch == "siglip":  # Hugging Face SigLIP's ViT with attention pooling
            self.visual = SiglipVisionTower(cfg.vision, cfg.embed_dim)
        else:
            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim)
        if cfg.text.hf_model is not None:  # a Hugging Face encoder, random weights until filled
            self.text: nn.Module = HFTextTower(cfg.text, cfg.embed_dim)
        else:
            self.text = TextTransformer(cfg.text, cfg.embed_dim, cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.init_logit_bias is not None else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, image: torch.Tensor, normalize: bool = False, project: bool = True) -> torch.Tensor:
        """Image features [B, E] (or pre-projection [B, W] with ``project=False``)."""
        x = self.visual(image.to(self.dtype), project=project)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, project: bool = True) -> torch.Tensor:
        """Text features [B, E] from token ids [B, <=context_length]."""
        x = self.text(tokens, project=project)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100 as in the CLIP paper (the raw parameter is untouched).
        A model with a logit bias (SigLIP) is not clamped: its scale is learned past 100."""
        scale = self.logit_scale.exp()
        return scale if self.logit_bias is not None else scale.clamp(max=100.0)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> ClipOutput:
        return ClipOutput(
            self.encode_image(image, normalize=True),
            self.encode_text(text, normalize=True),
            self.scale(),
            self.logit_bias,
        )

    @torch.no_grad()
    def logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image [B_img, B_txt], logits_per_text), as openai/CLIP's forward returns
        (plus the logit bias of a SigLIP model, as its sigmoid is applied to)."""
        out = self.forward(image, text)
        logits_per_image = out.logit_scale * out.image_features @ out.text_features.t()
        if out.logit_bias is not None:
            logits_per_image = logits_per_image + out.logit_bias
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

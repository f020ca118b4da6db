"""The CLIP dual encoder: an image tower, a text tower and a learned temperature; with
``ClipConfig.decoder``, also CoCa's captioning decoder (``text_decoder``, ``clipforge.model.coca``).

No loss lives here (see ``clipforge.train.loss``); ``forward`` returns what a loss needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ClipConfig
from clipforge.model import coca
from clipforge.model.hf_text import HFTextTower
from clipforge.model.naflex import NaFlexBatch
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
        self.text_decoder = (
            coca.MultimodalDecoder(cfg.decoder, cfg.text.vocab_size, cfg.quick_gelu) if cfg.decoder else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, image: torch.Tensor | NaFlexBatch, normalize: bool = False,
                     project: bool = True) -> torch.Tensor:
        """Image features [B, E] (or pre-projection [B, W] with ``project=False``) of images
        [B, 3, S, S], or of a SigLIP 2 model's NaFlex batch (``clipforge.model.naflex``)."""
        x = self.visual(image if isinstance(image, NaFlexBatch) else image.to(self.dtype), project=project)
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

    def forward(self, image: torch.Tensor, text: torch.Tensor,
                caption: bool = False) -> ClipOutput | coca.CaptionOutput:
        """Features for the contrastive loss; with ``caption`` (a CoCa model) also the teacher-forced
        caption logits (``caption_forward``), through ``forward`` so DDP/FSDP wrappers see the call."""
        if caption:
            return self.caption_forward(image, text)
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

    # -- CoCa (a model with a captioning decoder) ---------------------------------------------------
    def caption_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, L, vocab] of ``text`` [B, L] given ``image`` (``coca.caption_logits``)."""
        return coca.caption_logits(self, image, text)

    def caption_forward(self, image: torch.Tensor, text: torch.Tensor) -> coca.CaptionOutput:
        """Features and teacher-forced caption logits, as OpenCLIP's CoCa forward returns them."""
        return coca.caption_forward(self, image, text)

    def generate(self, image: torch.Tensor, max_len: int = 30, min_len: int = 5, **kwargs) -> torch.Tensor:
        """Greedy captions as token ids [B, <= max_len] (``coca.generate``; decode with the tokenizer)."""
        return coca.generate(self, image, max_len, min_len, **kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)
        if self.text_decoder is not None:
            self.text_decoder.grad_checkpointing = enable

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

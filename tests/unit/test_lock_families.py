"""Locking a tower (LiT, ``--lock-image`` / ``--lock-text``) works for every tower kind: timm
trunks by timm's layer groups, SigLIP's ViT by its blocks, and a text tower without projection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipforge.config import ClipConfig, TextConfig, VisionConfig
from clipforge.model.clip import CLIP
from clipforge.train.freeze import lock_tower

TEXT = TextConfig(context_length=16, vocab_size=100, width=32, heads=2, layers=2)


def _model(vision: VisionConfig, text: TextConfig = TEXT, embed_dim: int = 16) -> CLIP:
    torch.manual_seed(0)
    return CLIP(ClipConfig(embed_dim=embed_dim, vision=vision, text=text))


def _trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("vision", [
    VisionConfig(arch="timm", timm_model_name="convnext_atto", image_size=64),
    VisionConfig(arch="siglip", image_size=32, patch_size=8, width=16, layers=2, heads=2),
], ids=["timm-convnext", "siglip"])
def test_image_tower_locks_fully_and_by_groups(vision):
    model = _model(vision)
    frozen = lock_tower(model, "image")
    assert frozen == [model.visual] and not _trainable(model.visual)
    assert _trainable(model.text)  # the other tower is untouched
    model = _model(vision)
    frozen = lock_tower(model, "image", unlocked_layers=1)
    trainable = _trainable(model.visual)
    assert trainable and trainable != {n for n, _ in model.visual.named_parameters()}
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    head = "head." if vision.arch == "timm" else "attn_pool."
    assert any(n.startswith(head) for n in trainable)  # the head into the shared space learns
    model.encode_image(torch.randn(2, 3, vision.image_size, vision.image_size)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.visual.parameters())


def test_text_tower_without_projection_locks():
    text = dataclasses.replace(TEXT, width=16, proj_type="none")
    model = _model(VisionConfig(image_size=32, patch_size=16, width=64, layers=1), text)
    assert getattr(model.text, "text_projection", None) is None
    lock_tower(model, "text", unlocked_layers=1)
    trainable = _trainable(model.text)
    assert trainable and all(n.startswith(("transformer.resblocks.1.", "ln_final.")) for n in trainable)

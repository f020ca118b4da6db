"""LiT-style locking: freeze a tower, optionally keeping its last blocks trainable.

``unlocked_layers=N`` keeps the last N transformer blocks (ViT / text) or ResNet stages
trainable, together with the tower's head (final norm + projection / attention pool);
``N=0`` freezes the whole tower. Locked modules are also put in eval mode by
``set_locked_eval`` so a frozen ResNet keeps its BatchNorm statistics (and a frozen
Hugging Face encoder runs without dropout).

A Hugging Face text tower is a pretrained encoder plus a projection (``text_projection``, or
OpenCLIP's ``proj``), which starts random: locking it freezes the encoder (all but its last N
layers) and keeps the projection trainable, so the frozen features are mapped into the shared
space by a learned layer (LiT with a pretrained text encoder), not a random one.
"""

from __future__ import annotations

from torch import nn

from clipforge.model.clip import CLIP
from clipforge.model.hf_text import HFTextTower
from clipforge.model.siglip_vision import SiglipVisionTower
from clipforge.model.text import TextTransformer
from clipforge.model.timm_vision import TimmVisionTower
from clipforge.model.vision import ModifiedResNet, VisionTransformer


def _blocks_and_head(tower: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    if isinstance(tower, VisionTransformer):
        return list(tower.transformer.resblocks), [tower.ln_post]
    if isinstance(tower, TextTransformer):
        return list(tower.transformer.resblocks), [tower.ln_final]
    if isinstance(tower, ModifiedResNet):
        return [tower.layer1, tower.layer2, tower.layer3, tower.layer4], [tower.attnpool]
    if isinstance(tower, SiglipVisionTower):
        return list(tower.transformer.resblocks), [tower.ln_post, tower.attn_pool]
    if isinstance(tower, TimmVisionTower):  # timm's own layer groups; the head maps into the shared space
        return tower.blocks(), [tower.head]
    if isinstance(tower, HFTextTower):
        return tower.blocks(), []
    raise TypeError(f"cannot lock a tower of type {type(tower).__name__}")


# Parameters outside any block that stay trainable with unlocked layers (absent ones are skipped:
# a text tower without projection, proj_type 'none').
_HEAD_PARAMS = {VisionTransformer: ("proj",), TextTransformer: ("text_projection",), ModifiedResNet: (),
                HFTextTower: ("text_projection", "proj"), SiglipVisionTower: (), TimmVisionTower: ()}


def lock_tower(model: CLIP, tower: str, unlocked_layers: int = 0) -> list[nn.Module]:
    """Freeze ``model.visual`` (tower='image') or ``model.text`` (tower='text').

    Returns the fully frozen sub-modules (to be kept in eval mode while training).
    """
    module = {"image": model.visual, "text": model.text}[tower]
    blocks, head = _blocks_and_head(module)
    if unlocked_layers > len(blocks):
        raise ValueError(f"the {tower} tower has {len(blocks)} blocks; cannot keep {unlocked_layers} unlocked")
    for p in module.parameters():
        p.requires_grad_(False)
    if isinstance(module, HFTextTower):  # the encoder is locked, its new projection learns
        for p in module.projection_parameters():
            p.requires_grad_(True)
        if unlocked_layers == 0:
            return [module.model]
    if unlocked_layers == 0:
        return [module]
    trainable = blocks[len(blocks) - unlocked_layers:] + head
    for m in trainable:
        for p in m.parameters():
            p.requires_grad_(True)
    for name in _HEAD_PARAMS[type(module)]:
        part = getattr(module, name, None)
        if part is not None:
            part.requires_grad_(True)
    return [b for b in blocks[: len(blocks) - unlocked_layers]]


def set_locked_eval(locked: list[nn.Module]) -> None:
    """Call after ``model.train()``: frozen parts compute as at inference (BatchNorm stats fixed)."""
    for m in locked:
        m.eval()

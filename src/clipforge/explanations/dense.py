"""Dense patch embeddings: every image position carried into the joint embedding space, so
that its cosine with a text (or image) embedding says how much that position looks like it.

The rule, per tower, follows MaskCLIP (Zhou et al. 2022, "Extract Free Dense Labels from CLIP"):
a position goes through what the pooled vector goes through, as if it were the only thing to pool.

- ``VisionTransformer``: the class token's output is what CLIP trained, and patch tokens after the
  last block are not. The last block is run as ClearCLIP does (Lan et al. 2024, "ClearCLIP:
  Decomposing CLIP Representations for Dense Vision-Language Inference"): its attention with
  query-query similarities (each token attends to tokens like itself, not to the few the class
  token reads), and without the residual stream and the MLP, whose global content swamps local
  detail; then ``ln_post`` and ``proj``. On the data world's pointing game this places the maximum
  on the named object several times as often as MaskCLIP's value path with the residual kept
  (benchmarks/explain). With an attentional pooler (CoCa) each token is pooled alone: over one key,
  attention is the value path exactly.
- ``ModifiedResNet``: the attention pool's value and output projections at every position (its
  positional embedding added), which is what the pooled query averages.
- ``SiglipVisionTower`` and timm towers: each token, or each feature-map cell, is pooled on its own
  by the tower's own head (attention over one key, or an average of one), then projected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ClipforgeError
from clipforge.model.siglip_vision import SiglipVisionTower
from clipforge.model.timm_vision import TimmVisionTower
from clipforge.model.vision import ModifiedResNet, VisionTransformer


def dense_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, S, S] -> per-position embeddings [B, h, w, E] (unnormalised)."""
    if isinstance(visual, VisionTransformer):
        return _vit(visual, images)
    if isinstance(visual, ModifiedResNet):
        return _resnet(visual, images)
    if isinstance(visual, SiglipVisionTower):
        return _siglip(visual, images)
    if isinstance(visual, TimmVisionTower):
        return _timm(visual, images)
    raise ClipforgeError(f"dense maps are not implemented for {type(visual).__name__} image towers")


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, C] patch tokens of a square grid -> [B, g, g, C]."""
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ClipforgeError(f"{n} patch tokens do not form a square grid")
    return tokens.reshape(b, g, g, c)


def _vit(v: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    x = v._embed(images.to(v.proj.dtype))
    blocks = v.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    b, n, d = x.shape
    h = last.ln_1(x)
    heads, dh = last.attn.heads, d // last.attn.heads
    w, bias = last.attn.in_proj_weight, last.attn.in_proj_bias
    q = F.linear(h, w[:d], bias[:d]).view(b, n, heads, dh).transpose(1, 2)  # [B, H, N, Dh]
    v_ = F.linear(h, w[2 * d:], bias[2 * d:]).view(b, n, heads, dh).transpose(1, 2)
    mixed = F.scaled_dot_product_attention(q, q, v_)  # query-query attention: each token's own neighbourhood
    x = last.ls_1(last.attn.out_proj(mixed.transpose(1, 2).reshape(b, n, d)))  # no residual, no MLP
    patches = x[:, 1:]  # [B, N, W]
    b, n, w_ = patches.shape
    if v.attn_pool is not None:
        pooled = v.ln_post(v.attn_pool(patches.reshape(b * n, 1, w_)))  # [B*N, Q, E]
        out = pooled[:, 0] if v.pool == "cls" else pooled[:, 1:].mean(dim=1)
        return token_grid((out @ v.proj).reshape(b, n, -1))
    return token_grid(v.ln_post(patches) @ v.proj)


def _resnet(r: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    fmap = resnet_features(r, images)  # [B, C, h, w]
    pool = r.attnpool
    b, c, h, w = fmap.shape
    x = fmap.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(fmap.dtype)  # [B, hw, C]
    return pool.c_proj(pool.v_proj(x)).reshape(b, h, w, -1)


def resnet_features(r: ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    """The last stage's feature map [B, C, h, w] (what the attention pool reads; Grad-CAM's layer)."""
    x = images.to(r.conv1.weight.dtype)
    x = r.relu1(r.bn1(r.conv1(x)))
    x = r.relu2(r.bn2(r.conv2(x)))
    x = r.avgpool(r.relu3(r.bn3(r.conv3(x))))
    return r.layer4(r.layer3(r.layer2(r.layer1(x))))


def _siglip(s: SiglipVisionTower, images: torch.Tensor) -> torch.Tensor:
    tokens = siglip_tokens(s, images)  # [B, N, W]
    b, n, w = tokens.shape
    return token_grid(s.attn_pool(tokens.reshape(b * n, 1, w)).reshape(b, n, -1))


def siglip_tokens(s: SiglipVisionTower, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens after the final LayerNorm [B, N, W]: what the attention-pool head reads."""
    x = s.conv1(images.to(s.conv1.weight.dtype)).flatten(2).transpose(1, 2)
    return s.ln_post(s.transformer(x + s.positional_embedding.to(x.dtype)))


def timm_layout(t: TimmVisionTower, feats: torch.Tensor) -> str:
    """How ``trunk.forward_features`` laid out its output: 'nchw' (CNNs), 'nhwc' (Swin) or
    'tokens' ([B, N, C] with the trunk's prefix tokens first)."""
    c = t.trunk.num_features
    if feats.ndim == 3:
        return "tokens"
    if feats.ndim == 4 and feats.shape[1] == c:
        return "nchw"
    if feats.ndim == 4 and feats.shape[-1] == c:
        return "nhwc"
    raise ClipforgeError(f"timm model {t.cfg.timm_model_name}: unrecognised feature shape {tuple(feats.shape)}")


def timm_grid(t: TimmVisionTower, feats: torch.Tensor) -> torch.Tensor:
    """Features of each image position [B, h, w, C], whatever the trunk's layout."""
    layout = timm_layout(t, feats)
    if layout == "nchw":
        return feats.permute(0, 2, 3, 1)
    if layout == "nhwc":
        return feats
    return token_grid(feats[:, getattr(t.trunk, "num_prefix_tokens", 0):])


def _timm(t: TimmVisionTower, images: torch.Tensor) -> torch.Tensor:
    if getattr(t.head, "pool", None) is not None:
        raise ClipforgeError(f"dense maps are not available for timm model {t.cfg.timm_model_name}: its "
                             "attention-pool head has positions for the whole map; use gradcam")
    feats = t.trunk.forward_features(images)
    grid = timm_grid(t, feats)  # [B, h, w, C]
    b, h, w, c = grid.shape
    cells = grid.reshape(b * h * w, c)
    layout = timm_layout(t, feats)
    if layout == "nchw":
        one = cells[:, :, None, None]
    elif layout == "nhwc":
        one = cells[:, None, None, :]
    else:  # the cell stands in for every token, the prefix ones too: each pooling rule then returns it
        one = cells[:, None, :].expand(-1, getattr(t.trunk, "num_prefix_tokens", 0) + 1, -1)
    return t.head(t.trunk.forward_head(one)).reshape(b, h, w, -1)

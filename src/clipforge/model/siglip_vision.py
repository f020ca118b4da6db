"""SigLIP's image tower (``VisionConfig.arch='siglip'``), as Hugging Face's SiglipVisionModel and
Siglip2VisionModel compute it at a fixed square resolution.

A ViT without class token: patch embedding (a strided conv with a bias), learned positions, pre-LN
blocks (LayerNorm eps 1e-6, GELU's tanh approximation, as both SigLIPs were trained), a final
LayerNorm, then multihead attention pooling (MAP, Zhai et al. 2022): one learned query (``probe``)
attends over the patch tokens, and its output goes through a LayerNorm'd MLP with a residual. The
pooled vector is the image embedding; there is no projection, so ``embed_dim`` is the width.

SigLIP 2 embeds patches with a linear layer on flattened (row, column, channel) patches, which is
the same map as the conv here with its weight reordered (``interop.hf_siglip`` converts). At its
native grid its position table is used as is; NaFlex inputs (``model.naflex``: other aspect ratios
and patch counts) resize the table to each image's grid and mask the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import VisionConfig
from clipforge.model.layers import LayerNorm, Mlp, Transformer, attend
from clipforge.model.naflex import NaFlexBatch, patch_weight, resized_positions

NORM_EPS = 1e-6
GELU_APPROXIMATE = "tanh"


class AttentionPoolHead(nn.Module):
    """Pools [B, N, W] tokens to [B, W] with one learned query. Names follow nn.MultiheadAttention
    (``attn.in_proj_weight`` ...), as Hugging Face's head stores them."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.attn.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        self.norm = LayerNorm(width, eps=NORM_EPS)
        self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu=False, gelu_approximate=GELU_APPROXIMATE)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, W] -> [B, W]; ``mask`` [B, N] (True: a token to pool over) leaves padding out."""
        b, n, d = x.shape
        dh = d // self.heads
        w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(self.probe.to(x.dtype), w[:d], bias[:d]).view(1, 1, self.heads, dh).transpose(1, 2)
        kv = F.linear(x, w[d:], bias[d:]).view(b, n, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # [2, B, H, N, Dh]
        keys = None if mask is None else mask.view(b, 1, 1, n)
        out = attend(q.expand(b, -1, -1, -1), kv[0], kv[1], mask=keys)  # [B, H, 1, Dh]
        out = self.attn.out_proj(out.transpose(1, 2).reshape(b, d))  # [B, W]
        return out + self.mlp(self.norm(out))


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        width, p = cfg.width, cfg.patch_size
        if output_dim != width:
            raise ValueError(f"SigLIP's image tower outputs its width {width} unprojected, "
                             f"but the embedding size is {output_dim}")
        self.image_size = cfg.image_size
        self.grid = cfg.image_size // p
        heads = cfg.heads or width // 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=p, stride=p, bias=True)
        self.positional_embedding = nn.Parameter(torch.randn(self.grid**2, width) * width**-0.5)
        self.transformer = Transformer(width, cfg.layers, heads, cfg.mlp_ratio, quick_gelu=False,
                                       norm_eps=NORM_EPS, gelu_approximate=GELU_APPROXIMATE)
        self.ln_post = LayerNorm(width, eps=NORM_EPS)
        self.attn_pool = AttentionPoolHead(width, heads, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor | NaFlexBatch, project: bool = True) -> torch.Tensor:
        """Images [B, 3, S, S] at the configured size, or a NaFlex batch (SigLIP 2's variable
        aspect ratios, ``model.naflex``) -> embeddings [B, W] (``project`` changes nothing: the
        pooled vector is the embedding)."""
        if isinstance(x, NaFlexBatch):
            return self._forward_naflex(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, g*g, W]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.transformer(x))  # [B, g*g, W]
        return self.attn_pool(x)

    def _forward_naflex(self, batch: NaFlexBatch) -> torch.Tensor:
        dtype = self.conv1.weight.dtype
        patches, mask = batch.patches.to(dtype), batch.mask.bool()
        if patches.shape[-1] != self.conv1.weight[0].numel():
            raise ValueError(f"expected patches of {self.conv1.weight[0].numel()} values (patch size "
                             f"{self.conv1.kernel_size[0]}), got {patches.shape[-1]}")
        x = F.linear(patches, patch_weight(self.conv1), self.conv1.bias)  # [B, N, W]
        x = x + resized_positions(self.positional_embedding, batch.spatial_shapes, x.shape[1])
        keys = mask[:, None, None, :]  # [B, 1, 1, N]: padding is never attended to
        x = self.ln_post(self.transformer(x, mask=keys))
        return self.attn_pool(x, mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

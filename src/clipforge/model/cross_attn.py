"""Cross-attention for CoCa: queries from one sequence, keys and values from another.

``CrossAttention`` keeps ``nn.MultiheadAttention``'s parameter names, which OpenCLIP's CoCa state
dicts carry: one packed ``in_proj_weight`` when queries and keys have the same width, else separate
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``; always one ``in_proj_bias`` and an
``out_proj``. ``AttentionalPooler`` (learned queries over the ViT's output) and
``CrossAttentionBlock`` (a decoder block attending to image tokens) are built on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.layers import LayerNorm, LayerScale, Mlp, attend


class CrossAttention(nn.Module):
    """Multi-head attention of [B, Nq, D] queries over [B, N, Dk] keys/values -> [B, Nq, D]."""

    def __init__(self, width: int, heads: int, context_width: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        context_width = context_width or width
        self.heads = heads
        self.packed = context_width == width  # as nn.MultiheadAttention decides its layout
        if self.packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(width, width))
            self.k_proj_weight = nn.Parameter(torch.empty(width, context_width))
            self.v_proj_weight = nn.Parameter(torch.empty(width, context_width))
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed:
            return self.in_proj_weight.chunk(3)  # type: ignore[return-value]
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self._weights()
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, nq, d = q.shape
        dh = d // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, H, N, Dh]
            return t.view(t.shape[0], -1, self.heads, dh).transpose(1, 2)

        out = attend(heads(F.linear(q, wq, bq)), heads(F.linear(kv, wk, bk)), heads(F.linear(kv, wv, bv)))
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, d))


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries (LayerNormed) attend over the LayerNormed input tokens:
    [B, N, context_width] -> [B, n_queries, width]. OpenCLIP's names: query, attn, ln_q, ln_k."""

    def __init__(self, width: int, context_width: int, heads: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, width))
        self.attn = CrossAttention(width, heads, context_width)
        self.ln_q = LayerNorm(width)
        self.ln_k = LayerNorm(context_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query).to(x.dtype).expand(x.shape[0], -1, -1)  # the same queries for every image
        return self.attn(q, self.ln_k(x))


class CrossAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x), ln_1_kv(context)), then x + mlp(ln_2(x)), each branch
    optionally scaled by LayerScale (``ls_1``, ``ls_2``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool,
                 ls_init_value: float | None = None) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.ln_1_kv = LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu)
        # Identity keeps the plain block's state dict (no ls_* tensors), as OpenCLIP's does.
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), self.ln_1_kv(context)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))

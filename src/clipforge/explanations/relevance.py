"""Gradient-weighted attention relevance (Chefer, Gur and Wolf 2021, "Generic Attention-model
Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"), for transformer towers.

Every self-attention map A of the image tower is recorded with its gradient with respect to the
score (the image embedding's cosine with the query). Starting from the identity, each block adds
its own contribution: R <- R + mean_heads((grad * A)+) @ R. The pooled output's row of R says how
much each patch token contributed. The pooled row is the class token's (CLS pooling), the average of
the patch rows (average pooling), or the pooling head's own gradient-weighted attention over the
tokens (attention pooling: SigLIP, timm's MAP head).

Attention is recorded without touching the model's code: during the explanation each attention
module computes its softmax explicitly (clipforge's ``Attention`` through a temporary forward, timm's
with ``fused_attn`` off and a hook on its ``attn_drop``), and everything is restored afterwards.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ClipforgeError
from clipforge.model.layers import Attention, take_rows
from clipforge.model.siglip_vision import AttentionPoolHead, SiglipVisionTower
from clipforge.model.timm_vision import TimmVisionTower
from clipforge.model.vision import VisionTransformer

Score = Callable[[torch.Tensor], torch.Tensor]  # image embedding [1, E] -> scores [T]


def supports_relevance(visual: nn.Module) -> bool:
    if isinstance(visual, VisionTransformer):
        return visual.attn_pool is None
    if isinstance(visual, SiglipVisionTower):
        return True
    if isinstance(visual, TimmVisionTower):
        # global self-attention over prefix + patch tokens (not Swin's windows, not a CNN)
        return (hasattr(visual.trunk, "num_prefix_tokens") and bool(_timm_attention(visual))
                and _timm_pool_kind(visual) is not None)
    return False


def relevance_maps(visual: nn.Module, image: torch.Tensor, score: Score, n_queries: int) -> torch.Tensor:
    """Relevance of each patch for each query: [T, g, g] (unnormalised, >= 0) for one image [1, 3, S, S]."""
    if not supports_relevance(visual):
        raise ClipforgeError(f"attention relevance is not available for {type(visual).__name__} image towers "
                             "(it needs a transformer whose attention can be recorded)")
    with _recording(visual) as (attn, pool):
        emb, prefix, pool_kind = _forward(visual, image)
        scores = score(emb)  # [T]
        maps = []
        for t in range(n_queries):
            tensors = attn + ([pool[0]] if pool else [])
            grads = torch.autograd.grad(scores[t], tensors, retain_graph=t < n_queries - 1, allow_unused=True)
            maps.append(_rollout(attn, grads[: len(attn)], pool, grads[len(attn):], prefix, pool_kind))
    out = torch.stack(maps)  # [T, P]
    g = math.isqrt(out.shape[-1])
    return out.reshape(n_queries, g, g)


def _weigh(a: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
    """mean over heads of (grad * A)+, for the first image: [N, N] (or [Nq, N])."""
    if g is None:
        return torch.zeros_like(a[0, 0])
    return (g[0] * a[0]).clamp(min=0).mean(dim=0)


def _rollout(attn: list[torch.Tensor], grads, pool: list[torch.Tensor], pool_grads, prefix: int,
             pool_kind: str) -> torch.Tensor:
    n = attn[0].shape[-1]
    r = torch.eye(n, dtype=torch.float32, device=attn[0].device)
    for a, g in zip(attn, grads):
        r = r + _weigh(a.detach().float(), None if g is None else g.float()) @ r
    if pool_kind == "cls":
        row = r[0]
    elif pool_kind == "avg":
        row = r[prefix:].mean(dim=0)
    else:  # an attention pool over the tokens, weighed as a block is
        pooled = _weigh(pool[0].detach().float(), pool_grads[0].float())  # [1, N'] over the tokens it reads
        row = (pooled @ r[n - pooled.shape[-1]:])[0]  # timm's head reads the patch tokens only
    return row[prefix:].detach()


def _forward(visual: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, int, str]:
    """(embedding [1, E], prefix tokens before the patches, pooling kind)."""
    if isinstance(visual, VisionTransformer):
        return visual(image), 1, visual.pool
    if isinstance(visual, SiglipVisionTower):
        return visual(image), 0, "attn"
    kind = _timm_pool_kind(visual)
    return visual(image), getattr(visual.trunk, "num_prefix_tokens", 0), kind  # type: ignore[return-value]


def _timm_pool_kind(t: TimmVisionTower) -> str | None:
    pool = getattr(t.trunk, "global_pool", None)
    if getattr(t.head, "pool", None) is not None:
        return None
    if pool == "token":
        return "cls"
    if pool == "avg":
        return "avg"
    if pool == "map" and hasattr(getattr(t.trunk, "attn_pool", None), "fused_attn"):
        return "attn"
    return None


def _timm_attention(t: TimmVisionTower) -> list[nn.Module]:
    """timm's self-attention modules that can compute their softmax explicitly, input to output."""
    return [m for m in t.trunk.modules() if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None),
                                                                                   nn.Module)]


def _explicit_forward(records: list[torch.Tensor]):
    def forward(self: Attention, x: torch.Tensor, causal: bool = False, rows=None, mask=None) -> torch.Tensor:
        b, n, d = x.shape
        dh = d // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
        s = (qkv[0] @ qkv[1].transpose(-1, -2)) * dh**-0.5
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = s.softmax(dim=-1)
        records.append(p)
        out = self.out_proj((p @ qkv[2]).transpose(1, 2).reshape(b, n, d))
        return out if rows is None else take_rows(out, rows)
    return forward


def _explicit_pool(records: list[torch.Tensor]):
    def forward(self: AttentionPoolHead, x: torch.Tensor, mask=None) -> torch.Tensor:
        b, n, d = x.shape
        dh = d // self.heads
        w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = F.linear(self.probe.to(x.dtype), w[:d], bias[:d]).view(1, 1, self.heads, dh).transpose(1, 2)
        kv = F.linear(x, w[d:], bias[d:]).view(b, n, 2, self.heads, dh).permute(2, 0, 3, 1, 4)
        p = ((q @ kv[0].transpose(-1, -2)) * dh**-0.5).softmax(dim=-1)  # [B, H, 1, N]
        records.append(p)
        out = self.attn.out_proj((p @ kv[1]).transpose(1, 2).reshape(b, d))
        return out + self.mlp(self.norm(out))
    return forward


@contextmanager
def _recording(visual: nn.Module) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Yields (self-attention maps [B, H, N, N] input to output, the pooling head's [B, H, 1, N])
    as the next forward fills them."""
    attn: list[torch.Tensor] = []
    pool: list[torch.Tensor] = []
    undo: list[Callable[[], None]] = []
    try:
        if isinstance(visual, TimmVisionTower):
            _record_timm(visual, attn, pool, undo)
        else:
            for m in visual.modules():
                if isinstance(m, Attention):
                    m.forward = types.MethodType(_explicit_forward(attn), m)
                    undo.append(lambda m=m: delattr(m, "forward"))
                elif isinstance(m, AttentionPoolHead):
                    m.forward = types.MethodType(_explicit_pool(pool), m)
                    undo.append(lambda m=m: delattr(m, "forward"))
            transformer = getattr(visual, "transformer", None)
            if transformer is not None and transformer.pooled_last_block:
                transformer.pooled_last_block = False  # every row of the last block's attention
                undo.append(lambda: setattr(transformer, "pooled_last_block", True))
            if transformer is not None and transformer.grad_checkpointing:
                transformer.grad_checkpointing = False  # recomputed blocks would record their attention twice
                undo.append(lambda: setattr(transformer, "grad_checkpointing", True))
        yield attn, pool
    finally:
        for f in reversed(undo):
            f()


def _record_timm(t: TimmVisionTower, attn: list, pool: list, undo: list) -> None:
    pool_module = getattr(t.trunk, "attn_pool", None)
    for m in _timm_attention(t):
        fused = m.fused_attn
        m.fused_attn = False
        handle = m.attn_drop.register_forward_hook(lambda _m, _i, out: attn.append(out))
        undo.append(lambda m=m, fused=fused, h=handle: (h.remove(), setattr(m, "fused_attn", fused)))
    if pool_module is not None and _timm_pool_kind(t) == "attn":
        pool_module.forward = types.MethodType(_explicit_latent_pool(pool), pool_module)
        undo.append(lambda: delattr(pool_module, "forward"))


def _explicit_latent_pool(records: list[torch.Tensor]):
    """timm's ``AttentionPoolLatent`` (one latent query) with its softmax kept."""
    def forward(self: nn.Module, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        b, n, c = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, self.latent_len, self.num_heads, self.head_dim)
        kv = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q.transpose(1, 2)), self.k_norm(kv[0])
        p = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, L, N]
        records.append(p)
        x = self.proj_drop(self.proj((p @ kv[1]).transpose(1, 2).reshape(b, self.latent_len, c)))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        return x[:, 0] if self.pool == "token" else x.mean(1) if self.pool == "avg" else x
    return forward

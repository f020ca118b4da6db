"""Transformer building blocks shared by the image and text towers.

Parameter names follow OpenAI's released CLIP (``attn.in_proj_weight``, ``mlp.c_fc``,
``ln_1`` ...), so OpenAI and OpenCLIP state dicts map onto these modules one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


Rows = int | torch.Tensor  # one position per sequence: the same for all, or a LongTensor [B]


def take_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """[B, N, D] -> [B, 1, D]: position ``rows`` (int) or ``rows[b]`` of each sequence b."""
    if isinstance(rows, int):
        return x[:, rows : rows + 1]
    return x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)


def mask_rows(mask: torch.Tensor, rows: Rows) -> torch.Tensor:
    """[B, H, N, N] -> [B, H, 1, N]: the mask's query row ``rows`` (int) or ``rows[b]``."""
    if isinstance(rows, int):
        return mask[:, :, rows : rows + 1]
    return mask.gather(2, rows.view(-1, 1, 1, 1).expand(-1, mask.shape[1], 1, mask.shape[-1]))


def _quick_gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # x s(1.702 x) = silu(1.702 x) / 1.702, so d/dx = silu'(1.702 x): one fused kernel.
    return torch.ops.aten.silu_backward(grad, 1.702 * x)


class _QuickGELUFn(torch.autograd.Function):
    """x * sigmoid(1.702 x), keeping only x for backward. Autograd on the plain expression also
    keeps sigmoid(1.702 x), one more tensor of the MLP's 4x width in every block. Backward
    recomputes it inside one fused kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return _quick_gelu_backward(grad, x)


class _RecomputedInputLinear(torch.autograd.Function):
    """``F.linear(f(x), weight, bias)`` that keeps ``x`` for backward instead of ``f(x)``.

    A linear layer saves its input for the weight gradient. When that input is a cheap function
    of a tensor autograd keeps anyway, saving both costs memory for nothing: in the MLP, c_proj
    would keep gelu(h) beside h (kept by gelu's backward), another tensor of 4x the width in every
    block. Backward recomputes ``f(x)`` (elementwise: cheap next to the matmuls). Under autocast the matmuls run in the
    autocast dtype with the weight cast to it, as ``F.linear`` would; ``f`` runs in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, f, device_type):  # type: ignore[override]
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        with torch.autocast(device_type, enabled=False):
            inp = f(x).to(dtype)
            out = F.linear(inp, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.f, ctx.dtype, ctx.has_bias = f, dtype, bias is not None
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        flat_g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[1]:
                with torch.no_grad():  # recomputed for the weight gradient only, then freed
                    inp = ctx.f(x).to(ctx.dtype)
                grad_w = (flat_g.t() @ inp.reshape(-1, inp.shape[-1])).to(weight.dtype)
                del inp
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = flat_g.sum(0).to(weight.dtype)
            if ctx.needs_input_grad[0]:
                grad_inp = (grad @ weight.to(ctx.dtype)).to(x.dtype)
                grad_x = _input_grad(ctx.f, grad_inp, x)
        return grad_x, grad_w, grad_b, None, None


def _input_grad(f, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d f(x) / dx applied to ``grad``, without keeping f(x) alive (the activations' own kernels)."""
    if isinstance(f, QuickGELU):
        return _quick_gelu_backward(grad, x)
    if isinstance(f, nn.GELU):
        return torch.ops.aten.gelu_backward(grad, x, approximate=f.approximate)
    with torch.enable_grad():
        xd = x.detach().requires_grad_()
        return torch.autograd.grad(f(xd), xd, grad)[0]


def linear_of(f, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(f(x))``; while training, keeping x rather than f(x) for backward (see above)."""
    if torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad):
        return _RecomputedInputLinear.apply(x, layer.weight, layer.bias, f, x.device.type)
    return layer(f(x))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFn.apply(x)
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16 weights stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        if orig in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled():
            x = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
            return x.to(orig)
        return super().forward(x)


_PLAIN_ATTENTION_MAX_LEN = 512  # beyond it the [N, N] score matrices cost more memory than they save time


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, H, Nq, Dh] queries and [B, H, N, Dh] keys/values;
    ``mask`` (True = may attend) broadcasts to [B, H, Nq, N]. SDPA, except in bf16/fp16 on the
    CPU for short sequences, where PyTorch's fused CPU kernel runs forward + backward several
    times slower than plain matrix products (commit 60b315e has the measurement): there the
    scores are formed explicitly, with the softmax in fp32 as SDPA's math path does."""
    n = k.shape[-2]
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or n > _PLAIN_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, Nq, N]
    if causal:
        scores = scores.masked_fill(torch.ones(q.shape[-2], n, dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, through SDPA (see ``attend``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's defaults, which OpenAI's vision tower kept.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False, rows: Rows | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]; with ``rows`` only those positions' outputs, [B, 1, D]. ``mask``
        (True = may attend), [B or 1, 1 or H, N, N], is combined with the causal mask."""
        b, n, d = x.shape
        dh = d // self.heads
        if mask is not None and causal:  # SDPA takes a mask or is_causal, not both
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            causal = False
        if rows is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3D]
            qkv = qkv.view(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
            out = attend(qkv[0], qkv[1], qkv[2], causal, mask)  # [B, H, N, Dh]
            return self.out_proj(out.transpose(1, 2).reshape(b, n, d))  # a view if laid out [B, N, H, Dh]
        # One query per sequence: keys and values from every position, the query from one row.
        w, bias = self.in_proj_weight, self.in_proj_bias
        kv = F.linear(x, w[d:], bias[d:]).view(b, n, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # [2, B, H, N, Dh]
        q = F.linear(take_rows(x, rows), w[:d], bias[:d]).view(b, 1, self.heads, dh).transpose(1, 2)  # [B, H, 1, Dh]
        if mask is not None:
            mask = mask_rows(mask.expand(b, -1, n, n), rows)  # [B, 1 or H, 1, N]
        elif causal:  # the query at position p sees keys 0..p, as row p of the causal mask
            p = rows if isinstance(rows, torch.Tensor) else torch.full((b,), rows, device=x.device)
            mask = (torch.arange(n, device=x.device) <= p.view(b, 1)).view(b, 1, 1, n)  # [B, 1, 1, N]
        out = attend(q, kv[0], kv[1], mask=mask)  # [B, H, 1, Dh]
        return self.out_proj(out.transpose(1, 2).reshape(b, 1, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, quick_gelu: bool, gelu_approximate: str = "none") -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        # SigLIP's towers were trained with GELU's tanh approximation (OpenCLIP's act_kwargs).
        self.gelu = QuickGELU() if quick_gelu else nn.GELU(approximate=gelu_approximate)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_of(self.gelu, self.c_fc(x), self.c_proj)  # keeps c_fc's output, not gelu's


class LayerScale(nn.Module):
    """A learned per-channel gain on a residual branch (Touvron et al. 2021, CaiT); OpenCLIP's
    ``ls_init_value`` and its parameter name ``gamma``."""

    def __init__(self, width: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); with ``ls_init_value``
    each branch is scaled by a LayerScale (``ls_1``, ``ls_2``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, *,
                 ls_init_value: float | None = None, norm_eps: float = 1e-5, gelu_approximate: str = "none") -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), quick_gelu, gelu_approximate)
        # Identity keeps the state dict of the plain block (no ls_* tensors), as OpenCLIP's does.
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False, rows: Rows | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]; with ``rows`` the block's output at those positions only, [B, 1, D]."""
        h = self.ln_1(x)
        x = (x if rows is None else take_rows(x, rows)) + self.ls_1(self.attn(h, causal=causal, rows=rows, mask=mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of residual blocks on batch-first tensors [B, N, D]."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool, *,
                 ls_init_value: float | None = None, norm_eps: float = 1e-5, gelu_approximate: str = "none") -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_ratio, quick_gelu, ls_init_value=ls_init_value, norm_eps=norm_eps,
                          gelu_approximate=gelu_approximate)
            for _ in range(layers)
        )
        self.grad_checkpointing = False
        # With ``rows``, run the last block at the pooled position only (off: every position,
        # then select; the same outputs to float rounding, for tests and benchmarks).
        self.pooled_last_block = True

    def forward(self, x: torch.Tensor, causal: bool = False, rows: Rows | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, N, D]. With ``rows`` (the pooled position: an int for every sequence,
        or a LongTensor [B]) -> [B, D], the output at that position only. The towers use nothing
        else of the last block, so it computes only that query, its MLP and its residual; the
        other blocks run in full (every position is a key of the next block). ``mask``: which keys
        each query may attend (``Attention``), on top of ``causal``."""
        last = len(self.resblocks) - 1 if self.pooled_last_block else -1
        for i, block in enumerate(self.resblocks):
            r = rows if i == last else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, r, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, rows=r, mask=mask)
        if rows is not None:
            x = (x if last >= 0 else take_rows(x, rows)).squeeze(1)  # [B, D]
        return x

    def init_weights(self, proj_std: float, attn_std: float, fc_std: float) -> None:
        """The scheme of OpenAI's released text tower (GPT-2 style depth scaling)."""
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

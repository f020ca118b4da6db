"""Contrastive objectives: CLIP's symmetric InfoNCE, a memory-bounded tiled variant, SigLIP.

Pure functions take L2-normalised features [N, D] and an already exp'd, clamped logit scale.
``ContrastiveLoss`` is the thin wrapper the trainer uses; across ranks it gathers features with
gradients and computes only its own rows ("local loss"), scaled so that DDP's gradient
*average* over ranks equals the single-process gradient of the full global batch:

    rank r returns L_r = mean over its rows; the global loss is mean_r L_r. Backward of the
    gather all-reduces, so rank r's parameters receive W * dL/dtheta (their share); DDP divides
    by W. The logit scale is replicated, its per-rank gradients dL_r/ds average to dL/ds.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.train.distributed import gather_with_grad


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """(CE(logits, arange) + CE(logits.T, arange)) / 2 with logits = scale * img @ txt.T."""
    # Scaling the [N, D] features, not the [N, N] product: backward then needs no saved N x N cosines.
    logits = (logit_scale * image_features) @ text_features.T  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_with_negatives(image_features: torch.Tensor, text_features: torch.Tensor, negatives: torch.Tensor,
                             mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``clip_loss`` with extra wrong captions per image (train.swap_negatives): image i is scored
    against every caption of the batch and its own negatives[i, :] ([N, K, D], where ``mask``); the
    caption->image direction is unchanged."""
    scaled = logit_scale * image_features
    logits = scaled @ text_features.T  # [N, N]
    extra = torch.einsum("nd,nkd->nk", scaled, negatives).masked_fill(~mask, float("-inf"))  # [N, K]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(torch.cat([logits, extra], 1), labels) + F.cross_entropy(logits.T, labels)) / 2


def _local_clip_loss(
    img: torch.Tensor, txt: torch.Tensor, all_img: torch.Tensor, all_txt: torch.Tensor, scale: torch.Tensor, offset: int
) -> torch.Tensor:
    """This rank's rows: local images vs all texts and local texts vs all images."""
    labels = torch.arange(img.shape[0], device=img.device) + offset
    logits_img = (scale * img) @ all_txt.T  # [B, W*B]
    logits_txt = (scale * txt) @ all_img.T  # [B, W*B]
    return (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels)) / 2


# -- tiled InfoNCE ----------------------------------------------------------------------------


def _online_lse_update(m: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dim: int, inplace: bool) -> None:
    """Fold a tile z into the running max m and sum s of exp(. - m) along ``dim``, in place.
    ``inplace``: z is not needed afterwards and may be overwritten (one allocation less)."""
    m_new = torch.maximum(m, z.amax(dim))
    e = z.sub_(m_new.unsqueeze(dim)) if inplace else z - m_new.unsqueeze(dim)
    s.mul_(torch.exp(m - m_new)).add_(e.exp_().sum(dim))
    m.copy_(m_new)


def _diagonal(i: int, ti: int, j: int, tj: int, offset: int) -> tuple[int, int]:
    """Global rows [lo, hi) whose positive (column row + offset) falls inside tile (i, j)."""
    return max(i, j - offset), min(i + ti, j + tj - offset)


def _tile_logits(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, acc: torch.dtype):
    """A function (i, j, tile) -> logits block [ti, tj] in ``acc`` precision."""
    if q.dtype == acc:  # fold the scale into q once: no extra pass over every block
        qs = q * scale
        return lambda i, j, t: qs[i : i + t] @ k[j : j + t].T
    s = scale.to(acc)  # low-precision inputs: scale after the matmul, in fp32
    return lambda i, j, t: (q[i : i + t] @ k[j : j + t].T).to(acc).mul_(s)


class _TiledInfoNCE(torch.autograd.Function):
    """Per-row cross-entropy of logits = scale * q @ k.T with row r's target at column r + offset
    (and, when ``cols``, per-column cross-entropy of the square matrix, targets on the diagonal),
    never holding more than one [tile, tile] block of logits.

    Forward streams blocks through an online logsumexp. Backward recomputes each block and forms
    dCE/dz = softmax - onehot inside the block, as the plain loss's backward does (subtracting the
    one-hot outside the tiles would cancel two numbers close to the scale, losing fp32 digits).
    Saved for backward: q, k, the scale and four vectors: O(N * D), not O(N^2).
    """

    @staticmethod
    def forward(ctx, q, k, scale, tile: int, offset: int, cols: bool):  # type: ignore[override]
        with torch.autocast(q.device.type, enabled=False):  # blocks keep the precision chosen here
            return _TiledInfoNCE._forward(ctx, q, k, scale, tile, offset, cols)

    @staticmethod
    def _forward(ctx, q, k, scale, tile: int, offset: int, cols: bool):
        acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 inputs accumulate in fp32
        nq, nk = q.shape[0], k.shape[0]
        logits = _tile_logits(q, k, scale, acc)
        row_m = torch.full((nq,), -torch.inf, dtype=acc, device=q.device)
        row_s = torch.zeros(nq, dtype=acc, device=q.device)
        col_m = torch.full((nk if cols else 0,), -torch.inf, dtype=acc, device=q.device)
        col_s = torch.zeros(nk if cols else 0, dtype=acc, device=q.device)
        pos = torch.zeros(nq, dtype=acc, device=q.device)  # logits of the matching pairs
        for i in range(0, nq, tile):
            for j in range(0, nk, tile):
                z = logits(i, j, tile)  # [ti, tj]
                lo, hi = _diagonal(i, z.shape[0], j, z.shape[1], offset)
                if lo < hi:  # taken from the block, so that pos and the max round alike
                    r = torch.arange(lo, hi, device=q.device)
                    pos[lo:hi] = z[r - i, r + offset - j]
                _online_lse_update(row_m[i : i + tile], row_s[i : i + tile], z, 1, inplace=not cols)
                if cols:
                    _online_lse_update(col_m[j : j + tile], col_s[j : j + tile], z, 0, inplace=True)
        # logsumexp = max + log(sum): kept apart, since their sum (~ the scale) would round to
        # ~1e-5 in fp32 and exp(z - lse) would carry that error into every softmax weight.
        ctx.save_for_backward(q, k, scale, row_m, row_s, col_m, col_s)
        ctx.tile, ctx.offset, ctx.cols = tile, offset, cols
        row = (row_m - pos) + row_s.log()  # [Nq]
        col = (col_m - pos) + col_s.log() if cols else col_s  # [Nk] (or [0])
        if not cols:
            ctx.mark_non_differentiable(col)
        return row, col

    @staticmethod
    def backward(ctx, g_row, g_col):  # type: ignore[override]
        with torch.autocast(g_row.device.type, enabled=False):
            return _TiledInfoNCE._backward(ctx, g_row, g_col)

    @staticmethod
    def _backward(ctx, g_row, g_col):
        q, k, scale, row_m, row_s, col_m, col_s = ctx.saved_tensors
        tile, offset, cols, acc = ctx.tile, ctx.offset, ctx.cols, row_m.dtype
        logits = _tile_logits(q, k, scale, acc)
        # d row_i / d z_ij = softmax_ij = exp(z_ij - m_i) / sum_i: fold 1/sum into the weights.
        w_row = g_row.to(acc) / row_s  # [Nq]
        w_col = g_col.to(acc) / col_s if cols else None  # [Nk]
        gq = torch.zeros(q.shape, dtype=acc, device=q.device)  # sum_j dL/dz_ij k_j
        gk = torch.zeros(k.shape, dtype=acc, device=q.device)  # sum_i dL/dz_ij q_i
        for i in range(0, q.shape[0], tile):
            qi = q[i : i + tile]
            for j in range(0, k.shape[0], tile):
                kj = k[j : j + tile]
                z = logits(i, j, tile)  # [ti, tj]
                if cols:
                    e = (z - col_m[None, j : j + tile]).exp_().mul_(w_col[None, j : j + tile])
                g = z.sub_(row_m[i : i + tile, None]).exp_().mul_(w_row[i : i + tile, None])  # dL/dz
                if cols:
                    g.add_(e)
                lo, hi = _diagonal(i, qi.shape[0], j, kj.shape[0], offset)
                if lo < hi:  # the one-hot targets that fall inside this block
                    r = torch.arange(lo, hi, device=q.device)
                    target = g_row[lo:hi] + (g_col[lo + offset : hi + offset] if cols else 0)
                    g[r - i, r + offset - j] -= target.to(acc)
                if g.dtype == q.dtype:
                    gq[i : i + tile].addmm_(g, kj)
                    gk[j : j + tile].addmm_(g.T, qi)
                else:
                    g = g.to(q.dtype)
                    gq[i : i + tile] += g @ kj
                    gk[j : j + tile] += g.T @ qi
        # logits = s * cos: d/ds = sum_ij dL/dz_ij cos_ij = sum_i q_i . gq_i (no pass over blocks)
        ds = (q.to(acc) * gq).sum()
        s = scale.to(acc)
        dq, dk = gq.mul_(s).to(q.dtype), gk.mul_(s).to(k.dtype)  # in place: two [N, D] buffers less
        return dq, dk, ds.to(scale.dtype).reshape(scale.shape), None, None, None


def _as_scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale
    return torch.tensor(float(logit_scale), dtype=like.dtype, device=like.device)


def tiled_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, tile_size: int
) -> torch.Tensor:
    """``clip_loss`` computed and back-propagated in [tile, tile] blocks: same value and
    gradients, memory O(N * D + tile^2) instead of O(N^2)."""
    scale = _as_scale(logit_scale, image_features)
    ce_img, ce_txt = _TiledInfoNCE.apply(image_features, text_features, scale, tile_size, 0, True)  # [N], [N]
    return (ce_img.mean() + ce_txt.mean()) / 2


def _local_tiled_clip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    all_img: torch.Tensor,
    all_txt: torch.Tensor,
    scale: torch.Tensor,
    offset: int,
    tile: int,
) -> torch.Tensor:
    """``_local_clip_loss`` in tiles (rows only: this rank's [B, W*B] strips are not square)."""
    ce_img, _ = _TiledInfoNCE.apply(img, all_txt, scale, tile, offset, False)  # [B]
    ce_txt, _ = _TiledInfoNCE.apply(txt, all_img, scale, tile, offset, False)  # [B]
    return (ce_img.mean() + ce_txt.mean()) / 2


# -- SigLIP -----------------------------------------------------------------------------------


def _siglip_block(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int
) -> torch.Tensor:
    """Sum over the block of -log sigmoid(+-z); row i's positive is column offset + i (if present)."""
    logits = scale * (img @ txt.T) + bias  # [B, M]
    rows = torch.arange(img.shape[0], device=img.device) + offset
    cols = torch.arange(txt.shape[0], device=img.device)
    sign = (cols[None, :] == rows[:, None]).to(logits.dtype) * 2 - 1  # [B, M], +1 on matching pairs
    return -F.logsigmoid(sign * logits).sum()


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP: -sum_j log sigmoid(y_ij (scale * cos_ij + bias)), y = +1 on the diagonal, mean over i."""
    return _siglip_block(image_features, text_features, logit_scale, logit_bias, 0) / image_features.shape[0]


def _local_siglip_loss(
    img: torch.Tensor, all_txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int, tile: int | None
) -> torch.Tensor:
    """Local images vs all texts. With ``tile`` the texts go in chunks whose logits are
    recomputed in backward (activation checkpointing): memory O(B * tile) instead of O(B * N)."""
    if tile is None:
        return _siglip_block(img, all_txt, scale, bias, offset) / img.shape[0]
    total = img.new_zeros(())
    for j in range(0, all_txt.shape[0], tile):
        total = total + checkpoint(
            _siglip_block, img, all_txt[j : j + tile], scale, bias, offset - j, use_reentrant=False
        )
    return total / img.shape[0]


# -- the trainer's entry point ----------------------------------------------------------------


class ContrastiveLoss(nn.Module):
    """CLIP (InfoNCE) or SigLIP loss, optionally tiled, optionally across ranks.

    With ``world_size > 1`` every rank passes its own [B, D] features (same B everywhere) and
    gets its local loss back; see the module docstring for why DDP averaging is then exact.
    """

    def __init__(
        self,
        kind: Literal["clip", "siglip"] = "clip",
        tile_size: int | None = None,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"ContrastiveLoss kind must be 'clip' or 'siglip', got {kind!r}")
        if tile_size is not None and tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer or None, got {tile_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.kind, self.tile_size, self.world_size, self.rank = kind, tile_size, world_size, rank

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale = _as_scale(logit_scale, image_features)
        if self.kind == "siglip" and logit_bias is None:
            raise ValueError("the SigLIP loss needs a logit_bias (build the model with init_logit_bias set)")
        # (CLIP ignores a bias: a constant added to every logit cancels in the softmax.)
        if self.world_size == 1:
            if self.kind == "siglip":
                return _local_siglip_loss(image_features, text_features, scale, logit_bias, 0, self.tile_size)
            if self.tile_size is None:
                return clip_loss(image_features, text_features, scale)
            return tiled_clip_loss(image_features, text_features, scale, self.tile_size)

        b = image_features.shape[0]
        offset = self.rank * b  # rank r's pairs sit at rows r*B .. r*B+B-1 of the gathered batch
        all_txt = gather_with_grad(text_features)  # [W*B, D]
        if all_txt.shape[0] != self.world_size * b:
            raise RuntimeError(
                f"ContrastiveLoss(world_size={self.world_size}) gathered {all_txt.shape[0]} rows from local batches "
                f"of {b}: initialise torch.distributed with the same world size and equal batches per rank"
            )
        if self.kind == "siglip":
            return _local_siglip_loss(image_features, all_txt, scale, logit_bias, offset, self.tile_size)
        all_img = gather_with_grad(image_features)  # [W*B, D]
        if self.tile_size is None:
            return _local_clip_loss(image_features, text_features, all_img, all_txt, scale, offset)
        return _local_tiled_clip_loss(image_features, text_features, all_img, all_txt, scale, offset, self.tile_size)

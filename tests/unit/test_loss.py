"""Contrastive losses against naive O(N^2) loops and OpenCLIP; the tiled loss against the plain one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.train.loss import ContrastiveLoss, clip_loss, siglip_loss, tiled_clip_loss


def features(n: int, d: int = 16, dtype: torch.dtype = torch.float64, seed: int = 0):
    """Normalised, correlated image/text features (pairs share a component) + scale and bias."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=g, dtype=dtype)
    img = F.normalize(shared + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(shared + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    scale = torch.tensor(14.3, dtype=dtype)
    bias = torch.tensor(-3.0, dtype=dtype)
    return [t.clone().requires_grad_() for t in (img, txt, scale, bias)]


def naive_clip(img, txt, scale) -> float:
    n = len(img)
    img, txt, scale = img.detach(), txt.detach(), float(scale.detach())
    logit = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    i2t = sum(math.log(sum(math.exp(logit[i][j]) for j in range(n))) - logit[i][i] for i in range(n)) / n
    t2i = sum(math.log(sum(math.exp(logit[i][j]) for i in range(n))) - logit[j][j] for j in range(n)) / n
    return (i2t + t2i) / 2


def naive_siglip(img, txt, scale, bias) -> float:
    n = len(img)
    img, txt, scale, bias = img.detach(), txt.detach(), float(scale.detach()), float(bias.detach())
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(img[i] @ txt[j]) + bias
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))  # -log sigmoid(y z)
    return total / n


def grads(loss_fn, *inputs):
    loss = loss_fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, inputs)


def test_clip_loss_matches_naive_loop() -> None:
    img, txt, scale, _ = features(7)
    assert clip_loss(img, txt, scale).item() == pytest.approx(naive_clip(img, txt, scale), rel=1e-12)


def test_clip_loss_matches_open_clip() -> None:
    open_clip_loss = pytest.importorskip("open_clip.loss")
    img, txt, scale, _ = features(33, 32, torch.float32)
    ours, g_ours = grads(clip_loss, img, txt, scale)
    ref, g_ref = grads(open_clip_loss.ClipLoss(), img, txt, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_siglip_loss_matches_naive_loop_and_open_clip() -> None:
    img, txt, scale, bias = features(6)
    value = siglip_loss(img, txt, scale, bias)
    assert value.item() == pytest.approx(naive_siglip(img, txt, scale, bias), rel=1e-12)
    open_clip_loss = pytest.importorskip("open_clip.loss")
    ours, g_ours = grads(siglip_loss, img, txt, scale, bias)
    ref, g_ref = grads(open_clip_loss.SigLipLoss(), img, txt, scale, bias)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "tol", "tiles"),
    [(torch.float64, 1e-12, (1, 4, 7, 37, 64)), (torch.float32, 1e-6, (4, 7, 37, 64))],
)
def test_tiled_equals_plain_values_and_gradients(dtype, tol, tiles) -> None:
    # 37 is prime: every tile size but 1 and 37 leaves a ragged last tile.
    img, txt, scale, _ = features(37, dtype=dtype)
    ref, g_ref = grads(clip_loss, img, txt, scale)
    for tile in tiles:
        value, g = grads(lambda a, b, s: tiled_clip_loss(a, b, s, tile), img, txt, scale)
        torch.testing.assert_close(value, ref, rtol=tol, atol=tol)
        for name, a, b in zip(("image", "text", "scale"), g, g_ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"d/d{name}, tile {tile}")


def test_tiled_is_stable_at_the_largest_scale() -> None:
    # Scale 100 (CLIP's clamp): exp(logits) overflows fp32 without a max shift. At this scale fp32
    # rounding of the logits alone moves gradients by ~1e-6, so both fp32 losses are compared with
    # the fp64 truth: the tiled one must be finite and no less accurate than the plain one.
    img, txt, _, _ = features(200, dtype=torch.float64)
    scale = torch.tensor(100.0, dtype=torch.float64, requires_grad=True)
    truth, g_truth = grads(clip_loss, img, txt, scale)
    lo = [t.detach().float().requires_grad_() for t in (img, txt, scale)]
    plain, g_plain = grads(clip_loss, *lo)
    tiled, g_tiled = grads(lambda a, b, s: tiled_clip_loss(a, b, s, 48), *lo)
    assert torch.isfinite(tiled) and all(torch.isfinite(g).all() for g in g_tiled)
    assert abs(tiled.double() - truth) <= max(2 * abs(plain.double() - truth), 1e-6)
    for t, p, ref in zip(g_tiled, g_plain, g_truth):
        err_tiled, err_plain = (t.double() - ref).abs().max(), (p.double() - ref).abs().max()
        assert err_tiled <= max(2 * err_plain, 1e-6), (err_tiled, err_plain)


def largest_saved(fn) -> int:
    """numel of the largest tensor autograd keeps for backward while ``fn`` builds its graph."""
    sizes = [0]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        loss = fn()
    loss.backward()
    return max(sizes)


def test_tiled_never_saves_the_similarity_matrix() -> None:
    n, d = 256, 8
    img, txt, scale, _ = features(n, d, torch.float32)
    assert largest_saved(lambda: clip_loss(img, txt, scale)) >= n * n  # the plain loss keeps N x N
    assert largest_saved(lambda: tiled_clip_loss(img, txt, scale, 32)) <= n * d  # the tiled one only N x D


def test_tiled_low_precision_inputs_accumulate_in_fp32() -> None:
    img, txt, scale, _ = features(50, 32, torch.float32)
    ref = clip_loss(img, txt, scale)
    low = tiled_clip_loss(img.detach().bfloat16(), txt.detach().bfloat16(), scale.detach(), 16)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)
    # Called under autocast, the tiled loss keeps its fp32 inputs in fp32 (autocast is switched off inside).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = tiled_clip_loss(img, txt, scale, 16)
    assert under.item() == pytest.approx(ref.item(), rel=1e-6)


def test_contrastive_loss_dispatch() -> None:
    img, txt, scale, bias = features(9)
    assert ContrastiveLoss()(img, txt, scale).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-12)
    assert ContrastiveLoss(tile_size=4)(img, txt, scale).item() == pytest.approx(
        clip_loss(img, txt, scale).item(), rel=1e-12
    )
    # A bias is a constant shift of every logit: it cancels in the softmax.
    assert ContrastiveLoss()(img, txt, scale, bias).item() == pytest.approx(clip_loss(img, txt, scale).item())
    assert ContrastiveLoss("siglip")(img, txt, scale, bias).item() == pytest.approx(
        siglip_loss(img, txt, scale, bias).item(), rel=1e-12
    )
    # A plain float scale works as well as a tensor.
    assert ContrastiveLoss()(img, txt, 14.3).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-12)


def test_tiled_siglip_equals_plain() -> None:
    img, txt, scale, bias = features(11)
    ref, g_ref = grads(ContrastiveLoss("siglip"), img, txt, scale, bias)
    value, g = grads(ContrastiveLoss("siglip", tile_size=4), img, txt, scale, bias)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_contrastive_loss_rejects_bad_arguments() -> None:
    img, txt, scale, _ = features(4)
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")(img, txt, scale)
    with pytest.raises(ValueError, match="kind"):
        ContrastiveLoss("triplet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tile_size"):
        ContrastiveLoss(tile_size=0)
    with pytest.raises(ValueError, match="rank"):
        ContrastiveLoss(world_size=2, rank=2)
    with pytest.raises(RuntimeError, match="world_size=2"):
        ContrastiveLoss(world_size=2, rank=0)(img, txt, scale)  # no process group: gather is the identity

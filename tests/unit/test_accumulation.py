"""GradCache accumulation: k micro-batches of B give the loss and gradients of one batch of k*B.

Tested with a ViT model: BatchNorm (the ResNet towers) normalises each micro-batch with its own
statistics, so accumulation is not exact for it (see ``clipforge.train.accumulation``).
"""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.model.registry import get_config
from clipforge.train.accumulation import accumulated_contrastive_backward
from clipforge.train.loss import ContrastiveLoss


def tiny_model(dtype: torch.dtype, bias: float | None = None, patch_dropout: float = 0.0):
    cfg = get_config("nano")
    model = clipforge.create_model(cfg.replace(init_logit_bias=bias), dtype=dtype, seed=0)
    model.visual.patch_dropout = patch_dropout
    return model.train()


def batch(n: int, dtype: torch.dtype, context: int = 8):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=g, dtype=dtype)
    tokens = torch.randint(1, 49406, (n, context), generator=g)
    tokens[:, 0] = 49406
    tokens[torch.arange(n), torch.randint(2, context, (n,), generator=g)] = 49407  # EOT somewhere
    return images, tokens


def full_batch_grads(model, loss_fn, images, tokens, chunks: int = 1):
    """Reference: features of the whole batch with a graph (forwarded in ``chunks`` pieces, in order)."""
    model.zero_grad()
    outs = [model(i, t) for i, t in zip(images.chunk(chunks), tokens.chunk(chunks))]
    img = torch.cat([o.image_features for o in outs])
    txt = torch.cat([o.text_features for o in outs])
    loss = loss_fn(img, txt, outs[-1].logit_scale, outs[-1].logit_bias)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def accumulated_grads(model, loss_fn, images, tokens, chunks: int, **kwargs):
    model.zero_grad()
    micro = list(zip(images.chunk(chunks), tokens.chunk(chunks)))
    loss = accumulated_contrastive_backward(model, loss_fn, micro, **kwargs)
    assert not loss.requires_grad
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].abs().sum() > 0, f"{name} received no gradient"
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize(
    ("dtype", "tol", "kind", "tile"),
    [
        (torch.float64, 1e-9, "clip", None),
        pytest.param(torch.float64, 1e-9, "clip", 5, marks=pytest.mark.slow),
        pytest.param(torch.float64, 1e-9, "siglip", None, marks=pytest.mark.slow),
        (torch.float32, 1e-5, "clip", None),
    ],
)
def test_accumulation_equals_one_big_batch(dtype, tol, kind, tile) -> None:
    model = tiny_model(dtype, bias=-5.0 if kind == "siglip" else None)
    loss_fn = ContrastiveLoss(kind, tile_size=tile)
    images, tokens = batch(12, dtype)
    ref_loss, ref = full_batch_grads(model, loss_fn, images, tokens)
    loss, acc = accumulated_grads(model, loss_fn, images, tokens, chunks=3)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    assert len(acc) == len(list(model.parameters()))  # every parameter, logit scale/bias included
    assert_same(acc, ref, tol)


def test_summed_micro_batch_losses_would_differ() -> None:
    """The property accumulation preserves is real: per-micro-batch losses give other gradients."""
    model = tiny_model(torch.float64)
    images, tokens = batch(12, torch.float64)
    _, ref = full_batch_grads(model, ContrastiveLoss(), images, tokens)
    model.zero_grad()
    for i, t in zip(images.chunk(3), tokens.chunk(3)):
        out = model(i, t)
        (ContrastiveLoss()(*out) / 3).backward()
    assert not torch.allclose(model.visual.proj.grad, ref["visual.proj"], atol=1e-6)


@pytest.mark.slow
def test_patch_dropout_makes_the_same_choices_in_both_passes() -> None:
    # With random patch dropout the reference forwards the micro-batches in the same order,
    # consuming the generator as the no-grad pass does; the re-run must replay those draws.
    model = tiny_model(torch.float64, patch_dropout=0.5)
    loss_fn = ContrastiveLoss()
    images, tokens = batch(12, torch.float64)
    torch.manual_seed(123)
    ref_loss, ref = full_batch_grads(model, loss_fn, images, tokens, chunks=3)
    ref_rng = torch.get_rng_state()
    torch.manual_seed(123)
    loss, acc = accumulated_grads(model, loss_fn, images, tokens, chunks=3)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    assert_same(acc, ref, 1e-9)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # the generator ends where one pass leaves it


@pytest.mark.slow
def test_grad_scaler_scales_the_accumulated_gradients() -> None:
    model = tiny_model(torch.float32)
    images, tokens = batch(8, torch.float32)
    _, plain = accumulated_grads(model, ContrastiveLoss(), images, tokens, chunks=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, scaled = accumulated_grads(model, ContrastiveLoss(), images, tokens, chunks=2, scaler=scaler)
    assert_same({n: g / 1024.0 for n, g in scaled.items()}, plain, 1e-5)


@pytest.mark.slow
def test_frozen_image_tower_is_skipped() -> None:
    # LiT-style: a locked image tower gives features without a graph; only the text tower learns.
    model = tiny_model(torch.float64)
    model.visual.requires_grad_(False)
    images, tokens = batch(6, torch.float64)
    _, ref = full_batch_grads(model, ContrastiveLoss(), images, tokens)
    _, acc = accumulated_grads(model, ContrastiveLoss(), images, tokens, chunks=2)
    assert_same(acc, ref, 1e-9)
    assert all(p.grad is None for p in model.visual.parameters())


def test_empty_micro_batch_list_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        accumulated_contrastive_backward(tiny_model(torch.float32), ContrastiveLoss(), [])

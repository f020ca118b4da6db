"""Shared pieces of the parity tests against open_clip: moving random weights off their initial
values, and inputs that exercise every pooling position."""

from __future__ import annotations

import torch


def nudge(model: torch.nn.Module) -> torch.nn.Module:
    """Move every tensor off its initialisation (zero biases, zero-init BatchNorm), so each one
    matters to the outputs being compared."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return model


def parity_inputs(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images at the model's size; token rows of different lengths, ended by the top id
    (CLIP's end-of-text, where argmax pooling looks) and padded with 0."""
    g = torch.Generator().manual_seed(1)
    size = cfg.vision.image_size
    images = torch.randn(2, 3, size, size, generator=g)
    ctx, vocab = cfg.text.context_length, cfg.text.vocab_size
    tokens = torch.zeros(3, ctx, dtype=torch.long)
    for row, n in enumerate((3, ctx // 2, ctx)):
        tokens[row, : n - 1] = torch.randint(1, vocab - 1, (n - 1,), generator=g)
        tokens[row, n - 1] = vocab - 1
    return images, tokens

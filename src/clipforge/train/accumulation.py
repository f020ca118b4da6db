"""Gradient accumulation that keeps every negative of the accumulated batch (GradCache).

Summing per-micro-batch losses would shrink the contrastive batch to the micro-batch: each
sample would only see B - 1 negatives instead of k*B - 1. Instead (Gao et al., 2021):

1. forward every micro-batch without a graph and cache its features;
2. compute the loss on the concatenated features, with gradients w.r.t. the cached features
   (and the logit scale / bias) only;
3. re-run each micro-batch with a graph and back-propagate its slice of those gradients.

Step 3 must see the same random choices as step 1 (patch dropout, dropout), so the RNG state
before each micro-batch is saved in step 1 and restored in step 3.
Exact for models whose samples do not interact in the forward: not for BatchNorm in train
mode (ResNet towers), whose statistics are per micro-batch and whose running averages are
updated twice.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.train.loss import ContrastiveLoss


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def accumulated_contrastive_backward(
    model: nn.Module,
    loss_fn: ContrastiveLoss,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    autocast_ctx_factory: Callable[[], ContextManager] = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over all micro-batches as one batch.

    ``model(images, tokens)`` returns ClipOutput (normalised features, logit scale, bias).
    The loss is computed outside autocast, in fp32 at least. With ``scaler`` the loss is scaled before
    backward (unscale/step stay with the caller). Under DDP gradients are synchronised once, on
    the last micro-batch. Returns the (local) loss, detached.
    """
    if not micro_batches:
        raise ValueError("accumulated_contrastive_backward needs at least one micro-batch")

    # 1) Features of the whole batch, no graph. Remember the RNG state each forward started from.
    states, img_parts, txt_parts = [], [], []
    with torch.no_grad():
        for images, tokens in micro_batches:
            states.append(_rng_state())
            with autocast_ctx_factory():
                out = model(images, tokens)
            img_parts.append(out.image_features)  # [B_k, E]
            txt_parts.append(out.text_features)  # [B_k, E]
    after = _rng_state()

    # 2) Loss on the concatenated features; gradients stop at the cached features and scale/bias.
    dtype = torch.promote_types(img_parts[0].dtype, torch.float32)  # fp16/bf16 features: loss in fp32
    img = torch.cat(img_parts).to(dtype).requires_grad_()  # [sum B_k, E]
    txt = torch.cat(txt_parts).to(dtype).requires_grad_()
    scale = out.logit_scale.detach().to(dtype).requires_grad_()
    bias = out.logit_bias.detach().to(dtype).requires_grad_() if out.logit_bias is not None else None
    loss = loss_fn(img, txt, scale, bias)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    img_grads = img.grad.split([p.shape[0] for p in img_parts])
    txt_grads = txt.grad.split([p.shape[0] for p in txt_parts])

    # 3) Re-run each micro-batch with a graph and push its slice of the feature gradients through.
    last = len(micro_batches) - 1
    for k, (images, tokens) in enumerate(micro_batches):
        sync = k == last or not isinstance(model, DistributedDataParallel)
        with contextlib.nullcontext() if sync else model.no_sync():
            _set_rng_state(states[k])
            with autocast_ctx_factory():
                out = model(images, tokens)
            outputs = [out.image_features, out.text_features]
            grads = [img_grads[k].to(out.image_features.dtype), txt_grads[k].to(out.text_features.dtype)]
            if k == last:  # scale and bias are shared by all micro-batches: push their gradient once,
                # on the synchronised pass, so DDP sees every parameter used
                outputs.append(out.logit_scale)
                grads.append(scale.grad.to(out.logit_scale.dtype))
                if bias is not None and bias.grad is not None:
                    outputs.append(out.logit_bias)
                    grads.append(bias.grad.to(out.logit_bias.dtype))
            keep = [i for i, o in enumerate(outputs) if o.requires_grad]  # frozen towers (LiT) have none
            if keep:
                torch.autograd.backward([outputs[i] for i in keep], [grads[i] for i in keep])
    _set_rng_state(after)  # leave the generator where a single pass would have
    return loss.detach()

"""One optimisation step, as the trainer takes it. Everything in clipforge that trains (the trainer,
the demo's step timing, the experiments' baselines) goes through ``TrainStep``:

    clear the gradients -> forward, loss, backward (GradCache over K > 1 micro-batches)
    -> average FSDP's replicated gradients -> unscale (fp16) -> clip to ``grad_clip``
    -> one all-reduce of [loss, non-finite flags, stop flag, grad norm] (the step's only host sync)
    -> optimizer step, unless the loss or the gradients are non-finite

A non-finite step leaves the optimizer untouched and says so (``StepResult.applied``); stopping or
skipping is the caller's policy. The learning-rate schedule is the caller's too: the trainer
re-plans the run's length (time budget) between a step and the next rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from clipforge.train.accumulation import accumulated_contrastive_backward
from clipforge.train.coca_loss import caption_loss
from clipforge.train.distributed import all_reduce_sum
from clipforge.train.loss import ContrastiveLoss, clip_loss_with_negatives
from clipforge.train.sparse_rows import sparse_grad_norm
from clipforge.utils import autocast


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over ranks
    grad_norm: float  # before clipping, mean over ranks
    applied: bool  # False: non-finite loss (or gradients, without a loss scaler): no update was made
    stop: bool  # some rank asked to stop (agreed by all ranks through the step's all-reduce)


def clip_gradients(opt: torch.optim.Optimizer, max_norm: float, device: torch.device) -> torch.Tensor:
    """Global gradient norm of ``opt``'s parameters, clipped to ``max_norm`` when it is > 0. Under
    FSDP the sharded and the replicated parameters (separate groups) are measured apart, then combined."""
    utils = torch.nn.utils
    norms, sparse = [], []
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:  # a token table's rows (train.sparse_rows)
                p.grad = p.grad.coalesce()
                sparse.append(p)
        grads = [p.grad for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
        if grads:
            n = utils.get_total_norm(grads)
            norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)  # DTensor under FSDP
    if sparse:
        norms.append(sparse_grad_norm(p.grad for p in sparse).to(device))
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=device)
    if max_norm > 0:
        for group in opt.param_groups:
            utils.clip_grads_with_norm_([p for p in group["params"] if p.grad is None or not p.grad.is_sparse],
                                        max_norm, total)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # clip_grads_with_norm_'s rule
        for p in sparse:
            p.grad.mul_(coef)
    return total


class TrainStep:
    """The trainer's optimisation step over ``model`` and ``opt``.

    ``step(micro_batches)`` is a contrastive step on [(images, tokens), ...] (already on the
    device); ``minimise(compute_loss)`` runs the same step for any other scalar loss (the
    experiments' predictive and supervised baselines). ``model`` may be a DDP/FSDP wrapper;
    ``replicated`` lists FSDP's unsharded parameters, whose gradients are averaged here. ``clip``
    replaces ``clip_gradients`` (it runs between the backward and the update; returns the norm).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, loss_fn: ContrastiveLoss | None = None, *,
                 grad_clip: float = 1.0, precision: str = "fp32", device: torch.device | str = "cpu",
                 scaler: torch.amp.GradScaler | None = None, replicated: Sequence[nn.Parameter] = (),
                 world_size: int = 1, clip: Callable[[], torch.Tensor] | None = None,
                 caption_weight: float = 0.0, pad_id: int = 0) -> None:
        self.model, self.opt = model, opt
        # CoCa: the captioning loss (next-token cross-entropy, padding ``pad_id`` skipped) added
        # with this weight to the contrastive one; 0 for every other model.
        self.caption_weight, self.pad_id = caption_weight, pad_id
        self.clip = clip or (lambda: clip_gradients(self.opt, self.grad_clip, self.device))
        self.loss_fn = loss_fn if loss_fn is not None else ContrastiveLoss()
        self.grad_clip, self.precision, self.device = grad_clip, precision, torch.device(device)
        self.scaler, self.replicated, self.world_size = scaler, list(replicated), world_size

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], stop: bool = False,
             negatives: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepResult:
        """One step on the concatenation of ``micro_batches``; ``stop``: this rank asks to stop.
        ``negatives``: ([B, K, L] tokens, [B, K] mask) of extra wrong captions per image of a single
        micro-batch (train.swap_negatives; one process, CLIP's loss, untiled)."""
        # Dropped, not zeroed: the backward then writes each gradient instead of adding it to zeros.
        self.opt.zero_grad(set_to_none=True)
        if negatives is not None:
            loss = self._backward(self._loss_with_negatives(*micro_batches[0], *negatives))
        elif len(micro_batches) == 1:
            loss = self._backward(self._contrastive_loss(*micro_batches[0]))
        elif self.caption_weight:
            raise ValueError("CoCa's captioning loss is computed on one micro-batch (grad_accum 1)")
        else:
            loss = accumulated_contrastive_backward(self.model, self.loss_fn, list(micro_batches),
                                                    lambda: autocast(self.precision, self.device), self.scaler)
        return self._update(loss, stop)

    def minimise(self, compute_loss: Callable[[], torch.Tensor], stop: bool = False) -> StepResult:
        """One step on the scalar loss that ``compute_loss()`` returns (its forward runs under the
        step's precision)."""
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.precision, self.device):
            loss = compute_loss()
        return self._update(self._backward(loss.float()), stop)

    def _contrastive_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(self.precision, self.device):
            out = self.model(images, tokens, caption=True) if self.caption_weight else self.model(images, tokens)
        # the loss in fp32, outside autocast (as the accumulated path does)
        bias = out.logit_bias.float() if out.logit_bias is not None else None
        loss = self.loss_fn(out.image_features.float(), out.text_features.float(), out.logit_scale.float(), bias)
        if self.caption_weight:
            loss = loss + self.caption_weight * caption_loss(out.logits.float(), out.labels, self.pad_id)
        return loss

    def _loss_with_negatives(self, images: torch.Tensor, tokens: torch.Tensor, negatives: torch.Tensor,
                             mask: torch.Tensor) -> torch.Tensor:
        b, k, _ = negatives.shape
        with autocast(self.precision, self.device):  # the real copies only: captions have few or many
            out = self.model(images, torch.cat([tokens, negatives[mask]]))
        txt = out.text_features.float()
        copies = txt.new_zeros(b, k, txt.shape[1])
        copies[mask] = txt[b:]
        return clip_loss_with_negatives(out.image_features.float(), txt[:b], copies, mask, out.logit_scale.float())

    def _backward(self, loss: torch.Tensor) -> torch.Tensor:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def _update(self, loss: torch.Tensor, stop: bool) -> StepResult:
        for p in self.replicated:  # FSDP only: what DDP would have averaged
            if p.grad is not None:
                p.grad = all_reduce_sum(p.grad) / self.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gnorm = self.clip().float()
        asked = torch.tensor(1.0 if stop else 0.0, device=loss.device)
        flags = torch.stack([loss.float(), (~torch.isfinite(loss)).float(), (~torch.isfinite(gnorm)).float(),
                             asked, gnorm])  # [5]
        loss_sum, bad_loss, bad_grad, stops, gnorm_sum = all_reduce_sum(flags).tolist()  # the step's host sync
        # fp16: an overflowing gradient is the scaler's business (it skips and lowers the scale)
        bad = bad_loss > 0 or (bad_grad > 0 and self.scaler is None)
        if not bad:
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
        return StepResult(loss=loss_sum / self.world_size, grad_norm=gnorm_sum / self.world_size,
                          applied=not bad, stop=stops > 0)

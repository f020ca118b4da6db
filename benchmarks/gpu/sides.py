"""The two sides of the training comparisons: one optimisation step of clipforge and of OpenCLIP
on the same architecture, weights and inputs, as ``bench_train_step.py`` defines them (the same
step closures, taking the batch as arguments so that the largest-batch search can vary it):

  clipforge   ``clipforge.CLIP``, ``ContrastiveLoss``, ``train.optim.build_optimizer`` (fused AdamW)
  open_clip   ``open_clip.CLIP`` built from the same config with clipforge's weights copied in
              (``common.openclip_twin``), ``open_clip.loss.ClipLoss``, ``torch.optim.AdamW`` with
              open_clip_train's parameter groups and default implementation, the logit-scale clamp

Both: zero the gradients, forward under bf16 autocast, the loss in fp32, backward, AdamW step, no
gradient clipping. Captions are 10-30 tokens (start and end included) padded to the context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# isort: off
import stagelib  # noqa: F401 - first: puts benchmarks/ on sys.path for the two imports below
import bench_train_step as bts
from common import openclip_twin
# isort: on

CAPTION_TOKENS = (10, 30)  # alt-text captions, as bench_train_step.py and bench_memory.py draw them
LR = 1e-5


@dataclass
class Side:
    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, tokens) -> loss
    extra: dict = field(default_factory=dict)

    def resident(self) -> list[torch.Tensor]:
        """Parameters, buffers and optimizer state: what stays allocated between steps."""
        out = [*self.model.parameters(), *self.model.buffers()]
        for st in self.opt.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out


def amp(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def clipforge_side(model, device: torch.device, precision: str) -> Side:
    from clipforge.train.config import OptimConfig
    from clipforge.train.loss import ContrastiveLoss
    from clipforge.train.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr=LR, weight_decay=0.2))
    loss_fn = ContrastiveLoss()

    def step(images, tokens):
        opt.zero_grad(set_to_none=True)
        with amp(device, precision):
            out = model(images, tokens)
        loss = loss_fn(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
        loss.backward()
        opt.step()
        return loss.detach()

    fused = all(g.get("fused") for g in opt.param_groups)
    return Side("clipforge", model, opt, step, {"fused_adamw": bool(fused)})


def openclip_side(ref, device: torch.device, precision: str) -> Side:
    from open_clip.loss import ClipLoss

    opt = bts.openclip_optimizer(ref, LR, 0.2, fused=False)
    loss_fn = ClipLoss()

    def step(images, tokens):
        opt.zero_grad(set_to_none=True)
        with amp(device, precision):
            img, txt, scale = ref(images, tokens)
        loss = loss_fn(img.float(), txt.float(), scale.float())
        loss.backward()
        opt.step()
        with torch.no_grad():  # as open_clip_train does after every step
            ref.logit_scale.clamp_(0, 4.6052)
        return loss.detach()

    return Side("open_clip", ref, opt, step)


def build_models(name: str, with_open_clip: bool, seed: int = 0):
    """(config, clipforge model, OpenCLIP twin or None), both on the CPU in train mode."""
    import clipforge

    cfg = bts.clipforge_config(name)
    torch.manual_seed(seed)
    ours = clipforge.create_model(cfg).train()
    ref = openclip_twin(ours).train() if with_open_clip else None
    return cfg, ours, ref


def inputs(cfg, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [B, 3, S, S] and caption tokens [B, context] on ``device``."""
    s = cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, s, s, generator=g)
    tokens = bts.caption_tokens(batch, CAPTION_TOKENS, cfg.text.context_length, cfg.text.vocab_size, seed)
    return images.to(device), tokens.to(device)


def train_flops(model, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Training FLOPs per step, 3 x forward (``bench_train_step.step_flops``): of the work clipforge
    computes, and of the full computation (every position, every padded text token)."""
    return bts.step_flops(model, images, tokens)

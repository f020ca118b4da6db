"""AdamW with CLIP's weight-decay exclusions, and learning-rate schedules.

Decay is skipped for gains and biases (every tensor with fewer than two dimensions), the
embeddings (token, positional, class) and the temperature: shrinking those towards zero
has no regularising meaning, and decaying the logit scale fights the loss.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from clipforge.train.config import ConfigError, OptimConfig, ScheduleConfig
from clipforge.train.sparse_rows import RowAdamW, sparse_tables

_NO_DECAY_NAMES = ("embedding", "logit_scale", "logit_bias")


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter, by name and shape, receives weight decay."""
    return param.ndim >= 2 and not any(k in name for k in _NO_DECAY_NAMES)


def _is_dtensor(p: torch.Tensor) -> bool:
    return type(p).__name__ == "DTensor" or type(getattr(p, "data", p)).__name__ == "DTensor"


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Decayed and non-decayed groups; under FSDP sharded (DTensor) and replicated parameters
    go to separate groups, since the multi-tensor kernels cannot mix the two."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named_params:
        if p.requires_grad:
            groups.setdefault((decays(name, p), _is_dtensor(p)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0}
            for (decay, _), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with the fused (single-kernel) implementation
    when all parameters share one CUDA or CPU device: one kernel instead of one per tensor."""
    if cfg.sparse_embeddings:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise ConfigError("sparse_embeddings is for single-process training (DDP/FSDP reduce dense gradients)")
        try:
            sparse_tables(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    devices = {p.device for p in params}
    fused = len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu") and not any(
        _is_dtensor(p) or not p.is_floating_point() for p in params)
    # RowAdamW: AdamW that also takes the sparse gradient of a token table (cfg.sparse_embeddings)
    kind = RowAdamW if cfg.sparse_embeddings else torch.optim.AdamW
    return kind(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True if fused else None)


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int | None) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps  # linear, reaching 1 at the last warm-up step
    if cfg.kind == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"the {cfg.kind} schedule needs a known run length (give steps)")
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # constant-cooldown: flat, then a linear decay to the floor over the last cooldown steps
    cooldown = cfg.cooldown_steps or max(1, total_steps // 5)
    start = max(cfg.warmup_steps, total_steps - cooldown)
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
    return floor + (1.0 - floor) * (1.0 - progress)


class LrSchedule:
    """Sets each group's learning rate as a pure function of the step, so its whole
    state is the step count (exact on resume)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int | None) -> None:
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        lr_factor(0, cfg, total_steps)  # fail early when the schedule needs a run length
        self.step_count = 0
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Apply the learning rate of optimizer step ``step``."""
        self.step_count = step
        f = lr_factor(step, self.cfg, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "kind": self.cfg.kind, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_step(int(state["step"]))

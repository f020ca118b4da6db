"""Small helpers shared across the library: device and precision selection."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(precision: Precision, device: torch.device) -> ContextManager:
    """Mixed-precision context for a forward pass; fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)

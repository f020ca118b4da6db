"""Small helpers shared across the library: device and precision selection."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX): there bf16
    autocast trains faster than fp32; elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except Exception:  # noqa: BLE001 - a private probe; no answer means no
        return False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def autocast_casts_kept(precision: Precision, device: torch.device) -> ContextManager:
    """Keeps the weight casts of the ``autocast`` contexts opened inside it until it closes (autocast
    itself stays off here). Autocast casts each weight once per outermost context, so a context per
    batch would cast every weight again each batch; only for frozen weights (inference loops)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def autocast(precision: Precision, device: torch.device) -> ContextManager:
    """Mixed-precision context for a forward pass; fp32 is a no-op."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)

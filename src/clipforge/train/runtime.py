"""Process-level helpers of the trainer: precision, CPU threads and memory, and collectives on Python objects."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any, Callable

import torch
import torch.distributed as dist

from clipforge.train.distributed import DistInfo
from clipforge.utils import usable_cpus


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def configure_threads(device: torch.device, workers: int) -> None:
    """On CPU, give the compute threads the cores that the data workers and the other
    processes of this node leave free (OMP_NUM_THREADS, when set, decides instead).

    Over-subscription is far worse than idling: OpenMP threads spin while they wait."""
    if device.type != "cpu":
        return
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        return
    cores = usable_cpus()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (cores - workers * local_world) // local_world))


def reuse_freed_memory(limit: int = 1 << 30) -> bool:
    """Have glibc serve allocations under ``limit`` bytes from its heap and keep freed memory
    there for the next step, instead of mapping fresh pages for every large tensor and unmapping
    them when freed. A CPU training step allocates the same activations every step, and each
    fresh page costs a fault and a zeroing (figures: benchmarks/demo/RESULTS.md).
    Process-wide and lasting, so only CPU training calls it. Returns False where the C library
    has no ``mallopt``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def install_sigterm_handler(request_stop: Callable[[], None]) -> dict[int, Any]:
    """SIGTERM (SLURM preemption, torchrun shutdown) asks the run to checkpoint at the next step
    and stop. Returns the previous handlers, for the caller to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: request_stop())}

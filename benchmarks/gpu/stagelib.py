"""What the stages of the GPU check share: their arguments, their time budget, the targets they
judge, the profile they take when a target is missed, memory figures, and the result file each
stage leaves for ``run.py`` to gather.

A stage is a script run in its own process (a CUDA error, an out-of-memory state or a hang stays
in that process, and ``run.py`` can kill it at its time cap). It writes one JSON object:

    {"status": "ok" | "failed", "error": str | null, "seconds": float,
     "device_info": {...}, "figures": {name: number}, "targets": [target, ...], ...details}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

GPU_DIR = Path(__file__).resolve().parent
BENCH_DIR = GPU_DIR.parent
ROOT = BENCH_DIR.parent
for _p in (BENCH_DIR, GPU_DIR):  # common.py and the bench_*.py helpers, then this folder
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16 (benchmarks/README.md's method)
MIB = 2**20


def stage_args(doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: every stage in seconds (the CPU test)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="seconds this stage may use (run.py kills it later)")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="peak dense bf16 TFLOP/s, for MFU")
    ap.add_argument("--out", type=Path, required=True, help="the stage's result file (JSON)")
    if extra:
        extra(ap)
    args = ap.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cpu":
        torch.set_num_threads(1)  # a shared machine: one thread per side, as the CPU benchmarks run
    return args


class Deadline:
    """The stage's own clock: stages stop adding repetitions or probes when it runs out, so that
    they end with figures before run.py's hard cap kills them without any."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def open_clip_missing(import_it: bool = True) -> str | None:
    """None when open_clip imports, else why not (the OpenCLIP side is then recorded as skipped).
    ``import_it=False`` only looks for the package: for a stage that runs OpenCLIP in another
    process, where importing it here would cost seconds for nothing."""
    if not import_it:
        import importlib.util

        return None if importlib.util.find_spec("open_clip") else \
            "open_clip is not installed; install it from the wheels folder (fetch_wheels.sh)"
    try:
        import open_clip  # noqa: F401 - importable is what is asked
    except Exception as e:  # noqa: BLE001 - any import failure means the same: no reference side
        return f"open_clip is not importable ({type(e).__name__}: {e}); install it from the wheels folder"
    return None


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_mib=round(p.total_memory / MIB), multiprocessors=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
    else:
        from common import cpu_name

        info["name"] = f"cpu ({cpu_name()})"
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return freed blocks to the device, so the next model or batch finds them (CUDA only: a
    full garbage collection costs ~0.1 s a call, and a CPU allocator needs no help)."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def sig(x: float | None, digits: int = 4) -> float | None:
    """A figure rounded to significant digits, so a tiny CPU MFU stays a non-zero number."""
    return None if x is None else float(f"{x:.{digits}g}")


# name: (stage, threshold, unit, what is compared); a figure >= threshold meets the target
TARGETS = {
    "vit_b32_speedup": ("train", 1.5, "x", "ViT-B-32 training samples/s, clipforge / OpenCLIP"),
    "vit_b16_mfu": ("train", 0.40, "fraction", "ViT-B-16 training MFU of clipforge"),
    "vit_b16_largest_batch": ("largest_batch", 2.0, "x", "largest ViT-B-16 training batch, clipforge / OpenCLIP"),
    "embed_speedup": ("embed", 2.0, "x", "ViT-B-32 JPEG-file embedding images/s, clipforge embed / OpenCLIP script"),
}


def target(name: str, value: float | None, measured_on: str, why_none: str = "") -> dict:
    """Target ``name`` judged on ``value``: ``met`` is None when the figure could not be measured
    (``reason`` says why). ``measured_on``: the architecture that played the part (--quick: a tiny one)."""
    _, threshold, unit, what = TARGETS[name]
    t = {"name": name, "what": what, "measured_on": measured_on, "value": sig(value), "threshold": threshold,
         "unit": unit, "met": None if value is None else bool(value >= threshold)}
    if value is None:
        t["reason"] = why_none or "not measured"
    return t


def top_ops(fn: Callable[[], object], device: torch.device, calls: int = 3, memory: bool = False,
            rows: int = 15, sort_by: str | None = None) -> str:
    """torch.profiler's table of the ops (and, on CUDA, kernels) that took the most device time
    (or, with ``memory``, allocated the most) over ``calls`` calls of ``fn``, after one warm call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=memory) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if sort_by:
        key = sort_by
    elif memory:
        key = "self_cuda_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    else:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors`` (a view is counted with its base)."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def step_memory(step: Callable[[], object], device: torch.device, resident: list[torch.Tensor]) -> dict:
    """MiB of one training step: ``resident`` (the side's parameters, optimizer state and
    inputs), the peak rise over what was allocated before the step (activations, gradients,
    temporaries), and their sum. CUDA: the caching allocator's counters; CPU: live tensor bytes
    (bench_memory.LiveBytes), since a process's resident size there says little about one step."""
    state = tensor_bytes(resident)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        rise = torch.cuda.max_memory_allocated(device) - before
    else:
        from bench_memory import LiveBytes

        with LiveBytes(resident) as tracker:
            step()
        rise = tracker.peak - tracker.start
    return {"resident_mib": round(state / MIB, 1), "step_rise_mib": round(rise / MIB, 1),
            "peak_mib": round((state + rise) / MIB, 1)}


def run_stage(main: Callable[[argparse.Namespace, dict], None], args: argparse.Namespace) -> None:
    """Run ``main(args, result)``, which fills ``result``; write the result file whatever happens
    (a failure keeps the figures measured before it, and its error), and print a summary line."""
    t0 = time.perf_counter()
    result: dict = {"status": "ok", "error": None, "figures": {}, "targets": []}
    try:
        result["device_info"] = device_info(args.device)
        main(args, result)
    except BaseException as e:  # noqa: BLE001 - recorded, then the exit code says it failed
        result["status"] = "failed"
        lines = traceback.format_exception(e)
        result["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
        result["traceback"] = "".join(lines)[-4000:]
        traceback.print_exception(e)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, args.out)
    print(f"stage {args.out.stem}: {result['status']} in {result['seconds']} s "
          f"{json.dumps(result['figures'])}", flush=True)
    sys.exit(0 if result["status"] == "ok" else 1)

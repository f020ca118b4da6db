"""Stage: the largest ViT-B-16 training batch each library fits on the device (bf16 autocast,
captions of 10-30 tokens, each library's own step as in sides.py), and the peak memory of
both at batch 256.

A batch fits when two steps run (the second with the optimizer state already allocated: the
steady state of a run) without an out-of-memory error. The search doubles from --start, then
bisects until the interval is within 1/32 of the batch found (multiples of 8), each library
alone on the device. It stops early when its share of the stage's time is spent: the figure is
then a lower bound (``bounded_by_time``). Target: clipforge's largest batch >= 2x OpenCLIP's.
Where it is missed, the profiler's table of the ops that allocate the most is recorded.

--quick: ``nano`` stands in for ViT-B-16 on the CPU, where nothing runs out of memory: a batch
"fits" when the step's peak live tensor bytes stay under --cap-mib (bench_memory.LiveBytes).
"""

from __future__ import annotations

import torch

# isort: off
from stagelib import MIB, Deadline, free_memory, open_clip_missing, run_stage, stage_args, step_memory, sync, \
    target, top_ops  # first: puts benchmarks/ on sys.path
import sides as S
# isort: on


def extra_args(ap) -> None:
    ap.add_argument("--cap-mib", type=float, default=85.0, help="CPU: live tensor memory a batch must fit in")


def fits(side: S.Side, cfg, batch: int, device: torch.device, cap_mib: float) -> float | None:
    """Peak MiB of a steady-state step at ``batch``, or None when it does not fit."""
    peak = None
    try:
        images, tokens = S.inputs(cfg, batch, device)
        if device.type == "cuda" or not side.opt.state:
            side.step(images, tokens)  # the optimizer state, and on CUDA the allocator's warm state
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            side.step(images, tokens)
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) / MIB
        else:
            peak = step_memory(lambda: side.step(images, tokens), device,
                               side.resident() + [images, tokens])["peak_mib"]
            peak = peak if peak <= cap_mib else None
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # cuBLAS and cuDNN report a failed workspace allocation as a RuntimeError of their own
        if not isinstance(e, torch.OutOfMemoryError) and not any(
                s in str(e) for s in ("out of memory", "ALLOC_FAILED", "ALLOCATION_FAILED")):
            raise
        peak = None
    side.opt.zero_grad(set_to_none=True)
    images = tokens = None
    free_memory(device)  # outside the handler: the traceback no longer holds the step's tensors
    return peak


def search(probe, start: int, deadline: Deadline, stop_at: float, max_batch: int, fraction: int = 32) -> dict:
    """Doubling from ``start``, then bisection in multiples of 8, until the interval is within
    1/``fraction`` of the batch found or the clock reaches ``stop_at`` seconds of the stage."""
    probes: dict[int, float | None] = {}

    def ok(b: int) -> bool:
        probes[b] = probe(b)
        return probes[b] is not None

    def time_left() -> bool:
        return deadline.elapsed() < stop_at

    lo, hi = 0, start
    while hi <= max_batch and time_left() and ok(hi):
        lo, hi = hi, hi * 2
    failed = hi <= max_batch and probes.get(hi, 0) is None
    while failed and time_left() and hi - lo > max(8, lo // fraction):
        mid = (lo + hi) // 16 * 8
        if mid <= lo:
            break
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return {"largest_batch": lo, "smallest_failing": hi if failed else None,
            "peak_mib_at_largest": round(probes[lo], 1) if lo else None,
            "bounded_by_time": not time_left(), "probes_mib": {str(b): None if v is None else round(v, 1)
                                                               for b, v in sorted(probes.items())}}


def main(args, result: dict) -> None:
    deadline = Deadline(args.budget_s)
    device = args.device
    arch = "nano" if args.quick else "ViT-B-16"
    start, max_batch, ref_batch, fraction = (64, 1024, 8, 2) if args.quick else (256, 65536, 256, 32)
    missing = open_clip_missing()
    cfg, ours, ref = S.build_models(arch, missing is None)
    models = {"clipforge": ours} if ref is None else {"clipforge": ours, "open_clip": ref}
    result.update(arch=arch, stands_for="ViT-B-16", precision="bf16", sides={})
    if ref is None:
        result["sides"]["open_clip"] = {"status": "skipped", "reason": missing}
    profiles = {}
    for i, (name, model) in enumerate(models.items()):
        model.to(device)
        side = (S.clipforge_side if name == "clipforge" else S.openclip_side)(model, device, "bf16")
        stop_at = deadline.elapsed() + (deadline.left() - 10) / (len(models) - i)  # 10 s kept for a profile
        res = search(lambda b, s=side: fits(s, cfg, b, device, args.cap_mib), start, deadline, stop_at,
                     max_batch, fraction)
        res[f"peak_mib_at_{ref_batch}"] = fits(side, cfg, ref_batch, device, float("inf"))
        profiles[name] = side
        result["sides"][name] = res
        result["figures"][f"{name}_largest_batch"] = res["largest_batch"]
        if res[f"peak_mib_at_{ref_batch}"] is not None:
            result["figures"][f"{name}_peak_mib_at_{ref_batch}"] = round(res[f"peak_mib_at_{ref_batch}"], 1)
        model.to("cpu")  # the other library gets the whole device
        side.opt.state.clear()
        free_memory(device)
    base = result["sides"].get("open_clip", {}).get("largest_batch")
    ratio = result["sides"]["clipforge"]["largest_batch"] / base if base else None
    if ratio is not None:
        result["figures"]["largest_batch_vs_open_clip"] = round(ratio, 3)
    why = missing or ("OpenCLIP fits no batch" if base == 0 else "")
    t = target("vit_b16_largest_batch", ratio, arch, why)
    if t["met"] is False and deadline.left() > 5:
        t["profile"] = {}
        for name, model in models.items():  # one library on the device at a time, as measured
            model.to(device)
            images, tokens = S.inputs(cfg, ref_batch, device)
            t["profile"][name] = top_ops(lambda s=profiles[name], x=images, y=tokens: s.step(x, y), device,
                                         calls=1, memory=True)
            model.to("cpu")
            profiles[name].opt.state.clear()
            del images, tokens
            free_memory(device)
    result["targets"].append(t)


if __name__ == "__main__":
    run_stage(main, stage_args(__doc__, extra_args))

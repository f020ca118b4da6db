"""Peak memory and step time of the contrastive loss: plain, tiled, and OpenCLIP's ClipLoss.

    .venv/bin/python benchmarks/bench_loss_memory.py [--sizes 4096 8192 16384] [--dim 512] [--tile 1024]

One "step" = loss forward + backward w.r.t. both feature sets and the logit scale (fp32, one
process, features [N, D] already L2-normalised). Memory, two honest measures per (method, N):
  peak    CPU: the rise of the process's peak resident memory (VmHWM, reset through
          /proc/self/clear_refs) over one step, in a fresh subprocess (after one warm-up step at
          N=1024, so that thread pools are not counted and no larger run's memory is reused); GPU: torch.cuda.max_memory_allocated above the inputs.
  saved   bytes autograd keeps between forward and backward (saved_tensors_hooks, storages
          counted once): the part of the memory that grows with N^2 for the plain losses.
Time: after a warm-up, A B C / C B A alternating repetitions, medians; ratios against OpenCLIP.
All three compute the same loss: values and gradients are compared and recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, save_record  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F

METHODS = ("openclip", "plain", "tiled")
MB = 2**20


def make_inputs(n: int, d: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shared = torch.randn(n, d, generator=g)
    img = F.normalize(shared + torch.randn(n, d, generator=g), dim=-1).to(device).requires_grad_()
    txt = F.normalize(shared + torch.randn(n, d, generator=g), dim=-1).to(device).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device).requires_grad_()  # CLIP's initial temperature
    return img, txt, scale


def loss_fn(method: str, tile: int):
    from clipforge.train.loss import clip_loss, tiled_clip_loss

    if method == "openclip":
        from open_clip.loss import ClipLoss

        return ClipLoss()
    if method == "plain":
        return clip_loss
    return lambda a, b, s: tiled_clip_loss(a, b, s, tile)


def step(fn, img, txt, scale) -> torch.Tensor:
    for t in (img, txt, scale):
        t.grad = None
    loss = fn(img, txt, scale)
    loss.backward()
    return loss.detach()


def saved_bytes(fn, img, txt, scale) -> int:
    """Bytes of the distinct storages autograd saves for backward while building the graph."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(img, txt, scale)
    inputs = {t.untyped_storage().data_ptr() for t in (img, txt, scale)}  # exist anyway, not extra
    loss.backward()
    return sum(b for p, b in storages.items() if p not in inputs)


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def child(method: str, n: int, d: int, tile: int) -> None:
    """One step in a fresh process; prints JSON {peak_mb, saved_mb}."""
    fn = loss_fn(method, tile)
    step(fn, *make_inputs(min(n, 1024), d, torch.device("cpu")))  # one-time costs: thread pools, kernels
    img, txt, scale = make_inputs(n, d, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark to the current RSS
        f.write("5")
    before = _vm_hwm_kb()
    step(fn, img, txt, scale)
    peak = _vm_hwm_kb() - before
    saved = saved_bytes(fn, img, txt, scale)
    print(json.dumps({"peak_mb": peak / 1024, "saved_mb": saved / MB}))


def measure_memory(method: str, n: int, d: int, tile: int, device: torch.device) -> dict:
    if device.type == "cuda":
        img, txt, scale = make_inputs(n, d, device)
        fn = loss_fn(method, tile)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, img, txt, scale)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / MB
        return {"peak_mb": peak, "saved_mb": saved_bytes(fn, img, txt, scale) / MB}
    cmd = [sys.executable, __file__, "--child", method, str(n), "--dim", str(d), "--tile", str(tile)]
    cmd += ["--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_size(n: int, d: int, tile: int, reps: int, device: torch.device) -> dict:
    img, txt, scale = make_inputs(n, d, device)
    fns = {m: loss_fn(m, tile) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    values, grads = {}, {}
    for rep in range(reps):
        for m in METHODS if rep % 2 == 0 else METHODS[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            values[m] = step(fns[m], img, txt, scale)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[m].append(time.perf_counter() - t0)
            grads[m] = [t.grad.clone() for t in (img, txt, scale)]
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "reps": reps,
        "seconds": {m: [round(t, 3) for t in v] for m, v in times.items()},
        "median_s": {m: round(v, 3) for m, v in med.items()},
        "time_ratio_vs_openclip": {m: round(med[m] / med["openclip"], 2) for m in METHODS},
        "loss": float(values["openclip"]),
        "max_abs_diff_vs_openclip": {
            m: {
                "loss": float((values[m] - values["openclip"]).abs()),
                "grads": max(float((a - b).abs().max()) for a, b in zip(grads[m], grads["openclip"])),
            }
            for m in ("plain", "tiled")
        },
    }


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "src/clipforge/train/loss.py"])
        return out.stdout.strip() + (" + uncommitted loss.py changes" if dirty.returncode else "")
    except OSError:
        return "unknown"



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--reps", type=int, nargs="+", default=[3, 2, 1], help="repetitions per size (the last value repeats)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child[0], int(args.child[1]), args.dim, args.tile)

    import open_clip

    from clipforge.utils import resolve_device

    device = resolve_device(args.device)
    img, txt, scale = make_inputs(1024, args.dim, device)
    for m in METHODS:  # warm-up: thread pools, allocator, kernels
        step(loss_fn(m, args.tile), img, txt, scale)

    results = {}
    for i, n in enumerate(args.sizes):
        reps = args.reps[min(i, len(args.reps) - 1)]
        r = time_size(n, args.dim, args.tile, reps, device)
        r["memory_mb"] = {m: measure_memory(m, n, args.dim, args.tile, device) for m in METHODS}
        r["logits_matrix_mb"] = n * n * 4 / MB  # one fp32 [N, N] matrix, for scale
        results[str(n)] = r
        print(f"\nN={n}  D={args.dim}  tile={args.tile}  ({reps} reps, one fp32 NxN = {r['logits_matrix_mb']:.0f} MB)")
        print(f"{'method':9} {'median s':>9} {'vs OpenCLIP':>12} {'peak MB':>9} {'saved MB':>9}")
        for m in METHODS:
            mem = r["memory_mb"][m]
            print(
                f"{m:9} {r['median_s'][m]:>9.3f} {r['time_ratio_vs_openclip'][m]:>11.2f}x "
                f"{mem['peak_mb']:>9.1f} {mem['saved_mb']:>9.1f}"
            )
        print("max |diff| vs OpenCLIP:", r["max_abs_diff_vs_openclip"])

    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "benchmark": "loss_memory",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "code": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "setup": f"fp32 features [N, {args.dim}], L2-normalised, scale 1/0.07; step = loss forward + backward "
        f"w.r.t. both feature sets and the scale; tiled: tile {args.tile}",
        "method": "warm-up at N=1024, then alternating A B C / C B A repetitions per N, medians; "
        + (
            "memory: peak RSS rise over one step (VmHWM reset via /proc/self/clear_refs) "
            "in a fresh subprocess, after a warm-up step at N<=1024"
            if device.type == "cpu"
            else "memory: torch.cuda.max_memory_allocated above the inputs"
        )
        + "; saved = distinct storages autograd keeps for backward (inputs excluded)",
        "results": results,
    }
    path = save_record(record, f"loss_memory-{device.type}", args.out, now)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

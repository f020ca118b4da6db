"""Peak training memory and the largest batch that fits, ViT-B-16, clipforge against OpenCLIP,
with and without gradient checkpointing and the tiled contrastive loss.

    .venv/bin/python benchmarks/bench_memory.py                       # CPU analogue, 8 GiB cap
    .venv/bin/python benchmarks/bench_memory.py --cap-gb 16 --validate-batch 0
    .venv/bin/python benchmarks/bench_memory.py --device cuda --precision bf16   # real, on a GPU

One step = forward both towers, contrastive loss, backward, AdamW step (each library's own
optimizer: fused for clipforge, OpenCLIP's default for OpenCLIP), with the optimizer state
already allocated (a second step: the steady state of a run). Captions are 10-30 tokens.

GPU: measured. Peak = ``torch.cuda.max_memory_allocated`` over one step; the largest batch
is searched by doubling then bisection (multiples of 8), an out-of-memory error = does not fit.

CPU: a ViT-B-16 step costs ~2 s per sample here, so a batch search by real runs is out of
reach. The search runs the exact same step on fake tensors instead (``FakeTensorMode``: the
CPU kernels' output shapes and dtypes, no arithmetic) under a dispatch mode that adds up the
bytes of every live tensor storage (each storage counted once, freed when its last tensor
dies): the peak of live tensor bytes, which is what an allocator must at least provide. That
simulated figure is checked against a real one-step run at ``--validate-batch`` in a fresh
process: the same live-tensor accounting on real tensors, and the rise of peak resident memory
(VmHWM reset through /proc/self/clear_refs), which adds the allocator's own overhead.
Reported as simulated (CPU) or measured (GPU and validation), never mixed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, reset_peak_rss, vm_hwm_kb, vm_rss_kb, write_record  # noqa: E402

CONFIGS = {  # name: (library, gradient checkpointing, tiled loss)
    "open_clip": ("open_clip", False, False),
    "open_clip+ckpt": ("open_clip", True, False),
    "clipforge": ("clipforge", False, False),
    "clipforge+ckpt": ("clipforge", True, False),
    "clipforge+ckpt+tiled": ("clipforge", True, True),
}
MB = 2**20


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages created by the ops run under this mode (each storage once,
    released when Python frees its last reference), plus those of ``existing`` tensors."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        for t in existing:
            self._add(t)
        self.start = self.live

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs:
            return
        n = st.nbytes()

        def gone(_, key=key, n=n):
            self.live -= n
            self._refs.pop(key, None)

        self._refs[key] = weakref.ref(st, gone)  # storages keep their Python object while alive
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def caption_tokens(batch: int, context: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.zeros(batch, context, dtype=torch.long)
    for i, k in enumerate(torch.randint(10, 31, (batch,), generator=g).tolist()):
        tok[i, 0] = 49406
        tok[i, 1 : k - 1] = torch.randint(256, 49406, (k - 2,), generator=g)
        tok[i, k - 1] = 49407
    return tok


class Setup:
    """Model, optimizer and loss of one configuration; ``step(batch)`` runs one training step."""

    def __init__(self, name: str, args, device: torch.device, fake: bool) -> None:
        from open_clip.loss import ClipLoss

        from clipforge.model.clip import CLIP
        from clipforge.model.registry import get_config
        from clipforge.train.config import OptimConfig
        from clipforge.train.loss import ContrastiveLoss
        from clipforge.train.optim import build_optimizer

        lib, ckpt, tiled = CONFIGS[name]
        self.lib, self.fake, self.device, self.args = lib, fake, device, args
        cfg = get_config(args.model)
        self.cfg = cfg
        if lib == "clipforge":
            self.model = CLIP(cfg).to(device) if device.type != "cpu" else CLIP(cfg)  # fake tensors refuse .to
            self.opt = build_optimizer(self.model, OptimConfig())
            self.loss = ContrastiveLoss(tile_size=args.tile if tiled else None)
        else:
            import open_clip

            from clipforge.model.interop.openai import config_to_openclip

            oc = config_to_openclip(cfg)["model_cfg"]
            self.model = open_clip.model.CLIP(embed_dim=oc["embed_dim"], vision_cfg=oc["vision_cfg"],
                                              text_cfg=oc["text_cfg"], quick_gelu=oc["quick_gelu"])
            if device.type != "cpu":
                self.model.to(device)
            params = list(self.model.named_parameters())
            excl = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
            self.opt = torch.optim.AdamW([{"params": [p for n, p in params if excl(n, p)], "weight_decay": 0.0},
                                          {"params": [p for n, p in params if not excl(n, p)], "weight_decay": 0.2}],
                                         lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
            self.loss = ClipLoss()
        self.model.train()
        if ckpt:
            self.model.set_grad_checkpointing(True)

    def inputs(self, batch: int, mode=None):
        """(images, tokens); with a FakeTensorMode ``mode``, as fake tensors (made outside it:
        the captions' lengths are data)."""
        s = self.cfg.vision.image_size
        tokens = caption_tokens(batch, self.cfg.text.context_length)
        if mode is None:
            return torch.randn(batch, 3, s, s, device=self.device), tokens.to(self.device)
        if self.lib == "clipforge":
            # Fake tensors hold no values, so the data-dependent trim cannot run: give the text
            # tower the batch already cut after its longest caption, as trimming would.
            self.model.text.trim_padding = False
            tokens = tokens[:, : int((tokens > 0).sum(1).max())]
        with mode:
            return torch.empty(batch, 3, s, s), mode.from_tensor(tokens)

    def step(self, images, tokens) -> None:
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.args.precision == "bf16"
               else contextlib.nullcontext())
        with amp:
            out = self.model(images, tokens)
        if self.lib == "clipforge":
            loss = self.loss(out.image_features.float(), out.text_features.float(), out.logit_scale.float())
        else:
            loss = self.loss(out[0].float(), out[1].float(), out[2].float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_tensors(self):
        yield from self.model.parameters()
        yield from self.model.buffers()
        for st in self.opt.state.values():
            yield from (v for v in st.values() if isinstance(v, torch.Tensor))


def simulated_peak(setup: Setup, mode, batch: int) -> dict:
    """Peak live tensor bytes over one steady-state step, on fake tensors (see module doc)."""
    images, tokens = setup.inputs(batch, mode)
    with mode:
        if not setup.opt.state:
            setup.step(images, tokens)  # allocate the optimizer state once
        with LiveBytes([*setup.state_tensors(), images, tokens]) as tracker:
            setup.step(images, tokens)
    return {"batch": batch, "peak_mb": round(tracker.peak / MB, 1), "state_mb": round(tracker.start / MB, 1),
            "step_rise_mb": round((tracker.peak - tracker.start) / MB, 1)}


def cpu_largest_batch(name: str, args) -> dict:
    """Largest multiple of 8 whose simulated peak fits the cap: an affine fit of peak(batch)
    through two probes predicts it, probes either side of the prediction confirm it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    t0 = time.perf_counter()
    with mode:
        setup = Setup(name, args, torch.device("cpu"), fake=True)
    cap = args.cap_gb * 1024
    probes = {b: simulated_peak(setup, mode, b) for b in (8, 64)}
    slope = (probes[64]["peak_mb"] - probes[8]["peak_mb"]) / 56
    guess = max(8, int((cap - probes[8]["peak_mb"]) / slope + 8) // 8 * 8)
    fits = lambda b: (probes.setdefault(b, simulated_peak(setup, mode, b)))["peak_mb"] <= cap  # noqa: E731
    b = guess
    while b > 8 and not fits(b):
        b -= 8
    while fits(b + 8):
        b += 8
    largest = b if fits(b) else 0
    return {"largest_batch": largest, "peak_mb_at_largest": probes[largest]["peak_mb"] if largest else None,
            "mb_per_sample": round(slope, 2), "probes": [probes[k] for k in sorted(probes)],
            "search_s": round(time.perf_counter() - t0, 1)}


def measured_cpu_step(name: str, batch: int, args) -> dict:
    """Real one-step peak-RSS rise in this (fresh) process, after a warm-up step."""
    torch.manual_seed(0)
    setup = Setup(name, args, torch.device("cpu"), fake=False)
    images, tokens = setup.inputs(batch)
    setup.step(images, tokens)  # optimizer state, thread pools, allocator
    before = vm_rss_kb()
    reset_peak_rss()
    t0 = time.perf_counter()
    with LiveBytes([*setup.state_tensors(), images, tokens]) as tracker:  # the same accounting, real tensors
        setup.step(images, tokens)
    return {"batch": batch, "rss_rise_mb": round((vm_hwm_kb() - before) / 1024, 1),
            "live_tensor_rise_mb": round((tracker.peak - tracker.start) / MB, 1),
            "step_s": round(time.perf_counter() - t0, 2)}


def validate(name: str, args) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cmd = [sys.executable, __file__, "--child", name, str(args.validate_batch), "--model", args.model,
           "--tile", str(args.tile)]
    real = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        setup = Setup(name, args, torch.device("cpu"), fake=True)
    sim = simulated_peak(setup, mode, args.validate_batch)
    return {"measured": real, "simulated": sim,
            "simulated_over_real_live_tensors": round(sim["step_rise_mb"] / max(real["live_tensor_rise_mb"], 1e-9), 3),
            "simulated_over_real_rss": round(sim["step_rise_mb"] / max(real["rss_rise_mb"], 1e-9), 3)}


def gpu_peak(setup: Setup, batch: int) -> float | None:
    """Measured peak MB of one steady-state step, or None when it runs out of memory."""
    try:
        images, tokens = setup.inputs(batch)
        setup.step(images, tokens)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        setup.step(images, tokens)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MB
    except torch.OutOfMemoryError:
        return None
    finally:
        setup.opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def gpu_largest_batch(name: str, args, device) -> dict:
    setup = Setup(name, args, device, fake=False)
    probes = {}
    lo, hi = 0, 8
    while (p := gpu_peak(setup, hi)) is not None:
        probes[hi] = round(p, 1)
        lo, hi = hi, hi * 2
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        p = gpu_peak(setup, mid)
        probes[mid] = None if p is None else round(p, 1)
        lo, hi = (mid, hi) if p is not None else (lo, mid)
    ref = gpu_peak(setup, args.ref_batch)
    del setup
    torch.cuda.empty_cache()
    return {"largest_batch": lo, "peak_mb_at_largest": probes.get(lo), f"peak_mb_at_{args.ref_batch}": ref,
            "probes_mb": {str(k): v for k, v in sorted(probes.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--cap-gb", type=float, default=8.0, help="CPU: memory cap (GiB) for the largest batch")
    ap.add_argument("--tile", type=int, default=256, help="tiled loss: rows per tile")
    ap.add_argument("--validate-batch", type=int, default=2, help="CPU: real one-step check at this batch (0: skip)")
    ap.add_argument("--validate", nargs="*", default=["open_clip", "clipforge", "clipforge+ckpt+tiled"],
                    choices=list(CONFIGS), help="CPU: configurations to check with a real step")
    ap.add_argument("--ref-batch", type=int, default=256, help="GPU: also report peak memory at this batch")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:
        args.precision = "fp32"
        print(json.dumps(measured_cpu_step(args.child[0], int(args.child[1]), args)))
        return
    device = torch.device(args.device)
    results = {}
    for name in args.configs:
        if device.type == "cuda":
            r = gpu_largest_batch(name, args, device)
        else:
            r = cpu_largest_batch(name, args)
            if args.validate_batch and name in args.validate:
                r["validation"] = validate(name, args)
        results[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "probes"}), flush=True)
    base = results.get("open_clip", {}).get("largest_batch") or None
    rows = []
    for name, r in results.items():
        r["largest_batch_vs_open_clip"] = round(r["largest_batch"] / base, 2) if base else None
        v = r.get("validation")
        rows.append((name, r["largest_batch"], r["largest_batch_vs_open_clip"], r.get("mb_per_sample", "-"),
                     f"{v['simulated']['step_rise_mb']:.0f} / {v['measured']['live_tensor_rise_mb']:.0f} / "
                     f"{v['measured']['rss_rise_mb']:.0f}" if v else "-"))
    cap = f"{args.cap_gb:g} GiB cap, simulated" if device.type == "cpu" else "measured"
    table = print_table(rows, ("config", f"largest batch ({cap})", "vs open_clip", "MB/sample",
                               f"step rise MB at B={args.validate_batch}: sim / real tensors / real RSS"))
    record = {
        "model": args.model, "precision": args.precision, "cap_gb": args.cap_gb if device.type == "cpu" else None,
        "tile": args.tile,
        "setup": "one steady-state training step (optimizer state allocated), captions 10-30 tokens; each library's "
        "own AdamW (clipforge fused, OpenCLIP default) and loss",
        "method": ("CPU: peak live tensor bytes on FakeTensorMode (CPU kernels, no arithmetic), largest multiple "
                   "of 8 under the cap; validated against a real step's peak-RSS rise in a fresh process"
                   if device.type == "cpu" else "GPU: torch.cuda.max_memory_allocated; doubling then bisection, "
                   "OOM = does not fit"),
        "results": results, "table": table,
    }
    path = write_record("memory", record, device, args.out,
                        code_paths=("src/clipforge/model", "src/clipforge/train"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

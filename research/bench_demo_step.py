"""The demo model's CPU training step, with and without one of its step-time choices.

    .venv/bin/python research/bench_demo_step.py --compare grads   # gradients dropped vs zeroed in place
    .venv/bin/python research/bench_demo_step.py --compare stem    # conv stem channels-last vs NCHW
    .venv/bin/python research/bench_demo_step.py --compare pool    # class-token embedding vs mean of patches
    .venv/bin/python research/bench_demo_step.py --compare act     # stem's first activation |x| vs ReLU
    .venv/bin/python research/bench_demo_step.py --compare alloc   # freed memory kept for reuse vs glibc default
    .venv/bin/python research/bench_demo_step.py --compare sparse  # token table's used rows vs dense gradient
    .venv/bin/python research/bench_demo_step.py --compare swap    # with the demo's swapped-word copies vs without
    .venv/bin/python research/bench_demo_step.py --compare words   # copies of every attribute word vs of one
    .venv/bin/python research/bench_demo_step.py --compare kernel  # stem's first convolution 5x5 vs 3x3
    .venv/bin/python research/bench_demo_step.py --compare gray    # half the first filters colour-blind vs none (not kept)
    .venv/bin/python research/bench_demo_step.py --compare bag     # text mean in one embedding_bag vs padded
    .venv/bin/python research/bench_demo_step.py --compare gather  # the batch's words gathered first vs per occurrence
    .venv/bin/python research/bench_demo_step.py --compare patch   # a 4x4 grid (patch 16) vs 8x8 (patch 8)

One step is the trainer's own (``clipforge.train.step.TrainStep``: clear the gradients, bf16
autocast forward of ``tiny-bow``, the contrastive loss in fp32, backward, clipping at 1.0, fused
AdamW) on a synthetic batch (128 images of 64 px, captions of 20 tokens; ``swap``: 128 of the world's
captions and their swapped-word copies as the demo makes them in the step, up to 64 per caption of
every attribute word; ``bag``, ``gather``, ``patch``: the same, both sides; ``words``: against up to 9 of one word), without
the loader.
Each side runs in its own process, one model per process as in training (two models in one
process share the allocator, and what one frees the other reuses), and the processes alternate
(A B, B A, ...) so the shared host's drift falls on both alike. Per process: the median step time
after warm-up and the minor page faults per step. The record goes to benchmarks/results/
(``demo_step-cpu-latest.json``); benchmarks/demo/RESULTS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import print_table, summarize, write_record  # noqa: E402

# (the variant the demo uses, the alternative) per comparison
VARIANTS = {
    "grads": ("dropped (set_to_none)", "zeroed in place"),
    "stem": ("channels-last stem", "NCHW stem"),
    "pool": ("class token", "mean of patch tokens"),
    "act": ("|x| first stage", "ReLU first stage"),
    "kernel": ("5x5 first convolution", "3x3 first convolution"),
    "gray": ("16 of 32 first filters colour-blind (tried, not kept)", "all 32 see colour"),
    "alloc": ("freed memory reused", "glibc default"),
    "sparse": ("token table's rows (sparse_embeddings)", "dense token table gradient"),
    "swap": ("swapped-word copies of every attribute word (up to 64)", "no copies"),
    "words": ("copies of every attribute word (up to 64)", "copies of one word drawn at random (up to 9)"),
    "bag": ("text mean gathered and summed at once (embedding_bag)", "text mean over a padded [B, N, W] tensor"),
    "patch": ("four-stage stem to a 4x4 grid (patch 16)", "three-stage stem to an 8x8 grid (patch 8)"),
    "gather": ("the batch's words gathered first (one gradient row per word)",
               "a gradient row per token occurrence (coalesced by clipping and the optimizer)"),
}


def _bag_mean_per_occurrence(text, tokens, pos):
    """TextTransformer._bag_mean before the batch's words were gathered first."""
    import torch
    import torch.nn.functional as F

    n = int(pos.max()) + 1
    tokens, length = tokens[:, :n], (pos + 1).unsqueeze(1)
    weights = (torch.arange(n)[None, :] < length) / length
    table = text.token_embedding
    x = F.embedding_bag(tokens, table.weight, per_sample_weights=weights.to(table.weight.dtype), mode="sum",
                        sparse=table.sparse)
    return x + text.positional_embedding[:n].cumsum(0)[pos] / length


def measure(compare: str, alternative: bool, steps: int, warmup: int, threads: int) -> dict:
    """One side, in this process: median seconds per step and minor page faults per step."""
    import dataclasses
    import functools

    import torch

    import clipforge
    from clipforge.model.registry import get_config
    from clipforge.train.config import OptimConfig
    from clipforge.train.optim import build_optimizer
    from clipforge.train.runtime import reuse_freed_memory
    from clipforge.train.step import TrainStep

    torch.set_num_threads(threads)
    if compare != "alloc" or not alternative:
        reuse_freed_memory()  # as the trainer does on a CPU
    cfg = get_config("tiny-bow")
    if alternative and compare == "patch":
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, patch_size=8))
    if alternative and compare == "kernel":
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem_kernel=3))
    if not alternative and compare == "gray":  # tried, not kept in tiny-bow
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, stem_gray=16))
    model = clipforge.create_model(cfg, seed=0).train()
    if alternative and compare == "stem":
        model.visual.stem_is_conv = False  # skips the channels-last reorder
    if alternative and compare == "pool":
        full = model.visual.transformer.forward  # every position through every block, then the mean
        model.visual.transformer.forward = lambda x, causal=False, rows=None: full(x, causal)[:, 1:].mean(1)
    if alternative and compare == "bag":
        model.text.bag_mean = False
    if alternative and compare == "gather":  # embedding_bag straight on the token table, as before
        model.text._bag_mean = functools.partial(_bag_mean_per_occurrence, model.text)
    if alternative and compare == "act":
        model.visual.conv1[2] = torch.nn.ReLU(inplace=True)  # the stem's first activation
    sparse = compare != "sparse" or not alternative  # the demo now trains with sparse_embeddings
    opt = build_optimizer(model, OptimConfig(lr=2e-3, weight_decay=0.1, sparse_embeddings=sparse))
    if alternative and compare == "grads":  # the step clears with set_to_none=True; zero in place instead
        opt.zero_grad = functools.partial(type(opt).zero_grad, opt, set_to_none=False)
    step = TrainStep(model, opt, grad_clip=1.0, precision="bf16", device="cpu")
    images = torch.randn(128, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(1, 1000, (128, 77), generator=torch.Generator().manual_seed(1))
    tokens[:, 20:] = 0
    make = None
    if compare in ("swap", "bag", "words", "gather", "patch"):  # world captions (random ids hold no attribute words to swap)
        from clipforge.data.synth import SynthConfig, make_sample
        from clipforge.data.synth.captions import attribute_word_groups
        from clipforge.train.swap_negatives import build_swap_table, swap_negatives

        tokens = clipforge.tokenize([make_sample(SynthConfig(), "train", i).caption for i in range(128)])
        if compare != "swap" or not alternative:
            table = build_swap_table(attribute_word_groups(), clipforge.tokenize, 49407, 0)
            every = not (compare == "words" and alternative)
            make = functools.partial(swap_negatives, table=table, k=64 if every else 9, eot_id=49407, pad_id=0,
                                     every_word=every)
    times, faults0 = [], 0
    for i in range(warmup + steps):
        if i == warmup:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step.step([(images, tokens)], negatives=make(tokens) if make else None)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"median_s": statistics.median(times), "faults_per_step": faults / steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=sorted(VARIANTS), required=True)
    p.add_argument("--reps", type=int, default=4, help="processes per side, alternating")
    p.add_argument("--steps", type=int, default=60, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", choices=["ours", "other"], help=argparse.SUPPRESS)  # a child process
    a = p.parse_args()
    if a.reps < 1 or a.steps < 1 or a.warmup < 0:
        p.error("--reps and --steps must be >= 1, --warmup >= 0")
    if a.side:
        print(json.dumps(measure(a.compare, a.side == "other", a.steps, a.warmup, a.threads)))
        return 0
    names = dict(zip(("ours", "other"), VARIANTS[a.compare]))
    runs: dict[str, list[dict]] = {"ours": [], "other": []}
    for r in range(a.reps):
        for side in ("ours", "other") if r % 2 == 0 else ("other", "ours"):
            cmd = [sys.executable, __file__, "--compare", a.compare, "--side", side, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--threads", str(a.threads)]
            runs[side].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    times = {names[s]: [x["median_s"] for x in v] for s, v in runs.items()}
    table = summarize(times, reference=names["other"])
    faults = {names[s]: round(statistics.median(x["faults_per_step"] for x in v)) for s, v in runs.items()}
    ms = {k: round(1000 * v, 1) for k, v in table["median_s"].items()}
    text = print_table([[k, ms[k], faults[k], table["paired_speedup_median"][k]] for k in times],
                       ["variant", "ms per step (median)", "page faults per step", "speedup (paired)"])
    path = write_record("demo_step", {"compare": a.compare, "steps": a.steps, "warmup": a.warmup,
                                      "threads": a.threads, "ms_per_step": ms, "faults_per_step": faults,
                                      "table": text, **table})
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The demo's training loader, batch by batch: images normalised a batch at a time (and a fixed
crop's pixels kept in the cache) against the per-image path every other transform takes.

    .venv/bin/python research/bench_demo_loader.py --world demo_out/world [--reps 3 --threads 1]

The loader is the trainer's (``build_train_loader``, 128 rows, no workers, the decoded-sample cache
of ``clipforge demo``) over the world's ``train.csv``; the per-image side wraps the same transform
in a plain function, which hides its batch methods from the loader. The batches of both sides are
bit-identical (tests/unit/test_data_cache.py). Each side runs in its own process, alternating; per
process: the first epoch (reads and decodes everything) and the median of the later epochs' time per
batch. The record goes to benchmarks/results/ (``demo_loader-cpu-latest.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import print_table, summarize, write_record  # noqa: E402

SIDES = {"batched": "normalised per batch", "per_image": "normalised per image"}


def measure(world: str, per_image: bool, epochs: int, threads: int) -> dict:
    import torch

    from clipforge.data.config import DataConfig
    from clipforge.data.loader import build_train_loader
    from clipforge.model import factory

    torch.set_num_threads(threads)
    model = factory.create_model("tiny-bow", seed=0)
    transform = factory.get_preprocess(model, train=True, crop_scale=(1.0, 1.0))  # the demo's
    if per_image:
        transform = lambda image, t=transform: t(image)  # noqa: E731 - hides pixels/normalize
    loader = build_train_loader(DataConfig(path=str(Path(world) / "train.csv"), cache_mb=1024), transform,
                                factory.tokenizer_for(model), batch_size=128, workers=0, seed=0)
    t0 = time.perf_counter()
    sum(1 for _ in loader.epoch_iter(0))
    first = time.perf_counter() - t0
    per_batch = []
    for e in range(1, 1 + epochs):
        t0 = time.perf_counter()
        n = sum(1 for _ in loader.epoch_iter(e))
        per_batch.append((time.perf_counter() - t0) / n)
    return {"first_epoch_s": first, "median_s": statistics.median(per_batch)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="a data world (clipforge demo's demo_out/world)")
    p.add_argument("--reps", type=int, default=3, help="processes per side, alternating")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs after the first, per process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # a child process
    a = p.parse_args()
    if a.reps < 1 or a.epochs < 1:
        p.error("--reps and --epochs must be >= 1")
    if not (Path(a.world) / "train.csv").is_file():
        p.error(f"{a.world} has no train.csv (make one with clipforge demo or clipforge data synth)")
    if a.side:
        print(json.dumps(measure(a.world, a.side == "per_image", a.epochs, a.threads)))
        return 0
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(a.reps):
        for side in ("batched", "per_image") if r % 2 == 0 else ("per_image", "batched"):
            cmd = [sys.executable, __file__, "--world", a.world, "--side", side, "--epochs", str(a.epochs),
                   "--threads", str(a.threads)]
            runs[side].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    times = {SIDES[s]: [x["median_s"] for x in v] for s, v in runs.items()}
    table = summarize(times, reference=SIDES["per_image"])
    ms = {k: round(1000 * v, 2) for k, v in table["median_s"].items()}
    first = {SIDES[s]: round(statistics.median(x["first_epoch_s"] for x in v), 2) for s, v in runs.items()}
    text = print_table([[k, ms[k], first[k], table["paired_speedup_median"][k]] for k in times],
                       ["loader", "ms per batch of 128, later epochs (median)", "first epoch s",
                        "speedup (paired)"])
    path = write_record("demo_loader", {"threads": a.threads, "epochs": a.epochs, "ms_per_batch": ms,
                                        "first_epoch_s": first, "table": text, **table})
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

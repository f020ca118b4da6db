"""Data hygiene on the data world: overlap detection of planted test duplicates (precision, recall
per edit), the calibrated thresholds, and curation drop counts against the planted mismatches.

    .venv/bin/python benchmarks/bench_hygiene.py                          # random tiny model
    .venv/bin/python benchmarks/bench_hygiene.py --model demo_out/run/final --train 20000 --test 2000

World: ``clipforge data synth`` with ``--plant-duplicates`` (edited copies of distinct test images,
the six edits in turn) and ``--mismatch-rate`` (captions swapped among rows), cached under --cache.
Overlap: ``clipforge.hygiene.analysis.run_overlap`` on ``train_flawed.csv`` vs ``test.csv`` with a
calibrated threshold (``--max-fpr``) and, with --task, All / Overlap / Clean accuracy. Precision =
planted among flagged test items; recall per edit = its planted test items flagged. ``--kinds K``
plants only edit K (all ``--plant`` copies), so the precision is that edit's. Curation:
``clipforge.hygiene.curate`` with CLIP-score filtering (keep the top ``1 - mismatch`` fraction):
how many dropped rows are planted mismatches, against the chance rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=5000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--plant", type=int, default=300)
    ap.add_argument("--mismatch", type=float, default=0.3)
    ap.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                    help="plant only these edits (default: all six in turn); one kind gives that kind's precision")
    ap.add_argument("--model", default=None, help="default: a random tiny model (seed 0)")
    ap.add_argument("--task", default="shape")
    ap.add_argument("--max-fpr", type=float, default=0.01)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "clipforge_bench_hygiene"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import torch

    import clipforge
    from clipforge.data.synth import SynthConfig, generate_world
    from clipforge.data.synth.flaws import FlawConfig, add_flaws
    from clipforge.hygiene.analysis import OverlapJob, run_overlap
    from clipforge.hygiene.curate import CurateJob, curate

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    cache = Path(args.cache)
    world = cache / f"world_{args.train}_{args.test}"
    t0 = time.perf_counter()
    generate_world(SynthConfig(train=args.train, val=0, test=args.test, shifted=0, heldout_pairs=0), world,
                   progress=False)
    flaw_cfg = FlawConfig(args.mismatch, args.plant)
    flaws = add_flaws(world, replace(flaw_cfg, kinds=tuple(args.kinds)) if args.kinds else flaw_cfg)
    if args.model:
        model, _ = clipforge.load(args.model)
        model_name = args.model
    else:
        model, model_name = clipforge.create_model("tiny", seed=0), "tiny (random init, seed 0)"
    model.eval()
    t1 = time.perf_counter()
    out = cache / "run"
    report = run_overlap(OverlapJob(train=str(world / "train_flawed.csv"), test=str(world / "test.csv"),
                                    out=str(out / "overlap.json"), model=model, work=str(out / "work"),
                                    max_fpr=args.max_fpr, task=args.task, progress=False))
    t2 = time.perf_counter()
    truth = {os.path.abspath(world / p["test_image"]): p["kind"] for p in flaws["planted"]}
    flagged = {it["test"] for it in report["items"]}
    tp = flagged & set(truth)
    per_kind = {k: {"planted": n, "found": sum(truth[p] == k for p in tp)} for k, n in Counter(truth.values()).items()}
    for v in per_kind.values():
        v["recall"] = round(v["found"] / v["planted"], 3)
    detection = {"flagged": len(flagged), "true_positives": len(tp),
                 "precision": round(len(tp) / len(flagged), 3) if flagged else None,
                 "recall": round(len(tp) / len(truth), 3) if truth else None, "per_kind": per_kind,
                 "by_signal": report["by_signal"], "seconds": round(t2 - t1, 1)}
    cur = curate(CurateJob(input=str(world / "train_flawed.csv"), out=str(out / "curated.csv"), model=model,
                           work=str(out / "work"), exact_images=True, top_fraction=1 - args.mismatch, progress=False))
    t3 = time.perf_counter()
    import csv

    mismatched = set(flaws["mismatched"])
    with open(str(out / "curated.csv") + ".dropped.csv") as f:
        low = {int(r["row"]) for r in csv.DictReader(f) if r["reason"] == "low_clip_score"}
    curation = {"rows_in": cur["rows_in"], "rows_out": cur["rows_out"], "dropped": cur["dropped"],
                "score_threshold": cur["score_threshold"],
                "low_score_drops_that_are_mismatched": round(len(low & mismatched) / len(low), 3) if low else None,
                "chance": round(len(mismatched) / cur["rows_in"], 3),
                "mismatched_recall": round(len(low & mismatched) / len(mismatched), 3) if mismatched else None,
                "seconds": round(t3 - t2, 1)}
    t = report["threshold"]
    record = {
        "benchmark": "hygiene", "model": model_name,
        "world": {"train": args.train, "test": args.test, "planted": args.plant, "kinds": args.kinds or "all", "mismatch_rate": args.mismatch,
                  "rows": flaws["rows"], "seconds": round(t1 - t0, 1)},
        "calibration": {"emb_threshold": t["emb_threshold"], "perceptual_threshold": t["perceptual_threshold"],
                        "fine_threshold": t["fine_threshold"], "floor": t["floor"], "max_fpr": t["max_fpr"], "negatives": t["negatives"], "kinds": t["kinds"]},
        "detection": detection, "overlap_fraction": report["overlap_fraction"],
        "accuracy": report.get("accuracy"), "curation": curation,
    }
    print(json.dumps({k: record[k] for k in ("calibration", "detection", "accuracy", "curation")}, indent=1))
    if not args.no_record:
        print("record:", write_record("hygiene", record, "cpu", code_paths=("src/clipforge/hygiene",
                                                                            "src/clipforge/data")))


if __name__ == "__main__":
    main()

"""Whole `clipforge demo` runs on one core and on two, as a newcomer gets them: each run in a new
output folder (so the data world is generated, nothing is reused), pinned with `taskset`, one after
another. Per run: steps, every target's figure, the held-out gap, retrieval R@1 and the wall time of
each stage, from the run's own summary.json. The record is results/demo_runs-cpu-latest.json.

    python benchmarks/demo/bench_demo_runs.py --runs 3 --cores 0 0,1
    python benchmarks/demo/bench_demo_runs.py --runs 1 --cores 0 --minutes 5    # one quick look

A run is "met" when every target is: colour, count, position, size, shape on the test split and the
held-out shape gap (clipforge.demo.pipeline.TARGETS, HELDOUT_GAP_TARGET). The figures depend on how
busy the host is (the demo follows the clock), so the record keeps the load average beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_record  # noqa: E402

TASKS = ("colour", "count", "position", "size", "shape")


def one_run(cores: str, minutes: float, root: Path) -> dict:
    out = root / f"demo-{cores.replace(',', '_')}-{time.time_ns()}"
    cmd = ["taskset", "-c", cores, sys.executable, "-m", "clipforge", "demo", "--out", str(out),
           "--minutes", str(minutes), "--no-progress"]
    load_before = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    s = json.loads((out / "summary.json").read_text())
    zs = s["results"]["zeroshot"]
    shape = zs["shape"]
    gap = shape["test"]["ensemble"] - shape["test_heldout"]["ensemble"]
    figures = {t: round(100 * zs[t]["test"]["ensemble"], 1) for t in TASKS}
    met = all(zs[t]["test"]["ensemble"] >= s["targets"][t] for t in TASKS) and gap <= s["heldout_gap_target"]
    shutil.rmtree(out, ignore_errors=True)  # 350 MB of world per run
    return {"cores": cores, "steps": s["train"]["steps"], **figures, "heldout_shape": round(
        100 * shape["test_heldout"]["ensemble"], 1), "heldout_gap": round(100 * gap, 1),
        "r_at_1": round(100 * s["results"]["retrieval"]["image_retrieval_recall@1"], 1),
        "step_ms_calibrated": round(1000 * (s["seconds_per_step_calibrated"] or float("nan")), 1),
        "timings_s": {k: round(v, 1) for k, v in s["timings"].items()}, "wall_s": round(wall, 1),
        "met": met, "verdict": s.get("verdict"), "load_average_before": round(load_before, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per core set (default 3)")
    p.add_argument("--cores", nargs="+", default=["0", "0,1"], help="taskset core lists (default: 0 and 0,1)")
    p.add_argument("--minutes", type=float, default=5.0, help="the demo's budget (default 5)")
    p.add_argument("--out-dir", type=Path, default=None, help="where the record goes (default benchmarks/results)")
    args = p.parse_args()
    if shutil.which("taskset") is None:
        raise SystemExit("taskset (util-linux) is needed to pin the runs")
    runs = []
    with tempfile.TemporaryDirectory(prefix="demo-runs-") as tmp:
        for cores in args.cores:
            for i in range(args.runs):
                r = one_run(cores, args.minutes, Path(tmp))
                runs.append(r)
                print(f"cores {cores} run {i + 1}: {r['steps']} steps, met={r['met']}, "
                      f"{', '.join(f'{t} {r[t]}' for t in TASKS)}, gap {r['heldout_gap']}, "
                      f"timings {r['timings_s']}", flush=True)
    table = [[r["cores"], r["steps"], *(r[t] for t in TASKS), r["heldout_gap"], r["r_at_1"],
              r["timings_s"].get("world_s"), r["timings_s"].get("train_s"), r["timings_s"].get("eval_s"),
              "yes" if r["met"] else "no"] for r in runs]
    print(print_table(table, ["cores", "steps", *TASKS, "gap", "R@1", "world s", "train s", "eval s", "met"]))
    write_record("demo_runs", {"minutes": args.minutes, "runs": runs,
                               "met": {c: sum(r["met"] for r in runs if r["cores"] == c) for c in args.cores}},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()

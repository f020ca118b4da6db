"""The slow fault-injection suite: kill, corrupt, fill and fuzz clipforge, then count what was lost.

    .venv/bin/python benchmarks/faults/run_faults.py [--trials 2] [--only train-kill,embed-kill,...] [--seed 0]

Prints a table (fault or input, trials, passed, data lost: must be 0) and writes it with every
trial's notes to ``benchmarks/results/faults-latest.json`` (earlier runs: ``results/history/faults.jsonl``).
The fast versions of these checks run with the tests (tests/reliability/); this suite repeats them
with real processes killed at random moments, a real full file system (a tmpfs, when mounting is
allowed), and more trials. CPU only; a few minutes on two cores. Also: benchmarks/faults/load_test.py
(the service under load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py

from common import save_record  # noqa: E402
from harness import REPO, Row  # noqa: E402

TRIALS = ["train-kill-random", "train-kill-scripted", "train-worker", "train-nan", "train-disk", "checkpoint-damage",
          "zoo", "embed-kill", "embed-disk", "index-kill", "serve-fuzz"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=2, help="runs per kill trial (each run is killed 5 times)")
    ap.add_argument("--only", default=",".join(TRIALS), help=f"comma-separated subset of: {', '.join(TRIALS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=1500, help="malformed requests sent to the live service")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    chosen = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(chosen) - set(TRIALS)
    if unknown:
        ap.error(f"unknown trials {sorted(unknown)}")
    os.environ["OMP_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)
    import search_faults as sf
    import train_faults as tf

    work = args.work or Path(tempfile.mkdtemp(prefix="clipforge-faults-"))
    rng = random.Random(args.seed)
    rows: list[Row] = []
    t_start = time.time()
    ref = embed_world = None

    def trial(name: str, fn) -> None:
        if name not in chosen:
            return
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            row = fn()
        except Exception as e:  # noqa: BLE001 - a crashed trial is a failed row, not a crashed suite
            import traceback

            row = Row(name, trials=1, passed=0, lost=0, notes=[f"trial crashed: {type(e).__name__}: {e}",
                                                                traceback.format_exc()[-1500:]])
        row.seconds = round(time.time() - t0, 1)
        rows.append(row)
        print(f"    {row.passed}/{row.trials} passed, lost {row.lost}, {row.seconds} s", flush=True)
        for n in row.notes[:4]:
            print(f"    - {n[:300]}", flush=True)

    if any(t.startswith(("train", "checkpoint")) for t in chosen):
        ref = tf.Reference(work / "train")
    trial("train-kill-random", lambda: tf.sigkill_random(ref, args.trials, rng))
    trial("train-kill-scripted", lambda: tf.sigkill_scripted(ref, args.trials, rng))
    trial("train-worker", lambda: tf.worker_death(ref, args.trials, rng))
    trial("train-nan", lambda: tf.nan_inf(work / "train", 6 * args.trials, rng))
    trial("train-disk", lambda: tf.disk_full(ref, args.trials, rng))
    trial("checkpoint-damage", lambda: tf.damaged_checkpoints(ref, 20 * args.trials, rng))
    trial("zoo", lambda: tf.bad_input_zoo(work / "train", rng))
    if any(t.startswith("embed") for t in chosen):
        embed_world = sf.EmbedWorld(work / "embed")
    trial("embed-kill", lambda: sf.embed_sigkill(embed_world, args.trials, rng))
    trial("embed-disk", lambda: sf.embed_disk_full(embed_world, rng))
    trial("index-kill", lambda: sf.index_sigkill(work / "index", args.trials, rng))
    trial("serve-fuzz", lambda: sf.service_fuzz(work / "serve", args.requests, rng))

    print_table(rows)
    record = {
        "benchmark": "faults",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)
                                               if Path(sys.argv[0]).is_absolute() else sys.argv[0]), *sys.argv[1:]]),
        "code": _git_head(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(), "torch": torch.__version__,
        "seconds": round(time.time() - t_start, 1),
        "rows": [row.__dict__ for row in rows],
        "all_passed": all(r.passed == r.trials and r.lost == 0 for r in rows),
    }
    path = save_record(record, "faults", args.out, dt.datetime.fromisoformat(record["date"]))
    print(f"\nwritten: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0 if record["all_passed"] else 1


def print_table(rows: list[Row]) -> None:
    w = max([len(r.fault) for r in rows] + [14])
    print(f"\n{'fault or input':<{w}}  trials  passed  data lost  seconds")
    print(f"{'-' * w}  ------  ------  ---------  -------")
    for r in rows:
        print(f"{r.fault:<{w}}  {r.trials:>6}  {r.passed:>6}  {r.lost:>9}  {r.seconds:>7}")


def _git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True).stdout
        return head.strip() + (" + uncommitted changes in src/" if dirty.strip() else "")
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

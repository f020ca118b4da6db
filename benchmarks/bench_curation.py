"""Does curation pay? The demo's model trained on a clean world, on the same world with a fraction of
its captions swapped among rows, and on that noisy world after CLIP-score filtering; 3 seeds each.

    .venv/bin/python benchmarks/bench_curation.py                      # 30% swapped, 1,500 steps, seeds 0-2
    .venv/bin/python benchmarks/bench_curation.py --seeds 0 1 2 3 4 --skip-bootstrap 3 4   # + seeds 3-4
    .venv/bin/python benchmarks/bench_curation.py --steps 300 --filter-steps 300 --seeds 0 --train 4000   # a quick look

World: the demo's generator settings (20,000 training pairs, 64 px), plus
``clipforge.data.synth.flaws.add_flaws`` with ``--mismatch`` (captions swapped among rows; which ones
is recorded, and read only for the oracle arm and to count what curation dropped). Arms, each
trained as the demo trains ``tiny-bow`` (``DemoConfig.train_config``) but for a fixed ``--steps``,
so that they compare at equal compute, not at a machine's pace:

- clean: ``train.csv``; noisy: ``train_flawed.csv``;
- oracle: ``train_flawed.csv`` without exactly its swapped rows (what perfect curation keeps);
- curated (bootstrapped): ``train_flawed.csv`` filtered by ``clipforge data curate --top-fraction``
  (1 - mismatch) with the CLIP scores of *that seed's noisy model* (no clean data, no outside model,
  as DFN filters with a model trained on the pool); ``curated2`` ... ``curatedN`` (``--rounds``)
  score the same table with the previous round's curated model;
- external: filtered the same way by one model trained on a clean world of another generator seed
  (``--filter-world``), as LAION filtered with a CLIP trained elsewhere; that model trains
  ``--filter-steps`` (default 4,000), longer than the arms: it is trained once, outside their budget.

Each arm is scored zero-shot on the test split with the world's ensemble prompts (colour, count,
position, size, shape); the figure compared is their mean. Reported: every figure, each arm's gap to
clean per seed and on the mean over seeds, and whether the last bootstrapped round and the external
arm are within ``--within`` points of clean in every seed. Runs go two at a time, one thread each
(``--jobs``), as a 2-core machine allows; a finished arm in ``--work`` is read back, not retrained.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_record

TASKS = ("colour", "count", "position", "size", "shape")


def _train_and_score(arm: str, seed: int, table: str, world: str, out: str, steps: int) -> dict:
    """One arm, one seed, in its own process on one thread (a finished run in ``out`` with the same
    table and steps is read back, not trained again)."""
    done = Path(out) / "result.json"
    if done.exists():
        r = json.loads(done.read_text())
        if r.get("table") == table and r.get("steps") == steps and r.get("arm") == arm:
            return r
    os.environ["OMP_NUM_THREADS"] = "1"  # the trainer sizes its threads from it, else from the cores
    import torch

    torch.set_num_threads(1)
    from clipforge.data.config import DataConfig
    from clipforge.demo.pipeline import DemoConfig
    from clipforge.eval.world import WorldEvalConfig, evaluate_world
    from clipforge.model import factory
    from clipforge.train.trainer import train

    t0 = time.perf_counter()
    train(DemoConfig().train_config(DataConfig(path=table, cache_mb=DemoConfig.cache_mb), out, steps, seed=seed),
          progress=False)
    t1 = time.perf_counter()
    model, _ = factory.load(Path(out) / "final")
    res = evaluate_world(model, world, WorldEvalConfig(splits=("test",), tasks=TASKS))
    acc = {t: round(100 * res["zeroshot"][t]["test"]["ensemble"], 2) for t in TASKS}
    r = {"arm": arm, "seed": seed, "steps": steps, "accuracy": acc, "mean": round(sum(acc.values()) / len(acc), 2),
         "r_at_1": round(100 * res["retrieval"]["image_retrieval_recall@1"], 2),
         "train_s": round(t1 - t0, 1), "table": table, "model": str(Path(out) / "final")}
    done.write_text(json.dumps(r))
    return r


def _oracle_table(flawed: str, mismatched: set[int], out: str) -> str:
    """The noisy table without exactly its swapped rows: what perfect curation would keep."""
    with open(flawed, newline="") as f:
        rows = list(csv.DictReader(f))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for i, r in enumerate(rows) if i not in mismatched)
    return out


def _curate(scorer: str, flawed: str, out: str, keep: float, mismatched: set[int]) -> dict:
    """``flawed`` filtered to its top ``keep`` by the CLIP scores of the model at ``scorer`` into
    ``out``; what was kept, and how many dropped rows were swapped captions."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from clipforge.hygiene.curate import CurateJob, curate
    from clipforge.model import factory

    model, _ = factory.load(scorer)
    model.eval()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    rep = curate(CurateJob(input=flawed, out=out, model=model, work=str(Path(out).parent / "work"),
                           top_fraction=keep, progress=False))
    with open(out + ".dropped.csv") as f:
        low = {int(r["row"]) for r in csv.DictReader(f) if r["reason"] == "low_clip_score"}
    return {"rows_in": rep["rows_in"], "rows_out": rep["rows_out"], "score_threshold": rep["score_threshold"],
            "dropped": len(low), "dropped_that_were_mismatched": len(low & mismatched),
            "mismatched_recall": round(len(low & mismatched) / max(1, len(mismatched)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--mismatch", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--within", type=float, default=2.0, help="points of the clean arm's mean")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--filter-world", type=int, default=1, metavar="SEED",
                    help="also filter with a model trained on another world (this generator seed, clean), as LAION "
                         "filtered with a CLIP trained elsewhere; -1: skip")
    ap.add_argument("--filter-steps", type=int, default=4000, metavar="N",
                    help="train the outside filter model N steps [4000]; it is trained once, outside the arms' "
                         "budget, as an outside CLIP is")
    ap.add_argument("--skip-bootstrap", nargs="*", type=int, default=[], metavar="SEED",
                    help="seeds without the bootstrapped arms (noisy model's own curation): extra seeds for the others")
    ap.add_argument("--rounds", type=int, default=2,
                    help="curation rounds: round r scores the noisy table with round r-1's curated model")
    ap.add_argument("--work", default="/tmp/clipforge_bench_curation")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from clipforge.data.synth import SynthConfig, generate_world
    from clipforge.data.synth.flaws import FlawConfig, add_flaws

    work = Path(args.work)
    world = work / f"world_{args.train}_{args.test}_{args.mismatch}"
    t0 = time.perf_counter()
    generate_world(SynthConfig(seed=0, image_size=64, train=args.train, val=0, test=args.test, shifted=0,
                               image_format="bmp"), world, progress=False)
    flaws = add_flaws(world, FlawConfig(mismatch_rate=args.mismatch, plant=0))
    mismatched = set(flaws["mismatched"])
    print(f"world {world} ({time.perf_counter() - t0:.0f} s): {len(mismatched)} of {flaws['rows']} captions swapped",
          flush=True)
    clean, flawed = str(world / "train.csv"), str(world / "train_flawed.csv")
    runs: list[dict] = []
    curation: dict[str, dict] = {}
    # the bootstrapped chain: each arm's model scores the next round (noisy -> curated -> curated2 ...)
    chain = ["noisy", *("curated" if r == 1 else f"curated{r}" for r in range(1, args.rounds + 1))]
    t_start = time.perf_counter()
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        pending: set[cf.Future] = set()

        def submit(arm: str, seed: int, table: str, out: str | None = None, steps: int | None = None) -> None:
            pending.add(pool.submit(_train_and_score, arm, seed, table, str(world), out or str(work / f"{arm}_s{seed}"),
                                    steps or args.steps))

        def curated_arm(name: str, scorer: dict, seeds: list[int], what: str) -> None:
            """Curate the noisy table with ``scorer``'s model and train arm ``name`` on it for ``seeds``."""
            prefix = external if name == "external" else name  # a filter trained other steps keeps its own folders
            key = prefix if name == "external" else f"{name}_s{seeds[0]}"  # a bootstrapped round is one seed's
            cur_csv = str(work / key / "curated.csv")
            c = curation[key] = dict(_curate(scorer["model"], flawed, cur_csv, 1 - args.mismatch, mismatched),
                                     scorer=what)
            print(f"  {name} (scores from the {what}): kept {c['rows_out']} of {c['rows_in']}; "
                  f"{c['dropped_that_were_mismatched']} of {c['dropped']} dropped rows were swapped captions", flush=True)
            for s in seeds:
                submit(name, s, cur_csv, str(work / f"{prefix}_s{s}"))

        ext = args.filter_world >= 0
        other_steps = args.filter_steps != args.steps  # a filter trained longer or shorter: its own folders
        external = f"external_f{args.filter_steps}" if other_steps else "external"
        total = sum(3 + ext + (0 if s in args.skip_bootstrap else args.rounds) for s in args.seeds) + ext
        oracle = _oracle_table(flawed, mismatched, str(world / "train_oracle.csv"))  # image paths are relative
        for s in args.seeds:
            for arm, table in (("noisy", flawed), ("clean", clean), ("oracle", oracle)):
                submit(arm, s, table)
        if ext:
            other = work / f"filter_world_{args.filter_world}_{args.train}"
            generate_world(SynthConfig(seed=args.filter_world, image_size=64, train=args.train, val=0, test=100,
                                       shifted=0, image_format="bmp"), other, progress=False)
            tag = f"_{args.filter_steps}steps" if other_steps else ""
            submit("filter", 0, str(other / "train.csv"), str(work / f"filter_w{args.filter_world}{tag}"), args.filter_steps)
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                pending.discard(fut)
                r = fut.result()
                runs.append(r)
                print(f"[{len(runs)}/{total}] {r['arm']} seed {r['seed']}: mean {r['mean']:.1f} {r['accuracy']} "
                      f"R@1 {r['r_at_1']} ({r['train_s']:.0f} s; {(time.perf_counter() - t_start) / 60:.1f} min "
                      "elapsed)", flush=True)
                if r["arm"] == "filter":  # one outside filter: the noisy table is the same for every seed
                    curated_arm("external", r, args.seeds, f"model trained on world seed {args.filter_world}")
                elif r["arm"] in chain[:-1] and r["seed"] not in args.skip_bootstrap:
                    curated_arm(chain[chain.index(r["arm"]) + 1], r, [r["seed"]], f"{r['arm']} model")

    by = {(r["arm"], r["seed"]): r for r in runs}
    last = chain[-1] if args.rounds else None
    per_seed = []
    for s in args.seeds:
        row = {"seed": s, **{a: by[(a, s)]["mean"] for a in sorted({r["arm"] for r in runs}) if (a, s) in by
                             and a != "filter"}}
        c = row["clean"]
        row.update(noisy_drop=round(c - row["noisy"], 2), oracle_gap=round(c - row["oracle"], 2))
        if last in row:
            row["curated_gap"] = round(c - row[last], 2)
        if "external" in row:
            row["external_gap"] = round(c - row["external"], 2)
        per_seed.append(row)
    gaps = [p["curated_gap"] for p in per_seed if "curated_gap" in p]
    met = all(g <= args.within for g in gaps) if gaps else None  # None: no bootstrapped arm ran
    met_external = all(p["external_gap"] <= args.within for p in per_seed) if args.filter_world >= 0 else None
    means = {a: round(statistics.fmean(p[a] for p in per_seed if a in p), 2)
             for a in ("clean", "noisy", "oracle", last, "external") if any(a in p for p in per_seed)}
    mean_gaps = {a: round(means["clean"] - v, 2) for a, v in means.items() if a != "clean"}
    print("means over seeds:", means, "below clean:", mean_gaps)
    record = {"world": {"train": args.train, "test": args.test, "mismatch_rate": args.mismatch,
                        "mismatched": len(mismatched)},
              "steps": args.steps, "batch_size": 128, "tasks": TASKS, "within_points": args.within,
              "rounds": args.rounds, "final_arm": last,
              "runs": sorted(runs, key=lambda r: (r["seed"], r["arm"])), "curation": curation,
              "per_seed": per_seed, "curated_within_target_every_seed": met,
              "external_within_target_every_seed": met_external, "filter_world_seed": args.filter_world,
              "filter_steps": args.filter_steps,
              "means": means, "mean_below_clean": mean_gaps, "bootstrap_skipped_seeds": args.skip_bootstrap,
              "wall_min": round((time.perf_counter() - t0) / 60, 1)}
    print(json.dumps(per_seed, indent=1))
    print(f"{last} within {args.within} points of clean in every seed: {met}; filtered by the outside model: {met_external}")
    if not args.no_record:
        print("record:", write_record("curation", record, "cpu",
                                      code_paths=("src/clipforge/hygiene", "src/clipforge/data", "src/clipforge/train")))


if __name__ == "__main__":
    main()

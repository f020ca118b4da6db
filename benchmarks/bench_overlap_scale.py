"""Overlap analysis at scale: 1M training x 50k test precomputed vectors through ``clipforge data
overlap``, timed per stage, with planted near-duplicate pairs to check the report against.

    .venv/bin/python benchmarks/bench_overlap_scale.py                               # 1M x 50k, d 512
    .venv/bin/python benchmarks/bench_overlap_scale.py --train 100000 --test 5000    # a quick look

Inputs (not timed): two ``clipforge embed`` directories as that command writes them (float16
parts of 10,000 rows, Parquet metadata, a manifest; one model fingerprint for both sides) under
--root. The vectors are synthetic, ViT-B-32-sized (d 512): training rows are drawn around --centres (2,000)
cluster centres whose members lie at pairwise cosine 0.5-0.8, so that unrelated nearest neighbours
sit near 0.5-0.85 as real image embeddings do, not near 0.2 as random directions would. The test
side draws from the same clusters, plus ``--plant`` near-duplicates of chosen training rows (cosine
0.92-0.99 to that row) and as many near-misses (cosine 0.80-0.88 to a training row, below the
threshold). Run: ``clipforge.cli.main(["data", "overlap", "--train", ..., "--test", ...,
"--threshold", T, "--no-perceptual"])`` in this process: with vectors only the stated embedding
threshold decides (no images to calibrate on or to check pixels of). Stages are timed by wrapping
the library calls that command makes (load test vectors, build the training index, open it and
verify candidates, search, plot); peak RSS is this process's VmHWM, reset after writing the inputs.
Found: planted test rows flagged with their own training row as the duplicate; false positives:
near-misses or unrelated rows flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, reset_peak_rss, vm_hwm_kb, write_record

PART = 10_000  # rows per part, clipforge embed's default
FINGERPRINT = "bench-overlap-scale"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _noise_for_cosine(cos: np.ndarray, d: int) -> np.ndarray:
    """Per-dimension noise scale t with cos(u, u + t * N(0, I)) ~ cos for a unit u: 1 / sqrt(1 + t^2 d)."""
    return np.sqrt((1.0 / cos**2 - 1.0) / d)


class Clusters:
    def __init__(self, d: int, n_centres: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.d, self.n = d, n_centres
        self.centres = _unit(rng.standard_normal((n_centres, d))).astype(np.float32)  # [C, d]
        # Pairwise cosine within a cluster ~ 1 / (1 + t^2 d): 0.5 to 0.8, a spread of tight and loose ones.
        self.scale = np.sqrt((1.0 / rng.uniform(0.5, 0.8, n_centres) - 1.0) / d).astype(np.float32)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        c = rng.integers(0, self.n, n)
        x = self.centres[c] + self.scale[c, None] * rng.standard_normal((n, self.d), np.float32)
        return _unit(x)


def _write_dir(out: Path, vecs_by_part, n: int, d: int, prefix: str) -> None:
    """An embeddings directory: float16 parts, metadata (path, position) and the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipforge.search.layout import EMB_FORMAT, part_name

    for sub in ("img_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    n_parts = -(-n // PART)
    for p in range(n_parts):
        lo, hi = p * PART, min((p + 1) * PART, n)
        np.save(out / part_name("img_emb", p, "npy"), vecs_by_part(p, lo, hi).astype(np.float16))
        table = pa.table({"path": [f"/data/{prefix}/{i:07d}.jpg" for i in range(lo, hi)],
                          "position": pa.array(range(lo, hi), pa.int64())})
        pq.write_table(table, out / part_name("metadata", p, "parquet"))
    manifest = {"format": EMB_FORMAT, "kind": "image", "inputs": n, "input": f"synthetic:{prefix}",
                "input_fingerprint": f"{prefix}-{n}", "part_size": PART, "parts": n_parts, "embed_dim": d,
                "model": "ViT-B-32", "model_fingerprint": FINGERPRINT, "text_embeddings": False}
    (out / "embeddings.json").write_text(json.dumps(manifest, indent=2))


def write_inputs(root: Path, n_train: int, n_test: int, plant: int, d: int, centres: int, seed: int) -> dict:
    """Training and test embedding directories; returns the planted pairs and near-misses (rows)."""
    rng = np.random.default_rng(seed)
    clusters = Clusters(d, centres, seed)
    picks = rng.choice(n_train, size=2 * plant, replace=False)  # first half planted, second near-misses
    test_rows = rng.choice(n_test, size=2 * plant, replace=False)
    wanted = {int(r): None for r in picks}

    def train_part(p: int, lo: int, hi: int) -> np.ndarray:
        x = clusters.draw(hi - lo, np.random.default_rng([seed, 1, p]))
        for r in range(lo, hi):
            if r in wanted:  # the stored float16 values: the copies are made of what the index holds
                wanted[r] = x[r - lo].astype(np.float16).astype(np.float32)
        return x

    _write_dir(root / "train_emb", train_part, n_train, d, "train")
    src = np.stack([wanted[int(r)] for r in picks])  # [2 plant, d]
    cos = np.concatenate([rng.uniform(0.92, 0.99, plant), rng.uniform(0.80, 0.88, plant)])
    t = _noise_for_cosine(cos, d).astype(np.float32)
    copies = _unit(src + t[:, None] * rng.standard_normal(src.shape, np.float32))

    def test_part(p: int, lo: int, hi: int) -> np.ndarray:
        x = clusters.draw(hi - lo, np.random.default_rng([seed, 2, p]))
        here = (test_rows >= lo) & (test_rows < hi)
        x[test_rows[here] - lo] = copies[here]
        return x

    _write_dir(root / "test_emb", test_part, n_test, d, "test")
    pairs = [{"test_row": int(q), "train_row": int(r), "cosine": float(np.dot(c, s))}
             for q, r, c, s in zip(test_rows, picks, copies, src)]
    return {"planted": pairs[:plant], "near_miss": pairs[plant:]}


@contextlib.contextmanager
def stage_timers(stages: dict):
    """Wrap the library calls ``clipforge data overlap`` makes; record each one's seconds and peak RSS."""
    from clipforge.hygiene import analysis, inputs, overlap
    from clipforge.search import build

    targets = [(inputs, "resolve_side", "load_test_vectors"), (build, "build_or_update", "build_train_index"),
               (analysis, "find_overlap", "find_overlap"), (overlap, "search_train", "search"),
               (analysis, "plot_overlap", "plot")]
    saved = []
    for mod, name, stage in targets:
        fn = getattr(mod, name)

        def timed(*a, _fn=fn, _stage=stage, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                s = stages.setdefault(_stage, {"seconds": 0.0, "calls": 0})
                s["seconds"] += time.perf_counter() - t0
                s["calls"] += 1
                s["peak_rss_gib_so_far"] = round(vm_hwm_kb() / 2**20, 2)

        saved.append((mod, name, fn))
        setattr(mod, name, timed)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def check(report: dict, truth: dict, n_test: int) -> dict:
    def path(kind, row):
        return f"/data/{kind}/{row:07d}.jpg"

    flagged = {it["test"]: it["train"] for it in report["items"]}
    planted = {path("test", p["test_row"]): path("train", p["train_row"]) for p in truth["planted"]}
    near = {path("test", p["test_row"]) for p in truth["near_miss"]}
    found = sum(flagged.get(q) == r for q, r in planted.items())
    wrong_partner = sum(q in flagged and flagged[q] != r for q, r in planted.items())
    fp_near = len(near & set(flagged))
    fp_other = len(set(flagged) - set(planted) - near)
    tp = found + wrong_partner
    return {"planted": len(planted), "found": found, "found_with_other_partner": wrong_partner,
            "recall": round(found / len(planted), 4) if planted else None,
            "flagged": len(flagged), "near_misses": len(near), "near_misses_flagged": fp_near,
            "unrelated_flagged": fp_other, "precision": round(tp / len(flagged), 4) if flagged else None,
            "planted_cosine_range": [round(min(p["cosine"] for p in truth["planted"]), 4),
                                     round(max(p["cosine"] for p in truth["planted"]), 4)],
            "near_miss_cosine_range": [round(min(p["cosine"] for p in truth["near_miss"]), 4),
                                       round(max(p["cosine"] for p in truth["near_miss"]), 4)],
            "test_items": n_test}


def exact_check(root: Path, truth: dict, report: dict, n_test: int, sample: int, threshold: float) -> dict:
    """Exact nearest training row (a full scan of the parts) for the planted and near-miss test rows and
    ``sample`` random others: test items truly above the threshold that the report missed, and the
    exact scan's seconds per query beside the index's (the search the index replaces)."""
    from clipforge.search.index import read_part, scan_embeddings

    rng = np.random.default_rng(1)
    special = [p["test_row"] for p in truth["planted"] + truth["near_miss"]]
    others = np.setdiff1d(rng.choice(n_test, size=min(n_test, sample + len(special)), replace=False), special)[:sample]
    rows = np.concatenate([np.array(special, np.int64), others])
    test_parts, _ = scan_embeddings(root / "test_emb")
    q = np.concatenate([read_part(p) for p in test_parts])[rows]  # [q, d]
    best = np.full(len(rows), -np.inf, np.float32)
    arg = np.full(len(rows), -1, np.int64)
    t0 = time.perf_counter()
    start = 0
    for part in scan_embeddings(root / "train_emb")[0]:
        s = q @ read_part(part).T  # [q, rows]
        j = s.argmax(1)
        m = s[np.arange(len(rows)), j]
        better = m > best
        best[better], arg[better] = m[better], start + j[better]
        start += part.rows
    seconds = time.perf_counter() - t0
    flagged = {it["test"] for it in report["items"]}
    above = [int(r) for r, b in zip(rows, best) if b > threshold]
    missed = [r for r in above if f"/data/test/{r:07d}.jpg" not in flagged]
    return {"queries": len(rows), "random_queries": len(others), "above_threshold": len(above),
            "above_threshold_among_random": int((best[len(special):] > threshold).sum()),
            "missed_by_report": len(missed), "seconds": round(seconds, 1),
            "ms_per_query": round(1000 * seconds / len(rows), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1_000_000)
    ap.add_argument("--test", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centres", type=int, default=2000, help="clusters the vectors are drawn around")
    ap.add_argument("--plant", type=int, default=1000, help="planted near-duplicate pairs (and as many near-misses)")
    ap.add_argument("--threshold", type=float, default=0.9, help="the stated cosine threshold")
    ap.add_argument("--root", default="/tmp/clipforge_scale")
    ap.add_argument("--keep", action="store_true", help="keep the inputs and the work folder under --root")
    ap.add_argument("--exact-sample", type=int, default=1000,
                    help="random test rows checked by exact search, besides the planted and near-miss rows (0: none)")
    ap.add_argument("--target-minutes", type=float, default=15.0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    from clipforge.cli import main as cli

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    truth = write_inputs(root, args.train, args.test, args.plant, args.dim, args.centres, seed=0)
    write_s = time.perf_counter() - t0
    print(f"inputs written in {write_s:.0f} s (not timed below)", flush=True)
    reset_peak_rss()  # the figures below are the analysis's own
    argv = ["data", "overlap", "--train", str(root / "train_emb"), "--test", str(root / "test_emb"),
            "--out", str(root / "run" / "overlap.json"), "--work", str(root / "run" / "work"),
            "--threshold", str(args.threshold), "--no-perceptual", "--no-progress"]
    stages: dict = {}
    load = os.getloadavg()
    t1 = time.perf_counter()
    with stage_timers(stages):
        rc = cli(argv)
    total = time.perf_counter() - t1
    if rc != 0:
        raise SystemExit(f"clipforge data overlap exited with {rc}")
    report = json.loads((root / "run" / "overlap.json").read_text())
    index_info = json.loads((root / "run" / "work" / "train_index" / "index.json").read_text())
    # find_overlap holds the search: what is left of it is opening the index and verifying candidates.
    fo = stages.pop("find_overlap")
    order = ["load_test_vectors", "build_train_index", "search", "open_index_and_verify", "plot"]
    stages["open_index_and_verify"] = {"seconds": fo["seconds"] - stages["search"]["seconds"], "calls": 1,
                                       "peak_rss_gib_so_far": fo["peak_rss_gib_so_far"]}
    stages["other (arguments, report files)"] = {"seconds": total - sum(stages[s]["seconds"] for s in order),
                                                 "calls": 1, "peak_rss_gib_so_far": round(vm_hwm_kb() / 2**20, 2)}
    for s in stages.values():
        s["seconds"] = round(s["seconds"], 1)
    rows = [(s, stages[s]["seconds"], stages[s]["peak_rss_gib_so_far"]) for s in
            order + ["other (arguments, report files)"]]
    rows.append(("total", round(total, 1), round(vm_hwm_kb() / 2**20, 2)))
    table = print_table(rows, ["stage", "seconds", "peak RSS GiB (so far)"])
    found = check(report, truth, args.test)
    if args.exact_sample:
        found["exact_check"] = exact_check(root, truth, report, args.test, args.exact_sample, args.threshold)
        index_ms = 1000 * stages["search"]["seconds"] / args.test
        found["exact_check"]["index_search_ms_per_query"] = round(index_ms, 3)
        found["exact_check"]["index_speedup_vs_exact_scan"] = round(found["exact_check"]["ms_per_query"] / index_ms, 1)
    print(json.dumps(found, indent=1))
    record = {
        "benchmark": "overlap_scale", "command_run": "clipforge " + " ".join(argv),
        "inputs": {"train": args.train, "test": args.test, "dim": args.dim, "dtype": "float16", "part_rows": PART,
                   "vectors": "synthetic: 2,000 clusters, within-cluster pairwise cosine 0.5-0.8",
                   "planted_pairs": args.plant, "near_misses": args.plant, "write_seconds_untimed": round(write_s, 1)},
        "threshold": args.threshold,
        "index": {k: index_info.get(k) for k in ("kind", "reason", "params", "recall", "count")},
        "stages": stages, "table": table, "total_seconds": round(total, 1),
        "peak_rss_gib": round(vm_hwm_kb() / 2**20, 2), "target_minutes": args.target_minutes,
        "target_met": total <= args.target_minutes * 60, "load_average_at_start": list(load),
        "detection": found, "report_flagged": report["flagged"], "overlap_fraction": report["overlap_fraction"],
    }
    print(f"total {total / 60:.1f} min (target {args.target_minutes:g} min: "
          f"{'met' if record['target_met'] else 'missed'}); load average at start {load[0]:.1f}")
    if not args.no_record:
        print("record:", write_record("overlap_scale", record, "cpu",
                                      code_paths=("src/clipforge/hygiene", "src/clipforge/search")))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

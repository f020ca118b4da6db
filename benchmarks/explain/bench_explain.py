"""Explanation maps, measured: the pointing game on the data world, the randomised-weights sanity
check, and the time per image.

    .venv/bin/python benchmarks/explain/bench_explain.py --model demo_out/run/final --world demo_out/world

- Each method (``--methods``, default the model's) at each ``--shifts`` (passes per axis over
  shifted copies: finer maps) and each ``--refine`` (``guided``: the map fitted to the image's colour
  edges, the library's default; ``none``: bilinear). Printed rows name the passes (``x4``: shifts 2).
- Pointing game: for one-object test images the text names the object ("a photo of a red circle.");
  for two-object images whose objects differ in colour and shape, each object is named in turn
  while the other is present. A hit: the map's maximum lies on a pixel the named object covers
  (``clipforge.data.synth.render.object_mask``, the generator's own drawing). Chance: the mean share
  of the image the named object covers (a uniformly random point's hit rate). Also reported: hits
  inside the object's outline (its holes filled: a ring's middle counts), within the pointing game's
  usual tolerance (Zhang et al. 2016: 15 px at 224 px, 4.3 px at 64 px), strict hits per shape, and
  the peak's mean offset from the object's centre (near zero when the grid is drawn in the right place).
- Sanity check (Adebayo et al. 2018): the same maps from the same architecture with random weights;
  the Spearman rank correlation of each pair of maps, averaged. A method passes below 0.3.
- Speed: seconds per 224 px image for ViT-B-32 (random weights) with each method, median of 5 after
  a warm-up, at each of ``--speed-threads`` (default the machine's thread count).

Writes results/explain-cpu-latest.json and, with --panel, a picture of maps from the model (the
largest --shifts, the last --refine).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_record  # noqa: E402

import clipforge  # noqa: E402
from clipforge.data.synth.render import object_mask  # noqa: E402
from clipforge.data.synth.world import Obj  # noqa: E402
from clipforge.explanations import explain, methods_for  # noqa: E402
from clipforge.explanations.render import model_view, panel  # noqa: E402

# The pointing game's usual tolerance (Zhang et al. 2016: 15 px at 224 px), as a fraction of the side.
TOLERANCE = 15 / 224


def _objects(row: dict) -> list[Obj]:
    out = []
    for o in json.loads(row["objects"]):
        out.append(Obj(o["colour"], o["shape"], o["size"], 0, 0, o["x"], o["y"], o["extent"], o["rotation"]))
    return out


def trials(world: Path, split: str, n_one: int, n_two: int) -> tuple[list, list]:
    """([(image path, named object, text)] for one-object images, the same for two-object ones)."""
    one, two = [], []
    with open(world / f"{split}.csv", newline="") as f:
        for row in csv.DictReader(f):
            objs = _objects(row)
            path = world / row["image"]
            if len(objs) == 1 and len(one) < n_one:
                one.append((path, objs[0], _text(objs[0])))
            elif len(objs) == 2 and len(two) < 2 * n_two:
                a, b = objs
                if a.colour != b.colour and a.shape != b.shape:
                    two += [(path, a, _text(a)), (path, b, _text(b))]
            if len(one) >= n_one and len(two) >= 2 * n_two:
                break
    return one, two


def _text(obj: Obj) -> str:
    return f"a photo of a {obj.colour} {obj.shape}."


def pointing(model, items: list, method: str, size: int, shifts: int, refine: str) -> dict:
    """Hit rates (strict; inside the object's outline, holes filled: a ring's middle; within the
    pointing game's usual tolerance), per shape, chance, the peak's mean offset from the object's
    centre in pixels (y, x: a misdrawn grid shows as a bias), and the maps."""
    hits, inner, near, shares, maps, offsets = [], [], [], [], [], []
    per_shape: dict[str, list[bool]] = {}
    tolerance = TOLERANCE * size
    for path, obj, text in items:
        m = explain(model, Image.open(path).convert("RGB"), text, method=method, shifts=shifts, refine=refine).numpy()
        mask = object_mask(obj, size)
        if m.shape != mask.shape:
            raise SystemExit(f"map {m.shape} and image {mask.shape} differ: the world's images must be the model's size")
        y, x = np.unravel_index(int(m.argmax()), m.shape)
        hits.append(bool(mask[y, x]))
        per_shape.setdefault(obj.shape, []).append(hits[-1])
        inner.append(bool(ndimage.binary_fill_holes(mask)[y, x]))
        near.append(bool(ndimage.distance_transform_edt(~mask)[y, x] <= tolerance))
        shares.append(float(mask.mean()))
        offsets.append(np.array([y, x]) - np.argwhere(mask).mean(0))
        maps.append(m)
    return {"hit": float(np.mean(hits)), "hit_outline": float(np.mean(inner)), "hit_tolerant": float(np.mean(near)),
            "chance": float(np.mean(shares)), "per_shape": {k: round(float(np.mean(v)), 3) for k, v in sorted(per_shape.items())},
            "peak_offset_px": [round(float(v), 2) for v in np.mean(offsets, axis=0)], "maps": maps}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (tied values share their mean rank: Grad-CAM's rectified
    maps are flat zero over large areas); 0 where either map is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a.ravel(), b.ravel()).statistic)


def speed(methods_arch: str, reps: int = 5) -> dict:
    torch.manual_seed(0)
    model = clipforge.create_model(methods_arch).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    out = {}
    for method in methods_for(model):
        explain(model, image, "a photo of a dog.", method=method)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            explain(model, image, "a photo of a dog.", method=method)
            times.append(time.perf_counter() - t0)
        out[method] = round(statistics.median(times), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained model on the data world (the demo's)")
    ap.add_argument("--world", required=True, help="the data world it was trained on (its test split is used)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--one", type=int, default=200, help="one-object images")
    ap.add_argument("--two", type=int, default=100, help="two-object images (each object named in turn)")
    ap.add_argument("--shifts", type=int, nargs="+", default=[1, 4], help="passes per axis to measure [1 4]")
    ap.add_argument("--refine", nargs="+", default=["none", "guided"], choices=["none", "guided"],
                    help="refinements to measure [none guided]")
    ap.add_argument("--methods", nargs="+", default=None, help="methods to measure (default: the model's)")
    ap.add_argument("--speed-arch", default="ViT-B-32")
    ap.add_argument("--speed-threads", type=int, nargs="+", default=None, metavar="N",
                    help="thread counts to time at (default: the machine's)")
    ap.add_argument("--speed-from", default=None, metavar="RECORD",
                    help="keep the pointing and sanity figures of this record and measure only the speed again")
    ap.add_argument("--panel", default=None, help="PNG: maps of the model for one two-object image")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny-model passes: one thread is as fast, and fair to a shared machine
    model, _ = clipforge.load(args.model)
    model.eval()
    size = model.config.preprocess.image_size
    random = _randomised(model)
    one, two = trials(Path(args.world), args.split, args.one, args.two)
    record_methods = json.loads(Path(args.speed_from).read_text())["methods"] if args.speed_from else {}
    runs = [(m, s, r) for m in args.methods or methods_for(model) for s in args.shifts for r in args.refine]
    for method, shifts, refine in [] if args.speed_from else runs:
        t0 = time.perf_counter()
        p1 = pointing(model, one, method, size, shifts, refine)
        p2 = pointing(model, two, method, size, shifts, refine)
        rand = pointing(random, one, method, size, shifts, refine)
        rho = float(np.mean([spearman(a, b) for a, b in zip(p1["maps"], rand["maps"])]))
        name = f"{method}@{shifts}" + ("" if refine == "none" else f"+{refine}")
        record_methods[name] = {
            "method": method, "shifts": shifts, "refine": refine,
            "pointing_one_object": round(p1["hit"], 4), "pointing_one_object_outline": round(p1["hit_outline"], 4),
            "pointing_one_object_tolerant": round(p1["hit_tolerant"], 4),
            "chance_one_object": round(p1["chance"], 4), "one_object_per_shape": p1["per_shape"],
            "peak_offset_px_one_object": p1["peak_offset_px"],
            "pointing_two_objects": round(p2["hit"], 4), "pointing_two_objects_outline": round(p2["hit_outline"], 4),
            "pointing_two_objects_tolerant": round(p2["hit_tolerant"], 4),
            "chance_two_objects": round(p2["chance"], 4),
            "sanity_spearman_vs_random_weights": round(rho, 4), "sanity_passed": rho < 0.3,
            "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        print(f"{method:9s} x{shifts * shifts:<2d} {refine:6s} one object {100 * p1['hit']:5.1f}% (outline {100 * p1['hit_outline']:5.1f}%, "
              f"{100 * p1['hit_tolerant']:5.1f}% within {TOLERANCE * size:.1f} px; chance {100 * p1['chance']:4.1f}%; "
              f"peak offset {p1['peak_offset_px']} px)  two objects {100 * p2['hit']:5.1f}% (outline "
              f"{100 * p2['hit_outline']:5.1f}%, {100 * p2['hit_tolerant']:5.1f}%; chance {100 * p2['chance']:4.1f}%)  "
              f"spearman vs random weights {rho:+.3f}", flush=True)
    timing = {}
    for n in args.speed_threads or [threads]:
        torch.set_num_threads(n)
        timing[f"{n}_threads"] = speed(args.speed_arch)
        print(f"seconds per 224 px image, {args.speed_arch}, {n} threads: {timing[f'{n}_threads']}")
    torch.set_num_threads(threads)
    best = max((m for m in record_methods if record_methods[m]["sanity_passed"]),
               key=lambda m: record_methods[m]["pointing_two_objects"] + record_methods[m]["pointing_one_object"])
    record = {
        "model": args.model, "world": args.world, "split": args.split, "one_object_images": len(one),
        "two_object_trials": len(two), "methods": record_methods, "best_method": best,
        "targets": {"pointing_one_object": 0.9, "pointing_two_objects": 0.8, "sanity_spearman_below": 0.3,
                    "seconds_per_image_default": 1.0},
        "speed_arch": args.speed_arch, "seconds_per_image": timing,
        "pointing_from": json.loads(Path(args.speed_from).read_text())["file"] if args.speed_from else None,
        "default_method": methods_for(clipforge.create_model(args.speed_arch))[0],
    }  # fmt: skip
    print("record:", write_record("explain", record, out_dir=Path(args.out_dir) if args.out_dir else None))
    if args.panel:
        _panel(model, two, args.panel, max(args.shifts), args.refine[-1])


def _randomised(model):
    """The same architecture with fresh random weights (the full randomisation of the sanity check)."""
    from clipforge.model.clip import CLIP

    torch.manual_seed(1234)
    return CLIP(model.config).eval()


def _panel(model, two: list, out: str, shifts: int, refine: str) -> None:
    path, a, text_a = two[0]
    _, b, text_b = two[1]
    image = Image.open(path).convert("RGB")
    texts = [text_a, text_b, f"a photo of a {a.colour} {b.shape}."]
    pictures = []
    for method in methods_for(model):
        maps = explain(model, image, texts, method=method, shifts=shifts, refine=refine).numpy()
        pictures.append(panel(model_view(image, model.config.preprocess), maps, [f"{method}: {t}" for t in texts]))
    sheet = Image.new("RGB", (pictures[0].width, sum(p.height for p in pictures)), (255, 255, 255))
    y = 0
    for p in pictures:
        sheet.paste(p, (0, y))
        y += p.height
    sheet.save(out)
    print("panel:", out)


if __name__ == "__main__":
    main()

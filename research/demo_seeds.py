"""The demo's own pipeline (``clipforge.demo.pipeline.run_demo``: its loader, trainer and evaluation)
at a fixed step count, with a training seed of its own on one shared data world, so that a setting
can be compared over several seeds as the demo itself runs it (benchmarks/demo/RESULTS.md,
"Only copies the training captions could be"). The demo always trains with seed 0; its world
(seed 0: held-out pairs black hexagon, orange cross, ...) stays the same here whatever the
training seed. One JSON line per run goes to --results.

  python research/demo_seeds.py --world demo_out/world --out /tmp/seeds/s1 --steps 1800 --seed 1 \\
      [--no-attested] [--vision stem_gray=16] [--vision patch_size=16]

--no-attested makes every swapped copy, as the demo did before ``swap_attested``; --vision KEY=VALUE
changes one field of tiny-bow's image tower (VisionConfig), e.g. stem_gray=16 for colour-blind first
filters or patch_size=16 for a four-stage stem and a 4x4 grid.
"""
import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from clipforge.demo import pipeline

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--world", required=True, help="a generated demo world (demo_out/world), shared by every run")
p.add_argument("--out", required=True, help="this run's folder (its world is a link to --world)")
p.add_argument("--steps", type=int, default=1800)
p.add_argument("--seed", type=int, default=0, help="training seed (the world keeps its own)")
p.add_argument("--no-attested", action="store_true", help="every swapped copy (DemoConfig.swap_attested off)")
p.add_argument("--vision", action="append", default=[], metavar="KEY=VALUE",
               help="a field of tiny-bow's VisionConfig (int or float), repeatable")
p.add_argument("--results", default="demo_seeds.jsonl", help="append one JSON line per run here")
a = p.parse_args()

out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
if not (out / "world").exists():
    os.symlink(Path(a.world).resolve(), out / "world")
vision = {k: (float(v) if "." in v else int(v)) for k, v in (kv.split("=", 1) for kv in a.vision)}
if vision:
    from clipforge.model import registry

    base = registry._ARCHITECTURES["tiny-bow"]
    registry._ARCHITECTURES["tiny-bow"] = replace(base, vision=replace(base.vision, **vision))
train_config = pipeline.DemoConfig.train_config
pipeline.DemoConfig.train_config = lambda self, *args, **kw: train_config(self, *args, **{**kw, "seed": a.seed})
t0 = time.time()
s = pipeline.run_demo(pipeline.DemoConfig(out=str(out), steps=a.steps, progress=False,
                                          swap_attested=not a.no_attested))
zs = s["results"]["zeroshot"]
shape = zs["shape"]
row = {"out": str(out), "steps": a.steps, "seed": a.seed, "attested": not a.no_attested, "vision": vision,
       **{t: round(100 * zs[t]["test"]["ensemble"], 1) for t in ("colour", "count", "position", "size", "shape")},
       "heldout_shape": round(100 * shape["test_heldout"]["ensemble"], 1),
       "heldout_gap": round(100 * (shape["test"]["ensemble"] - shape["test_heldout"]["ensemble"]), 1),
       "by_pair": {k: round(100 * v["accuracy"], 1) for k, v in shape["test_heldout"]["by_group"].items()},
       "train_s": round(s["timings"]["train_s"]), "wall_s": round(time.time() - t0)}
print(json.dumps(row))
with open(a.results, "a") as f:
    f.write(json.dumps(row) + "\n")

"""Why a trained demo model misses held-out colour-shape pairs: shape read off one and the same
object in every colour (benchmarks/demo/RESULTS.md, "Why the held-out pairs fail").

Every single-object scene of the world's test and test_heldout splits is rendered again in each of
the ten colours (same shape, size, place, rotation, background, noise), so every (shape, colour)
cell holds the same geometry. Printed:

- zero-shot shape accuracy (the world's ensemble prompts) per shape and colour;
- for the confusable pairs (hexagon vs circle, cross vs star), within each colour: the AUC with which
  the score difference s(a) - s(b) (cosine x 100 against the two class embeddings) tells a's objects
  from b's, the separation of the two means ("sep") and their midpoint ("mid"). A colour whose
  |mid| exceeds sep / 2 has its boundary on the wrong side for most of one shape.

    python research/demo_heldout_diag.py --model demo_out/run/final --world demo_out/world
    python research/demo_sweep.py ... --save /tmp/m   # then --model /tmp/m (a sweep's model)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import numpy as np
import torch
import torch.nn.functional as F

import clipforge
from clipforge.data.synth import SynthConfig, make_sample
from clipforge.data.synth.render import render
from clipforge.data.synth.world import COLOURS, SHAPES
from clipforge.eval.zeroshot import build_zeroshot_classifier

PAIRS = (("hexagon", "circle"), ("cross", "star"))


def lines(path: str) -> list[str]:
    with open(path) as f:
        return [x for x in f.read().split("\n") if x]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a saved model (clipforge format): demo_out/run/final")
    p.add_argument("--world", required=True, help="the data world it was trained on: demo_out/world")
    p.add_argument("--per-shape", type=int, default=150, help="scenes per shape for the pair statistics")
    a = p.parse_args()
    torch.set_num_threads(1)
    with open(f"{a.world}/world.json") as f:
        cfg = SynthConfig(**json.load(f)["config"])
    model, pre = clipforge.load(a.model)
    classes = lines(f"{a.world}/tasks/shape_classes.txt")
    weights = build_zeroshot_classifier(model, classes, lines(f"{a.world}/tasks/shape_templates.txt"))
    scenes = [s for split, n in (("test", cfg.test), ("test_heldout", cfg.shifted)) for i in range(n)
              for s in [make_sample(cfg, split, i).scene] if s.count == 1]

    @torch.no_grad()
    def scores(group: list, colour: str) -> torch.Tensor:  # [N, classes], cosine x 100
        x = torch.stack([pre(render(dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], colour=colour),)),
                                    cfg.image_size)) for s in group])
        f = torch.cat([model.encode_image(x[i:i + 256]) for i in range(0, len(x), 256)])
        return 100 * F.normalize(f.float(), dim=-1) @ weights

    right = collections.defaultdict(list)
    for c in COLOURS:
        pred = scores(scenes, c).argmax(1).tolist()
        for s, k in zip(scenes, pred):
            right[(s.objects[0].shape, c)].append(classes[k] == s.objects[0].shape)
    print("shape accuracy (%), one object recoloured; rows: shape, columns: colour")
    print(f"{'':10}" + "".join(f"{c[:6]:>7}" for c in COLOURS))
    for sh in SHAPES:
        print(f"{sh:10}" + "".join(f"{100 * np.mean(right[(sh, c)]):7.1f}" for c in COLOURS))
    for x, y in PAIRS:
        ix, iy = classes.index(x), classes.index(y)
        sx, sy = ([s for s in scenes if s.objects[0].shape == k][:a.per_shape] for k in (x, y))
        print(f"\n{x} vs {y}: score difference s({x}) - s({y}) within each colour")
        for c in COLOURS:
            dx, dy = ((d[:, ix] - d[:, iy]).numpy() for d in (scores(sx, c), scores(sy, c)))
            auc = float((dx[:, None] > dy[None, :]).mean())
            print(f"  {c:7} AUC {auc:.2f}  sep {dx.mean() - dy.mean():5.1f}  mid {(dx.mean() + dy.mean()) / 2:+5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

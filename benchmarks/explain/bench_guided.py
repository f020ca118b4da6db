"""clipforge's guided filter (``clipforge.explanations.refine.guided_filter``) against kornia's
``kornia.filters.guided_blur``, the library one would otherwise take it from: time per map on one
thread (calls alternating, medians) at the demo's 64 px (radius 4) and ViT-B-32's 224 px (radius 16),
and how far the outputs differ (kornia pads the windows by reflection where clipforge cuts them at the border).

    .venv/bin/pip install kornia   # not a clipforge dependency
    .venv/bin/python benchmarks/explain/bench_guided.py

Writes results/guided_filter-cpu-latest.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import alternate, summarize, write_record  # noqa: E402

from clipforge.explanations.refine import guided_filter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    try:
        from kornia.filters import guided_blur
    except ImportError:
        raise SystemExit("kornia is not installed: .venv/bin/pip install kornia") from None
    import kornia

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = {}
    for size, radius in ((64, 4), (224, 16)):
        maps, guide = torch.rand(1, size, size), torch.randn(3, size, size)
        out = {}
        fns = {"clipforge": lambda: out.__setitem__("clipforge", guided_filter(maps, guide, radius)),
               "kornia": lambda: out.__setitem__("kornia", guided_blur(guide[None], maps[None], 2 * radius + 1, 1e-2)[0])}
        med = summarize(alternate(fns, args.reps), reference="clipforge")["median_s"]
        ours, theirs = med["clipforge"], med["kornia"]
        diff = out["clipforge"] - out["kornia"]
        inner = diff[..., 2 * radius:-2 * radius, 2 * radius:-2 * radius]  # beyond the border windows of both passes
        rows[f"{size}px"] = {"radius": radius, "clipforge_ms": round(1000 * ours, 2), "kornia_ms": round(1000 * theirs, 2),
                             "kornia_over_clipforge": round(theirs / ours, 2),
                             "max_abs_diff": round(float(diff.abs().max()), 5),
                             "max_abs_diff_inside": round(float(inner.abs().max()), 5)}  # fmt: skip
        print(f"{size} px, radius {radius}: clipforge {1000 * ours:.1f} ms, kornia {1000 * theirs:.1f} ms "
              f"({theirs / ours:.1f}x); max |diff| {rows[f'{size}px']['max_abs_diff']} "
              f"({rows[f'{size}px']['max_abs_diff_inside']} away from the border)")
    print("record:", write_record("guided_filter", {"kornia": kornia.__version__, "threads": 1, "sizes": rows},
                                  code_paths=("src/clipforge/explanations",)))


if __name__ == "__main__":
    main()

"""Finding 6: zero-shot error against training compute over model sizes (the paper's Figure 9).

Each size is trained by the library's trainer for the same number of steps on the same data, so
compute grows with the model alone (the paper also trained every size for the same 32 epochs).
Compute is the training FLOPs: 3 x the forward FLOPs of one image + its caption (counted by
torch on real captions) x samples seen. Error is 1 - the mean zero-shot accuracy over the class
tasks (template ensemble, test split); a power law is fitted in log-log space.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from clipforge.experiments.common import (
    CLASS_TASKS, ensure_world, figure, load_split, load_task_specs, mean_std, print_table, record, save_figure, write_json,
)
from clipforge.experiments.config import ExperimentConfig, model_config
from clipforge.experiments.learnt import chance_levels, gate, learnt_check
from clipforge.experiments.shared import clip_world_eval

NAME = "scaling"
CLAIM = ("Zero-shot error falls smoothly with training compute: over 44x of compute (5 ResNet CLIP models) the "
         "average zero-shot error on 36 datasets follows a log-log linear trend, though single datasets can be "
         "noisier (CLIP paper, Section 3.1.7, Figure 9).")


def size_profile(size: str, captions: list[str]) -> tuple[float, int]:
    """(forward FLOPs of one image + one caption, mean over ``captions``; parameters) of a size."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.model import factory

    cfg = model_config(size)
    model = factory.create_model(cfg).eval()
    images = torch.zeros(len(captions), 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = factory.tokenize(captions)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images, tokens)
    return counter.get_total_flops() / len(captions), sum(p.numel() for p in model.parameters())


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    t0 = time.time()
    scale = cfg.scale
    world = ensure_world(cfg)
    captions = load_split(world, "val").captions[:64]
    sizes = list(scale.scaling_models)
    samples = scale.scaling_steps * scale.batch_size
    per_size: dict[str, Any] = {}
    for size in sizes:
        flops, params = size_profile(size, captions)
        runs = [clip_world_eval(cfg, s, size, scale.scaling_steps, splits=("test",)) for s in cfg.seeds]
        accs = [{t: r["zeroshot"][t]["test"]["ensemble"] for t in CLASS_TASKS if t in r["zeroshot"]} for r in runs]
        errors = [1 - float(np.mean(list(a.values()))) for a in accs]
        relation = [r["zeroshot"]["relation"]["test"]["ensemble"] for r in runs if "relation" in r["zeroshot"]]
        per_size[size] = {
            "params_m": params / 1e6,
            "forward_gflops_per_sample": flops / 1e9, "train_pflops": 3 * flops * samples / 1e15,
            "error_per_seed": errors, "error": mean_std(errors), "acc_per_task": accs,
            "relation_acc": mean_std(relation) if relation else None,
            "train_s": [r["train"]["wall_time_s"] for r in runs],
        }
    x = np.log10([per_size[s]["train_pflops"] for s in sizes])
    y = np.log10([per_size[s]["error"][0] for s in sizes])
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    r2 = 1 - float(np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12))
    errs = [per_size[s]["error"][0] for s in sizes]
    summary = {
        "sizes": sizes, "per_size": per_size, "samples_seen": samples,
        "power_law": {"slope": float(slope), "intercept": float(intercept), "r2": r2},
        "monotone": all(b < a for a, b in zip(errs, errs[1:])),
        "compute_range": float(10 ** (x.max() - x.min())),
    }
    # The largest size must learn every task averaged: smaller ones may not (that is the curve).
    top = per_size[sizes[-1]]["acc_per_task"]
    specs = {t: v for t, v in load_task_specs(world).items() if t in top[0]}
    check = learnt_check({t: [a[t] for a in top] for t in specs}, chance_levels(specs), scale.learnt_margin,
                         f"zero-shot {sizes[-1]} (the largest size), template ensemble, test")
    verdict = gate(verdict_rule(summary), check)
    print_table(f"Finding 6: zero-shot error vs training compute, {len(cfg.seeds)} seeds, {scale.scaling_steps} steps "
                f"x {scale.batch_size}", ["size", "params (M)", "train PFLOP", "error (%)", "relation acc (%)"],
                [[s, f"{per_size[s]['params_m']:.2f}", f"{per_size[s]['train_pflops']:.3g}",
                  f"{100 * per_size[s]['error'][0]:.1f}±{100 * per_size[s]['error'][1]:.1f}",
                  "-" if per_size[s]["relation_acc"] is None else f"{100 * per_size[s]['relation_acc'][0]:.1f}"]
                 for s in sizes])
    print(f"log-log fit: error ∝ compute^{slope:.3f}, R² = {r2:.3f}, monotone: {summary['monotone']}\n", flush=True)
    _plot(summary, cfg)
    rec = record(cfg, NAME, CLAIM, {"per_size": per_size}, summary, verdict, time.time() - t0)
    write_json(cfg.out / f"{NAME}.json", rec)
    return rec


def verdict_rule(summary: dict[str, Any]) -> dict[str, Any]:
    mono, r2 = summary["monotone"], summary["power_law"]["r2"]
    smooth = mono and r2 >= 0.9 and summary["power_law"]["slope"] < 0
    errs = [summary["per_size"][s]["error"][0] for s in summary["sizes"]]
    overall = errs[-1] < errs[0]
    verdict = "reproduced" if smooth else "partly" if overall else "not reproduced"
    return {"verdict": verdict, "criterion": "mean error falls monotonically with compute over all sizes and a "
            "log-log line fits it with R² >= 0.9; partly: the largest model beats the smallest but the trend is not "
            "smooth", "monotone": mono, "r2": r2}


def _plot(summary: dict[str, Any], cfg: ExperimentConfig) -> None:
    fig, axes = figure(5.2, 3.8)
    ax = axes[0][0]
    sizes, per = summary["sizes"], summary["per_size"]
    for s in sizes:
        c = per[s]["train_pflops"]
        ax.scatter([c] * len(per[s]["error_per_seed"]), [100 * e for e in per[s]["error_per_seed"]], color="tab:blue",
                   alpha=0.35, s=14)
        m, sd = per[s]["error"]
        ax.errorbar([c], [100 * m], yerr=[100 * sd], marker="o", color="tab:blue", capsize=3)
        ax.annotate(s, (c, 100 * m), textcoords="offset points", xytext=(5, 5), fontsize=8)
    xs = np.array([per[s]["train_pflops"] for s in sizes])
    pl = summary["power_law"]
    line = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 50)
    ax.plot(line, 100 * 10 ** (pl["slope"] * np.log10(line) + pl["intercept"]), "--", color="grey",
            label=f"error ∝ C^{pl['slope']:.2f} (R² {pl['r2']:.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (PFLOP)")
    ax.set_ylabel("zero-shot error (%, mean of tasks)")
    ax.set_title(f"Scaling: {len(sizes)} sizes, {len(cfg.seeds)} seeds each", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, cfg.out / f"{NAME}.png")

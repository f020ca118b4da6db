"""Finding 4: linear probe on CLIP features vs. a supervised model of the same size (Section 3.2).

Both feature extractors have the same image tower (architecture, samples seen, optimizer); one
learnt from captions (contrastive), the other from the world's labels. A full linear probe (C
chosen on the validation split, refit on train + val) is fitted on each, per task. The label
tasks are *in-domain* for the supervised model (it was trained on exactly those labels, like an
ImageNet model probed on ImageNet); ``background`` is a *transfer* task: no label, only some
captions, ever name the background.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from clipforge.data.synth.world import SEEN_BACKGROUNDS
from clipforge.experiments.common import (
    ensure_world, figure, mean_std, pm, print_table, record, save_figure, write_json,
)
from clipforge.experiments.config import ExperimentConfig
from clipforge.experiments.learnt import chance_levels, gate, learnt_check, merge_checks
from clipforge.experiments.shared import (
    class_tasks, clip_world_eval, features, fitted_probe, probe_accuracy, supervised_model,
)

NAME = "probe"
CLAIM = ("Linear probes on CLIP's image features outperform those on the features of strong supervised ImageNet "
         "models on most datasets (the best CLIP beats the best ImageNet model on 20 of 27 transfer datasets), "
         "although a supervised model still wins on its own training distribution (ImageNet) "
         "(CLIP paper, Section 3.2, Figure 10).")
TRANSFER = {"background": {"label_column": "background", "classes": list(SEEN_BACKGROUNDS)}}
KINDS = ("clip", "supervised")


def probe_tasks(world: Any) -> dict[str, dict[str, Any]]:
    return {**class_tasks(world), **TRANSFER}


def probe(cfg: ExperimentConfig, kind: str, seed: int, name: str, task: dict[str, Any]) -> float | None:
    """Test accuracy of the full linear probe (C searched on val, refit on train + val)."""
    model = fitted_probe(cfg, kind, seed, name, task)
    return probe_accuracy(model, *features(cfg, kind, seed, "test"), task)


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    t0 = time.time()
    tasks = probe_tasks(ensure_world(cfg))
    per_seed = []
    for seed in cfg.seeds:
        zs = clip_world_eval(cfg, seed)["zeroshot"]
        _, history = supervised_model(cfg, seed)
        heads = history["history"][-1]["acc"]["test"]
        per_seed.append({name: {
            "clip_probe": probe(cfg, "clip", seed, name, task),
            "supervised_probe": probe(cfg, "supervised", seed, name, task),
            "supervised_heads": heads.get(name),
            "clip_zero_shot": zs[name]["test"]["ensemble"] if name in zs else None,
        } for name, task in tasks.items()})
    cols = ("clip_probe", "supervised_probe", "supervised_heads", "clip_zero_shot")
    summary: dict[str, Any] = {"per_task": {t: {c: mean_std([s[t][c] for s in per_seed if s[t][c] is not None])
                                                for c in cols} for t in tasks}}
    margins = {t: [s[t]["clip_probe"] - s[t]["supervised_probe"] for s in per_seed] for t in tasks}
    summary["clip_minus_supervised_probe"] = {t: mean_std(v) for t, v in margins.items()}
    summary["clip_wins"] = [t for t in tasks if np.mean(margins[t]) > 0]
    summary["in_domain_tasks"] = [t for t in tasks if t not in TRANSFER]
    summary["transfer_tasks"] = list(TRANSFER)
    summary["mean_in_domain"] = {c: mean_std([np.mean([s[t][c] for t in summary["in_domain_tasks"]]) for s in per_seed])
                                 for c in ("clip_probe", "supervised_probe", "supervised_heads")}
    # Both feature extractors must have learnt the label tasks; the transfer task is what is measured.
    labels = {t: tasks[t] for t in summary["in_domain_tasks"]}
    margin = cfg.scale.learnt_margin
    check = merge_checks(
        learnt_check({t: [s[t]["clip_zero_shot"] for s in per_seed] for t in labels}, chance_levels(labels), margin,
                     "zero-shot CLIP, template ensemble, test"),
        learnt_check({t: [s[t]["supervised_heads"] for s in per_seed] for t in labels}, chance_levels(labels),
                     margin, "supervised model's heads, test"))
    verdict = gate(verdict_rule(summary, tasks), check)
    rows = [[t, *("-" if np.isnan(summary["per_task"][t][c][0]) else pm(*summary["per_task"][t][c]) for c in cols),
             f"{100 * summary['clip_minus_supervised_probe'][t][0]:+.1f}"] for t in tasks]
    print_table(f"Finding 4: linear probe accuracy (%) on test, {len(cfg.seeds)} seeds "
                f"({cfg.scale.clip_model} image tower for both)", ["task", *cols, "CLIP - sup. probe"], rows)
    _plot(summary, list(tasks), cfg)
    rec = record(cfg, NAME, CLAIM, {"per_seed": per_seed}, summary, verdict, time.time() - t0)
    write_json(cfg.out / f"{NAME}.json", rec)
    return rec


def verdict_rule(summary: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
    wins = summary["clip_wins"]
    transfer_won = all(t in wins for t in TRANSFER)
    majority = len(wins) > len(tasks) / 2
    verdict = "reproduced" if majority and transfer_won else "partly" if transfer_won or wins else "not reproduced"
    return {"verdict": verdict, "criterion": "CLIP's probe beats the supervised model's probe (mean over seeds) on "
            "most tasks including the transfer task; partly: on the transfer task or on some tasks only",
            "clip_wins": wins, "transfer_won": transfer_won}


def _plot(summary: dict[str, Any], tasks: list[str], cfg: ExperimentConfig) -> None:
    fig, axes = figure(6.5, 3.6)
    ax = axes[0][0]
    x = np.arange(len(tasks))
    bars = (("clip_probe", "CLIP features, linear probe", "tab:green"),
            ("supervised_probe", "supervised features, linear probe", "tab:orange"),
            ("supervised_heads", "supervised model's own heads", "tab:brown"))
    for i, (col, label, colour) in enumerate(bars):
        vals = [summary["per_task"][t][col] for t in tasks]
        ax.bar(x + (i - 1) * 0.27, [0 if np.isnan(m) else 100 * m for m, _ in vals], 0.27,
               yerr=[0 if np.isnan(s) else 100 * s for _, s in vals], capsize=2, color=colour, label=label)
    ax.set_xticks(x, [t + (" (transfer)" if t in TRANSFER else "") for t in tasks], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Linear probes: contrastive vs supervised features, {len(cfg.seeds)} seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, cfg.out / f"{NAME}.png")

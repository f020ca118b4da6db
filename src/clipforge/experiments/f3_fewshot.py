"""Finding 3: zero-shot vs. few-shot linear probes on the same features (the paper's Figure 6).

k-shot L2-regularised logistic regression (the library's ``few_shot``: class-balanced draws, C
searched on a split of each draw when it has 2+ examples per class) on the frozen image
features of the shared CLIP models, k = 1 ... 16, against zero-shot accuracy with the template
ensemble. The "zero-shot equivalent" k is where the probe's curve crosses the zero-shot line
(interpolated in log k).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from clipforge.experiments.common import ensure_world, figure, mean_std, print_table, record, save_figure, write_json
from clipforge.experiments.config import ExperimentConfig
from clipforge.experiments.learnt import chance_levels, gate, learnt_check
from clipforge.experiments.shared import class_tasks, clip_world_eval, features

NAME = "fewshot"
CLAIM = ("Zero-shot CLIP matches the average performance of a 4-shot linear probe trained on the same features, "
         "and beats 1- and 2-shot probes: going from zero-shot to few-shot first costs accuracy, since one example "
         "per class says less than the class name does (CLIP paper, Section 3.1.5, Figure 6).")


def equivalent_shots(shots: Sequence[int], probe: Sequence[float], zero_shot: float) -> float:
    """k at which the probe curve first reaches ``zero_shot`` (log-interpolated); 0 when even the
    smallest k beats it, inf when the largest k stays below."""
    if probe[0] >= zero_shot:
        return 0.0
    for i in range(1, len(shots)):
        if probe[i] >= zero_shot:
            f = (zero_shot - probe[i - 1]) / max(probe[i] - probe[i - 1], 1e-12)
            return float(2 ** (np.log2(shots[i - 1]) + f * (np.log2(shots[i]) - np.log2(shots[i - 1]))))
    return float("inf")


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    from clipforge.eval.fewshot import few_shot
    from clipforge.eval.linear_probe import LinearProbeConfig

    t0 = time.time()
    scale = cfg.scale
    tasks = class_tasks(ensure_world(cfg))
    probe_cfg = LinearProbeConfig(backend="sklearn", refine_steps=scale.probe_refine_steps)
    shots = list(scale.shots)
    per_seed: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        zs = clip_world_eval(cfg, seed)["zeroshot"]
        xtr, train = features(cfg, "clip", seed, "train")
        xte, test = features(cfg, "clip", seed, "test")
        out: dict[str, Any] = {}
        for name, task in tasks.items():
            ytr, yte = train.labels(task), test.labels(task)
            tr, te = ytr >= 0, yte >= 0
            res = few_shot(xtr[tr], ytr[tr], xte[te], yte[te], shots=shots, draws=scale.fewshot_draws,
                           config=probe_cfg, num_classes=len(task["classes"]), seed=seed)
            out[name] = {"zero_shot": zs[name]["test"]["ensemble"],
                         "probe": [r["acc1_mean"] for r in res["details"]["shots"]],
                         "probe_draw_std": [r["acc1_std"] for r in res["details"]["shots"]]}
        out["mean"] = {"zero_shot": float(np.mean([out[t]["zero_shot"] for t in tasks])),
                       "probe": [float(np.mean([out[t]["probe"][i] for t in tasks])) for i in range(len(shots))]}
        # A zero-shot classifier at chance is worth no labelled example: the average over the tasks
        # this seed's CLIP learnt at all (zero-shot > chance + 5 points) is reported beside it.
        learnt = [t for t in tasks if out[t]["zero_shot"] > 1 / len(tasks[t]["classes"]) + 0.05]
        if learnt:
            out["mean_learnt"] = {"tasks": learnt,
                                  "zero_shot": float(np.mean([out[t]["zero_shot"] for t in learnt])),
                                  "probe": [float(np.mean([out[t]["probe"][i] for t in learnt]))
                                            for i in range(len(shots))]}
        for v in out.values():
            v["equivalent_k"] = equivalent_shots(shots, v["probe"], v["zero_shot"])
        per_seed.append(out)
    names = [*tasks, "mean", *(["mean_learnt"] if all("mean_learnt" in s for s in per_seed) else [])]
    chance = {t: 1 / len(task["classes"]) for t, task in tasks.items()}
    chance["mean"] = float(np.mean(list(chance.values())))
    if "mean_learnt" in names:
        chance["mean_learnt"] = float(np.mean([np.mean([chance[t] for t in s["mean_learnt"]["tasks"]])
                                               for s in per_seed]))
    summary: dict[str, Any] = {"shots": shots, "per_task": {}, "chance": chance,
                               "learnt_tasks_per_seed": [s.get("mean_learnt", {}).get("tasks", []) for s in per_seed]}
    for n in names:
        summary["per_task"][n] = {
            "zero_shot": mean_std([s[n]["zero_shot"] for s in per_seed]),
            "probe": [mean_std([s[n]["probe"][i] for s in per_seed]) for i in range(len(shots))],
            "equivalent_k_per_seed": [s[n]["equivalent_k"] for s in per_seed],
        }
        summary["per_task"][n]["equivalent_k_median"] = float(np.median([s[n]["equivalent_k"] for s in per_seed]))
    m = summary["per_task"]["mean"]
    summary["zero_shot_beats_1shot"] = [s["mean"]["zero_shot"] > s["mean"]["probe"][0] for s in per_seed]
    summary["mean_equivalent_k"] = m["equivalent_k_median"]
    check = learnt_check({t: [s[t]["zero_shot"] for s in per_seed] for t in tasks}, chance_levels(tasks),
                         scale.learnt_margin, "zero-shot CLIP, template ensemble, test")
    verdict = gate(verdict_rule(summary), check)
    rows = [[n, f"{100 * summary['per_task'][n]['zero_shot'][0]:.1f}",
             *(f"{100 * a:.1f}" for a, _ in summary["per_task"][n]["probe"]),
             _k(summary["per_task"][n]["equivalent_k_median"])] for n in names]
    print_table(f"Finding 3: zero-shot vs k-shot linear probe (%), {len(cfg.seeds)} seeds x "
                f"{scale.fewshot_draws} draws",
                ["task", "zero-shot", *(f"{k}-shot" for k in shots), "zero-shot = k-shot"], rows)
    _plot(summary, names, cfg)
    rec = record(cfg, NAME, CLAIM, {"per_seed": per_seed}, summary, verdict, time.time() - t0)
    write_json(cfg.out / f"{NAME}.json", rec)
    return rec


def _k(k: float) -> str:
    return "<1" if k == 0 else ">max" if not np.isfinite(k) else f"{k:.1f}"


def verdict_rule(summary: dict[str, Any]) -> dict[str, Any]:
    k = summary["mean_equivalent_k"]
    dip = all(summary["zero_shot_beats_1shot"])
    near = 2 <= k <= 8  # within a factor 2 of the paper's 4 shots
    verdict = "reproduced" if dip and near else "partly" if dip or near else "not reproduced"
    return {"verdict": verdict, "criterion": "task-averaged: zero-shot beats the 1-shot probe in every seed (the dip) "
            "and the zero-shot-equivalent k lies within a factor 2 of the paper's 4 (2 <= k <= 8)",
            "dip_every_seed": dip, "equivalent_k_near_4": near}


def _plot(summary: dict[str, Any], names: list[str], cfg: ExperimentConfig) -> None:
    shots = summary["shots"]
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = figure(3.2 * cols, 2.6 * rows, ncols=cols, nrows=rows)
    for i, n in enumerate(names):
        ax = axes[i // cols][i % cols]
        p = summary["per_task"][n]
        ax.errorbar(shots, [100 * a for a, _ in p["probe"]], yerr=[100 * s for _, s in p["probe"]], marker="o",
                    capsize=2, label="k-shot linear probe")
        ax.axhline(100 * summary["chance"][n], color="grey", linestyle=":", label="chance")
        zm, zs = p["zero_shot"]
        ax.axhline(100 * zm, color="tab:red", linestyle="--", label="zero-shot")
        ax.axhspan(100 * (zm - zs), 100 * (zm + zs), color="tab:red", alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        name = {"mean": "average over tasks", "mean_learnt": "average over learnt tasks"}.get(n, n)
        ax.set_title(f"{name} (zero-shot = {_k(p['equivalent_k_median'])}-shot)", fontsize=8)
        ax.set_xlabel("labelled examples per class", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    save_figure(fig, cfg.out / f"{NAME}.png")

"""Finding 1: contrastive vs. predictive objectives (the paper's Figure 2).

Same image tower, batch, optimizer, augmentation and number of samples seen for each objective;
zero-shot accuracy (mean over the world's class tasks, the task's one good template) at
log-spaced points of training. Efficiency is read off the curves as the paper does: how many
times fewer samples one objective needs to reach the other's final accuracy.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from clipforge.eval.templates import fill
from clipforge.experiments.common import (
    CLASS_TASKS, LoopConfig, SplitData, ensure_world, figure, fit, load_split, load_task_specs, locked,
    log_spaced_steps, mean_std, normalize, print_table, read_json, record, save_figure, seed_everything, write_json,
)
from clipforge.experiments.config import ExperimentConfig, model_config
from clipforge.experiments.learnt import chance_levels, gate, learnt_check
from clipforge.experiments.objectives import KINDS, Objective, Vocab, build_objective
from clipforge.utils import resolve_device

NAME = "objectives"
CLAIM = ("With the same image encoder and compute, predicting a bag-of-words encoding of the caption is 3x more "
         "sample-efficient for zero-shot ImageNet accuracy than predicting the caption with a transformer language "
         "model, and the contrastive objective is a further 4x more efficient (CLIP paper, Section 2.3, Figure 2).")
LABELS = {"caption": "transformer caption prediction", "bow": "bag-of-words prediction",
          "contrastive": "contrastive (CLIP)"}


@torch.no_grad()
def zero_shot(obj: Objective, split: SplitData, tasks: dict[str, dict[str, Any]], device: torch.device,
              batch: int = 250) -> dict[str, float]:
    """Accuracy per task with the task's single template, on the split's labelled rows."""
    out = {}
    for name, task in tasks.items():
        labels = split.labels(task)
        keep = (labels >= 0).nonzero().squeeze(1)
        prompts = [fill(task["template"], c) for c in task["classes"]]
        scores = torch.cat([obj.scores(normalize(split.images[keep[s:s + batch]].to(device)), prompts).cpu()
                            for s in range(0, len(keep), batch)])  # [n, C]
        out[name] = float((scores.argmax(1) == labels[keep]).float().mean())
    return out


def train_flops_per_sample(obj: Objective, images: torch.Tensor, device: torch.device) -> float:
    """Forward + backward FLOPs per training sample, counted by torch on a batch of 8."""
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.arange(8)
    with FlopCounterMode(display=False) as counter:
        obj.loss(normalize(images[idx].to(device)), idx).backward()
    obj.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 8


def samples_to_reach(samples: Sequence[float], acc: Sequence[float], target: float) -> float | None:
    """Samples at which a curve first reaches ``target``, interpolated linearly in log(samples)."""
    for i, a in enumerate(acc):
        if a >= target:
            if i == 0:
                return float(samples[0])
            f = (target - acc[i - 1]) / max(a - acc[i - 1], 1e-12)
            return float(np.exp(np.log(samples[i - 1]) + f * (np.log(samples[i]) - np.log(samples[i - 1]))))
    return None


def efficiency(samples: Sequence[float], better: Sequence[float], worse: Sequence[float]) -> dict[str, Any]:
    """How many times fewer samples ``better`` needs to reach ``worse``'s final accuracy (< 1 when it
    ends below it: then the inverse ratio for ``worse`` reaching ``better``'s final accuracy).
    ``lower_bound``: the target was already met at the first evaluation, so the true ratio is larger."""
    if better[-1] >= worse[-1]:
        s = samples_to_reach(samples, better, worse[-1])
        return {"ratio": samples[-1] / s, "lower_bound": s == samples[0]}
    s = samples_to_reach(samples, worse, better[-1])
    return {"ratio": s / samples[-1], "lower_bound": False}


def _run_one(cfg: ExperimentConfig, kind: str, seed: int, train: SplitData, test: SplitData,
             tasks: dict[str, dict[str, Any]], vocab: Vocab, wait: bool = True) -> dict[str, Any] | None:
    """The run's record, trained here unless cached; None when ``wait`` is False and another
    process is training it now."""
    scale = cfg.scale
    cache = cfg.scale_dir / "objectives" / f"{kind}-s{seed}.json"
    key = {"model": scale.objectives_model, "steps": scale.objectives_steps, "batch": scale.batch_size,
           "evals": scale.objectives_evals, "eval_images": len(test.rows), "lr": scale.lr,
           "crop_scale": list(scale.crop_scale), "precision": cfg.precision(str(resolve_device(cfg.device)))}
    with locked(cache.with_suffix(".lock"), wait=wait) as held:
        if not held:
            return None
        if cache.is_file() and read_json(cache).get("key") == key:
            return read_json(cache)
        out = _train_one(cfg, kind, seed, train, test, tasks, vocab)
        write_json(cache, {"key": key, **out})
    return read_json(cache)


def _inputs(cfg: ExperimentConfig) -> tuple[SplitData, SplitData, dict[str, dict[str, Any]], Vocab]:
    world = ensure_world(cfg)
    train = load_split(world, "train")
    test = load_split(world, "test", limit=cfg.scale.objectives_eval_images)
    tasks = {n: t for n, t in load_task_specs(world).items() if n in CLASS_TASKS}
    return train, test, tasks, Vocab.from_texts(train.captions)


def _all_runs(cfg: ExperimentConfig, *inputs: Any, wait: bool) -> dict[tuple[str, int], dict[str, Any] | None]:
    """Every (objective, seed) run: first those no other process is training (a parallel stream
    that has finished its own findings shares the work, ``help_train``), then, with ``wait``, the rest."""
    units = [(k, s) for k in KINDS for s in cfg.seeds]
    got = {u: _run_one(cfg, *u, *inputs, wait=False) for u in units}
    if wait:
        got.update({u: _run_one(cfg, *u, *inputs) for u in units if got[u] is None})
    return got


def help_train(cfg: ExperimentConfig) -> None:
    """Train the runs this finding needs that no other process has taken, and return: work for a
    parallel stream whose own findings are done (``experiments.run_all``)."""
    _all_runs(cfg, *_inputs(cfg), wait=False)


def _train_one(cfg: ExperimentConfig, kind: str, seed: int, train: SplitData, test: SplitData,
               tasks: dict[str, dict[str, Any]], vocab: Vocab) -> dict[str, Any]:
    scale = cfg.scale
    device = resolve_device(cfg.device)
    seed_everything(seed)
    obj = build_objective(kind, model_config(scale.objectives_model), train.captions, vocab)  # type: ignore[arg-type]
    obj.model.to(device)
    flops = train_flops_per_sample(obj, train.images, device)
    curve: list[dict[str, Any]] = []

    def on_eval(step: int) -> None:
        accs = zero_shot(obj, test, tasks, device)
        curve.append({"step": step, "samples": step * scale.batch_size, "acc": accs,
                      "mean": float(np.mean(list(accs.values())))})

    loop = LoopConfig.from_scale(cfg, scale.objectives_steps, seed, str(device))
    stats = fit(obj.model, obj.loss, train.images, loop, on_eval, log_spaced_steps(scale.objectives_steps,
                scale.objectives_evals), cfg.progress, desc=f"{kind} seed {seed}")
    params = sum(p.numel() for p in obj.model.parameters())
    return {"kind": kind, "seed": seed, "curve": curve, "train": stats, "params": params,
            "train_flops_per_sample": flops}


def run(cfg: ExperimentConfig) -> dict[str, Any]:
    t0 = time.time()
    scale = cfg.scale
    train, test, tasks, vocab = _inputs(cfg)
    got = _all_runs(cfg, train, test, tasks, vocab, wait=True)
    runs = {k: [got[(k, s)] for s in cfg.seeds] for k in KINDS}

    samples = [p["samples"] for p in runs["contrastive"][0]["curve"]]
    curves = {}
    for k, rs in runs.items():
        points = [mean_std([r["curve"][i]["mean"] for r in rs]) for i in range(len(samples))]
        curves[k] = {"samples": samples, "mean": [m for m, _ in points], "std": [s for _, s in points]}
    final = {k: {t: mean_std([r["curve"][-1]["acc"][t] for r in rs]) for t in tasks} for k, rs in runs.items()}
    ratios = {"bow_vs_caption": [], "contrastive_vs_bow": [], "contrastive_vs_caption": []}
    for i in range(len(cfg.seeds)):
        acc = {k: [p["mean"] for p in runs[k][i]["curve"]] for k in KINDS}
        ratios["bow_vs_caption"].append(efficiency(samples, acc["bow"], acc["caption"]))
        ratios["contrastive_vs_bow"].append(efficiency(samples, acc["contrastive"], acc["bow"]))
        ratios["contrastive_vs_caption"].append(efficiency(samples, acc["contrastive"], acc["caption"]))
    chance = float(np.mean([1 / len(t["classes"]) for t in tasks.values()]))
    summary = {
        "final_mean_acc": {k: mean_std([r["curve"][-1]["mean"] for r in rs]) for k, rs in runs.items()},
        "final_acc_per_task": final,
        "efficiency": {name: {"per_seed": [round(v["ratio"], 3) for v in vals],
                              "median": float(np.median([v["ratio"] for v in vals])),
                              "any_lower_bound": any(v["lower_bound"] for v in vals)}
                       for name, vals in ratios.items()},
        "chance_mean_acc": chance,
        "s_per_step": {k: mean_std([r["train"]["s_per_step"] for r in rs])[0] for k, rs in runs.items()},
        "train_gflops_per_sample": {k: rs[0]["train_flops_per_sample"] / 1e9 for k, rs in runs.items()},
        "params_m": {k: rs[0]["params"] / 1e6 for k, rs in runs.items()},
        "vocab_size": len(vocab),
    }
    # The contrastive model is the one every ratio is measured against: its tasks must be learnt.
    check = learnt_check({t: [r["curve"][-1]["acc"][t] for r in runs["contrastive"]] for t in tasks},
                         chance_levels(tasks), scale.learnt_margin, "contrastive objective, final, one template, test")
    verdict = gate(verdict_rule(summary), check)
    print_table(f"Finding 1: zero-shot accuracy (mean of {len(tasks)} tasks, %) vs samples seen, "
                f"{len(cfg.seeds)} seeds",
                ["samples", *KINDS], [[s, *(f"{100 * curves[k]['mean'][i]:.1f}±{100 * curves[k]['std'][i]:.1f}"
                                          for k in KINDS)] for i, s in enumerate(samples)])
    print_table("efficiency ratios (x fewer samples to reach the other's final accuracy; paper: 3x and 4x)",
                ["comparison", "median", "per seed"],
                [[n, v["median"], v["per_seed"]] for n, v in summary["efficiency"].items()])
    _plot(curves, final, tasks, cfg)
    rec = record(cfg, NAME, CLAIM, {"runs": runs, "curves": curves}, summary, verdict, time.time() - t0)
    write_json(cfg.out / f"{NAME}.json", rec)
    return rec


def verdict_rule(summary: dict[str, Any]) -> dict[str, Any]:
    eff = summary["efficiency"]
    bow_ok = all(r > 1 for r in eff["bow_vs_caption"]["per_seed"])
    con_ok = all(r > 1 for r in eff["contrastive_vs_bow"]["per_seed"])
    verdict = "reproduced" if bow_ok and con_ok else "partly" if bow_ok or con_ok else "not reproduced"
    return {"verdict": verdict, "criterion": "ordering: bag-of-words more sample-efficient than caption prediction "
            "and contrastive more than bag-of-words, in every seed (efficiency ratio > 1); the sizes of the ratios "
            "are compared with the paper's 3x and 4x in the text",
            "bow_more_efficient_than_caption": bow_ok, "contrastive_more_efficient_than_bow": con_ok}


def _plot(curves: dict[str, dict[str, list[float]]], final: dict[str, dict[str, tuple[float, float]]],
          tasks: dict[str, dict[str, Any]], cfg: ExperimentConfig) -> None:
    chance = float(np.mean([1 / len(t["classes"]) for t in tasks.values()]))
    fig, axes = figure(10, 3.8, ncols=2)
    ax = axes[0][0]
    for kind, colour in zip(KINDS, ("tab:blue", "tab:orange", "tab:green")):
        c = curves[kind]
        m, s = np.array(c["mean"]) * 100, np.array(c["std"]) * 100
        ax.plot(c["samples"], m, marker="o", color=colour, label=LABELS[kind])
        ax.fill_between(c["samples"], m - s, m + s, color=colour, alpha=0.2)
    ax.axhline(100 * chance, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    samples = curves[KINDS[0]]["samples"]
    ax.set_xticks(samples, [f"{s / 1000:.1f}k" for s in samples])
    ax.minorticks_off()
    ax.set_xlabel("images processed (samples seen)")
    ax.set_ylabel("zero-shot accuracy (%, mean of tasks)")
    ax.set_title(f"Objectives on one image tower ({cfg.scale.objectives_model}), {len(cfg.seeds)} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0][1]  # where the accuracy comes from: final accuracy per task
    names = list(tasks)
    x = np.arange(len(names))
    for i, (kind, colour) in enumerate(zip(KINDS, ("tab:blue", "tab:orange", "tab:green"))):
        vals = [final[kind][t] for t in names]
        ax.bar(x + (i - 1) * 0.27, [100 * m for m, _ in vals], 0.27, yerr=[100 * s for _, s in vals], capsize=2,
               color=colour, label=LABELS[kind])
    ax.scatter(x, [100 / len(tasks[t]["classes"]) for t in names], marker="_", s=300, color="black", zorder=3,
               label="chance")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("zero-shot accuracy at the end (%)")
    ax.set_title("Final accuracy per task", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, cfg.out / f"{NAME}.png")

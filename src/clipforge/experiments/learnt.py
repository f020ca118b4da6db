"""Whether the models a finding measures learnt its tasks, and the verdict that follows.

A finding compares models on tasks; a task the models never learnt (accuracy at chance) carries
no signal, and an average over it measures an untrained model. So every finding names the
accuracies its tasks are learnt by (per task, per seed), and ``learnt_check`` tests each against
chance + the scale's margin. ``gate`` keeps the finding's own verdict when every task is learnt
in every seed, and otherwise replaces it by "not learnt": no conclusion is drawn.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

NOT_LEARNT = "not learnt"


def chance_levels(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Chance accuracy of each task: one over its number of classes."""
    return {name: 1.0 / len(task["classes"]) for name, task in tasks.items()}


def learnt_check(acc: Mapping[str, Sequence[float | None]], chance: Mapping[str, float], margin: float,
                 what: str) -> dict[str, Any]:
    """``acc[task][seed]`` against ``chance[task] + margin``. ``what`` names the accuracy checked
    (e.g. "zero-shot CLIP, template ensemble, test"). A missing accuracy (None) counts as not learnt."""
    above: dict[str, list[float | None]] = {}
    failing: list[str] = []
    for task, per_seed in acc.items():
        above[task] = [None if a is None else round(float(a) - chance[task], 4) for a in per_seed]
        failing += [f"{task} (seed {i})" for i, d in enumerate(above[task]) if d is None or d < margin]
    return {"what": what, "margin": margin, "chance": {t: round(chance[t], 4) for t in acc},
            "above_chance": above, "all_learnt": not failing, "not_learnt": failing}


def merge_checks(*checks: dict[str, Any]) -> dict[str, Any]:
    """One check over several models (e.g. CLIP and the supervised baseline): learnt when all are."""
    return {"checks": list(checks), "all_learnt": all(c["all_learnt"] for c in checks),
            "not_learnt": [f"{c['what']}: {t}" for c in checks for t in c["not_learnt"]]}


def gate(verdict: dict[str, Any], check: dict[str, Any]) -> dict[str, Any]:
    """The finding's verdict when every task is learnt; else "not learnt", keeping what the
    verdict would have been (``verdict_if_learnt``) for the record, not for a conclusion."""
    margin = check.get("margin", check.get("checks", [{}])[0].get("margin"))
    rule = (f"; first, every task averaged over must be learnt: accuracy >= chance + {100 * margin:.0f} points in "
            f"every seed, else the verdict is '{NOT_LEARNT}'")
    out = {**verdict, "criterion": verdict["criterion"] + rule, "learnt": check}
    if not check["all_learnt"]:
        out["verdict_if_learnt"] = verdict["verdict"]
        out["verdict"] = NOT_LEARNT
    return out

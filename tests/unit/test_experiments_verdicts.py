"""Verdict rules of the paper experiments on constructed numbers, the learnt-above-chance gate,
and the label-set probe's effect on constructed embeddings: the parts that decide a verdict,
checked where the right answer is known."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipforge.experiments import f2_prompts, f5_robustness, f7_labelset
from clipforge.experiments.learnt import NOT_LEARNT, chance_levels, gate, learnt_check, merge_checks

TASKS = {"colour": {"classes": list("abcdefghij")}, "count": {"classes": ["one", "two", "three"]}}


def test_a_task_at_chance_in_one_seed_replaces_the_verdict():
    chance = chance_levels(TASKS)
    assert chance == {"colour": 0.1, "count": 1 / 3}
    learnt = learnt_check({"colour": [0.9, 0.95], "count": [0.6, 0.5]}, chance, 0.10, "zero-shot")
    assert learnt["all_learnt"] and learnt["not_learnt"] == []
    assert learnt["above_chance"]["colour"] == [0.8, 0.85]
    kept = gate({"verdict": "reproduced", "criterion": "x > 0"}, learnt)
    assert kept["verdict"] == "reproduced" and "verdict_if_learnt" not in kept and "chance + 10" in kept["criterion"]
    # count at 0.40 in seed 1 is above chance (0.333) but by less than the margin: not learnt
    unlearnt = learnt_check({"colour": [0.9, 0.95], "count": [0.6, 0.40]}, chance, 0.10, "zero-shot")
    assert not unlearnt["all_learnt"] and unlearnt["not_learnt"] == ["count (seed 1)"]
    gated = gate({"verdict": "reproduced", "criterion": "x > 0"}, unlearnt)
    assert gated["verdict"] == NOT_LEARNT and gated["verdict_if_learnt"] == "reproduced"
    missing = learnt_check({"colour": [0.9, None]}, chance, 0.10, "zero-shot")
    assert missing["not_learnt"] == ["colour (seed 1)"]
    both = merge_checks(learnt, unlearnt)
    assert not both["all_learnt"] and both["not_learnt"] == ["zero-shot: count (seed 1)"]


def _prompt_summary(template: list[float], ensemble: list[float]) -> dict:
    return {"deltas_per_seed": {"template_minus_plain": template, "ensemble_minus_plain": ensemble},
            "deltas": {"template_minus_plain": (sum(template) / len(template), 0.0),
                       "ensemble_minus_plain": (sum(ensemble) / len(ensemble), 0.0)}}


def test_prompt_verdict_needs_every_seed():
    assert f2_prompts.verdict_rule(_prompt_summary([0.01, 0.02, 0.01], [0.03, 0.04, 0.05]))["verdict"] == "reproduced"
    assert f2_prompts.verdict_rule(_prompt_summary([0.01, -0.02, 0.01], [0.03, 0.04, 0.05]))["verdict"] == "partly"
    assert f2_prompts.verdict_rule(_prompt_summary([-0.01, 0.0, 0.01], [0.03, -0.04, 0.05]))["verdict"] == \
        "not reproduced"


def test_robustness_verdict_counts_the_cue_criterion():
    summary = {"zero_shot_er_per_seed": [0.05, 0.02, 0.03],
               "probe_minus_zero_shot": {"reference": [0.1, 0.1, 0.1], "effective_robustness": [-0.02, -0.01, -0.03]},
               "cue_drop_supervised_minus_zero_shot": [0.2, 0.1, 0.15]}
    v = f5_robustness.verdict_rule(summary)
    assert v["verdict"] == "reproduced" and v["supervised_loses_more_on_cue_task"]
    summary["cue_drop_supervised_minus_zero_shot"] = [0.2, -0.1, 0.15]
    assert f5_robustness.verdict_rule(summary)["verdict"] == "partly"
    summary["zero_shot_er_per_seed"] = [-0.01, 0.02, 0.03]
    summary["probe_minus_zero_shot"]["reference"] = [-0.1, 0.1, 0.1]
    assert f5_robustness.verdict_rule(summary)["verdict"] == "not reproduced"


def _constructed(colour_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three shapes on orthogonal axes 0-2, shape 2 drawn close to shape 0's axis too; one colour
    on axis 3, matched by every image with ``colour_weight``."""
    shapes = torch.eye(6)[:, :3]  # [E, S]
    proper = torch.eye(6)[:, 3:4]  # [E, 1]
    img = torch.zeros(6, 6)
    shape_of = torch.tensor([0, 0, 1, 1, 2, 2])
    for i, s in enumerate(shape_of.tolist()):
        img[i, s] = 1.0
        img[i, 3] = colour_weight
    img[4:, 0] = 0.8  # the group "2" resembles shape 0 more than the colour category (unless outweighed)
    return F.normalize(img, dim=-1), proper, shapes, shape_of


def test_label_set_probe_group_error_drops_when_its_category_is_added():
    errs = f7_labelset.label_set_errors(*_constructed(colour_weight=0.5))
    # without its own category, group 2 is filed under shape 0 (wrong); with it, under itself
    assert errs["without"][2] == 1.0 and errs["with"][2] == 0.0
    # groups 0 and 1 fall back on their colour (the proper category): no misfiling either way
    assert errs["without"][:2] == [0.0, 0.0] and errs["with"] == [0.0, 0.0, 0.0]
    summary = {"drop_per_seed": [sum(errs["without"]) / 3 - sum(errs["with"]) / 3],
               "control_drop_per_seed": [0.0]}
    assert f7_labelset.verdict_rule(summary)["verdict"] == "reproduced"
    # a proper category that outweighs every shape leaves nothing to misfile: no effect
    flat = f7_labelset.label_set_errors(*_constructed(colour_weight=3.0))
    assert flat["without"] == flat["with"] == [0.0, 0.0, 0.0]
    assert f7_labelset.verdict_rule({"drop_per_seed": [0.0], "control_drop_per_seed": [0.0]})["verdict"] == \
        "not reproduced"

"""AdamW parameter groups (what gets weight decay) and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

import clipforge
from clipforge.train.config import OptimConfig, ScheduleConfig
from clipforge.train.freeze import lock_tower
from clipforge.train.optim import LrSchedule, build_optimizer, decays, lr_factor


@pytest.fixture(scope="module")
def model():
    return clipforge.create_model("nano", seed=0)


def test_no_decay_on_gains_biases_embeddings_and_scale(model):
    groups = {name: decays(name, p) for name, p in model.named_parameters()}
    for name in ("logit_scale", "visual.class_embedding", "visual.positional_embedding",
                 "text.token_embedding.weight", "text.positional_embedding",
                 "visual.ln_pre.weight", "visual.ln_pre.bias", "text.transformer.resblocks.0.attn.in_proj_bias",
                 "text.transformer.resblocks.0.mlp.c_fc.bias"):
        assert groups[name] is False, name
    for name in ("visual.conv1.weight", "visual.proj", "text.text_projection",
                 "visual.transformer.resblocks.0.attn.in_proj_weight",
                 "text.transformer.resblocks.1.mlp.c_proj.weight", "visual.transformer.resblocks.1.attn.out_proj.weight"):
        assert groups[name] is True, name


def test_optimizer_covers_each_trainable_parameter_once(model):
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert opt.defaults["fused"] is True  # all parameters on one CPU: the fused kernel


def test_locked_parameters_are_left_out():
    m = clipforge.create_model("nano", seed=0)
    lock_tower(m, "image", unlocked_layers=1)
    opt = build_optimizer(m, OptimConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m.visual.conv1.weight) not in ids and id(m.visual.transformer.resblocks[0].mlp.c_fc.weight) not in ids
    assert id(m.visual.transformer.resblocks[-1].mlp.c_fc.weight) in ids and id(m.visual.proj) in ids
    assert id(m.text.token_embedding.weight) in ids


def test_decay_shrinks_only_the_decayed_group():
    """With zero gradients AdamW's only change is decoupled decay: p *= 1 - lr * wd."""
    m = clipforge.create_model("nano", seed=0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = build_optimizer(m, OptimConfig(lr=0.1, weight_decay=0.5))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        if decays(n, p):
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_warmup_then_cosine():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.0, abs=1e-12)
    floor = ScheduleConfig(kind="cosine", min_lr_ratio=0.1)
    assert lr_factor(100, floor, 100) == pytest.approx(0.1)
    values = [lr_factor(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up


def test_constant_and_constant_cooldown():
    assert [lr_factor(s, ScheduleConfig(kind="constant", warmup_steps=2), None) for s in (0, 1, 50)] == [0.5, 1.0, 1.0]
    cfg = ScheduleConfig(kind="constant-cooldown", cooldown_steps=4)
    got = [lr_factor(s, cfg, 10) for s in range(10)]
    assert got[:6] == [1.0] * 6
    assert got[6:] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    default = ScheduleConfig(kind="constant-cooldown")  # last 20% of the run
    assert lr_factor(79, default, 100) == 1.0 and lr_factor(80, default, 100) < 1.0


def test_cosine_needs_a_run_length():
    with pytest.raises(ValueError, match="run length"):
        lr_factor(5, ScheduleConfig(kind="cosine"), None)


def test_schedule_sets_lr_and_round_trips():
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1.0)
    sched = LrSchedule(opt, ScheduleConfig(kind="cosine", warmup_steps=4), total_steps=20)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    sched.set_step(12)
    state = sched.state_dict()
    other = LrSchedule(torch.optim.AdamW(m.parameters(), lr=1.0), ScheduleConfig(kind="cosine", warmup_steps=4), 20)
    other.load_state_dict(state)
    assert other.get_last_lr() == sched.get_last_lr() == [pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))]

"""TrainConfig.time_budget_s: the run ends when its seconds are spent, with the schedule
annealed to that end, whatever the pace of the host."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import clipforge
from clipforge.train import trainer as trainer_mod
from clipforge.train.config import ConfigError, TrainConfig
from clipforge.train.logging import read_metrics
from support.datasets import write_csv
from support.models import nano_config

pytestmark = pytest.mark.usefixtures("one_omp_thread")


@pytest.mark.slow
def test_run_stops_at_the_budget_with_the_schedule_annealed(tmp_path):
    data = write_csv(tmp_path / "data")
    budget = 4.0
    cfg = nano_config(str(data), tmp_path / "run", steps=100_000, time_budget_s=budget, schedule="cosine", warmup=2)
    t = time.time()
    summary = trainer_mod.train(cfg, progress=False)
    took = time.time() - t
    assert 2 < summary["steps"] < 100_000  # ended by the clock, not by the step bound
    assert took < budget + 10  # the loop's budget, plus start-up and the final save
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert len(lrs) == summary["steps"]
    assert max(lrs) == pytest.approx(2e-3, rel=0.05)  # warm-up reached the base rate
    assert lrs[-1] < 0.1 * max(lrs)  # and the cosine came down to (near) its floor by the last step
    model, _ = clipforge.load(tmp_path / "run" / "final")
    assert model.config.name == "nano"


@pytest.mark.slow
def test_a_slower_pace_gives_fewer_steps_in_the_same_budget(tmp_path, monkeypatch):
    data = write_csv(tmp_path / "data")
    fast = trainer_mod.train(nano_config(str(data), tmp_path / "fast", steps=100_000, time_budget_s=3.0),
                             progress=False)
    step = trainer_mod.Trainer._step

    def slow_step(self, micro):  # the host slowing down: every step takes 50 ms longer
        time.sleep(0.05)
        return step(self, micro)

    monkeypatch.setattr(trainer_mod.Trainer, "_step", slow_step)
    slow = trainer_mod.train(nano_config(str(data), tmp_path / "slow", steps=100_000, time_budget_s=3.0),
                             progress=False)
    assert slow["steps"] < fast["steps"]
    assert slow["steps"] <= 3.0 / 0.05 + 1


@pytest.mark.slow
def test_the_step_bound_still_holds(tmp_path):
    data = write_csv(tmp_path / "data")
    summary = trainer_mod.train(nano_config(str(data), tmp_path / "run", steps=5, time_budget_s=600.0), progress=False)
    assert summary["steps"] == 5


@pytest.mark.parametrize("over,match", [
    ({"time_budget_s": 0.0}, "> 0"),
    ({"time_budget_s": 5.0, "steps": None, "epochs": 1}, "upper bound"),
    ({"time_budget_s": 5.0, "resume": "auto"}, "cannot resume"),
])
def test_bad_budgets_are_clear_errors(tmp_path: Path, over, match):
    with pytest.raises(ConfigError, match=match):
        nano_config("data.csv", tmp_path / "run", **over)


def test_config_round_trip_keeps_the_budget(tmp_path):
    cfg = nano_config("data.csv", tmp_path / "run", time_budget_s=12.5)
    assert TrainConfig.from_dict(cfg.to_dict()).time_budget_s == 12.5


@pytest.mark.slow
def test_cli_time_budget_flag(tmp_path, capsys):
    from clipforge.cli import main

    data = write_csv(tmp_path / "data")
    args = ["train", "--data", str(data), "--model", "nano", "--out", str(tmp_path / "run"), "--batch-size", "8",
            "--workers", "0", "--no-tensorboard", "--no-progress"]
    assert main(args + ["--steps", "100000", "--time-budget", "2"]) == 0
    assert TrainConfig.load(tmp_path / "run" / "config.yaml").time_budget_s == 2.0
    assert main(args + ["--time-budget", "2"]) == 2  # no --steps bound: a usage error
    assert "upper bound" in capsys.readouterr().err

"""A shortened demo runs end to end and produces the report files."""

from __future__ import annotations

import json

import pytest

from clipforge.cli import main


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--steps", "4", "--model", "nano", "--train-samples", "96",
                 "--test-samples", "40", "--shifted-samples", "16", "--batch-size", "16", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["steps"] == 4
    assert summary["train"]["precision"] in ("fp32", "bf16")
    zs = summary["results"]["zeroshot"]
    assert {"colour", "shape", "size", "position", "count"} <= set(zs)
    for task in ("colour", "shape", "count"):
        test = zs[task]["test"]
        assert 0.0 <= test["ensemble"] <= 1.0 and test["num_samples"] > 0
        assert set(test) >= {"plain", "template", "ensemble", "confusion_matrix"}
    assert summary["results"]["retrieval"]["num_texts"] == 40
    report = out / "report"
    page = (report / "index.html").read_text()
    for name in ("training.png", "zeroshot_prompts.png", "zeroshot_shift.png", "confusion_shape.png"):
        assert (report / name).stat().st_size > 1000
        assert name in page
    assert page.count("<img class=\"thumb\"") == 5 * 8  # five example queries, top 8 each
    printed = capsys.readouterr().out
    assert "text->image retrieval on 40 test captions" in printed
    # The held-out pairs: shape against the test split, the gap target, and each pair.
    held = zs["shape"]["test_heldout"]
    assert sum(g["num_samples"] for g in held["by_group"].values()) == held["num_samples"]
    assert "held-out colour-shape pairs: shape" in printed and "(target: within 10)" in printed
    assert "per pair: " in printed and "held-out colour-shape pairs" in page
    # The account of the run: its steps, and why a target was missed.
    assert summary["verdict"][0].startswith("trained 4 steps of 16")
    assert "fewer than the ~1,800 the targets take" in summary["verdict"][1] and summary["verdict"][1] in printed
    # A second run reuses the generated world rather than rendering it again.
    world_json = (out / "world" / "world.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--steps", "1", "--model", "nano", "--train-samples", "96",
                 "--test-samples", "40", "--shifted-samples", "16", "--batch-size", "16", "--no-progress"]) == 0
    assert (out / "world" / "world.json").stat().st_mtime_ns == world_json


def test_demo_rejects_bad_arguments(capsys):
    assert main(["demo", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert main(["demo", "--cache-mb", "-1"]) == 2
    assert "--cache-mb must be >= 0" in capsys.readouterr().err


def test_auto_precision_follows_the_cpu(monkeypatch):
    import clipforge.utils
    from clipforge.demo.pipeline import DemoConfig
    from clipforge.errors import ClipforgeError

    assert isinstance(clipforge.utils.cpu_has_native_bf16(), bool)
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(clipforge.utils, "cpu_has_native_bf16", lambda native=native: native)
        assert DemoConfig().resolved_precision() == want
        assert DemoConfig(precision="fp32").resolved_precision() == "fp32"
    with pytest.raises(ClipforgeError, match="precision must be auto, fp32 or bf16"):
        DemoConfig(precision="fp16")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_calibration_times_real_training_steps(tmp_path):
    from clipforge.data.config import DataConfig
    from clipforge.data.synth import SynthConfig, generate_world
    from clipforge.demo.pipeline import calibrate_steps
    from clipforge.train.config import OptimConfig

    generate_world(SynthConfig(seed=0, train=64, val=8, test=8, shifted=8), tmp_path / "w", workers=1, progress=False)
    data = DataConfig(str(tmp_path / "w" / "train.csv"), cache_mb=64)
    for precision in ("fp32", "bf16"):
        steps, per_step = calibrate_steps("nano", 8, 60.0, 0, data, OptimConfig(), precision, timed=3)
        assert per_step > 0
        assert steps == max(10, int(60.0 / (per_step * 1.10)))


def _summary(steps: int, per_step: float | None, shape: float, held: float) -> dict:
    zs = {"shape": {"test": {"ensemble": shape}, "test_heldout": {"ensemble": held}},
          "colour": {"test": {"ensemble": 0.99}}}
    return {"results": {"zeroshot": zs}, "targets": {"shape": 0.95, "colour": 0.98}, "heldout_gap_target": 0.10,
            "steps_for_targets": 2000, "reference_step_s": 0.095, "seconds_per_step_calibrated": per_step,
            "train": {"steps": steps, "wall_time_s": 250.0},
            "config": {"batch_size": 128, "train_samples": 20000, "minutes": 5.0}}


def test_verdict_says_what_was_missed_and_why():
    from clipforge.demo.report import verdict_lines

    ok = verdict_lines(_summary(2400, 0.1, 0.97, 0.90))
    assert ok == ["trained 2,400 steps of 128 (15.4 epochs) in 250 s, 100 ms a step: every target met"]
    busy = verdict_lines(_summary(1216, 0.2, 0.912, 0.771))
    assert busy[1].startswith("missed: shape 91.2% (target 95%); held-out gap 14.1 points (target 10).")
    assert "1,216 steps is fewer than the ~2,000" in busy[1] and "200 ms against ~95 ms" in busy[1]
    assert "--minutes 10" in busy[1]
    unlucky = verdict_lines(_summary(2600, 0.09, 0.94, 0.90))
    assert "had the steps the targets usually take" in unlucky[1] and "busy" not in unlucky[1]

"""The GPU check script (``benchmarks/gpu/run.sh``) in its CPU mode: every stage runs with tiny
sizes and the record has the structure the GPU run fills (stages with their status and figures,
every target judged, a profile where one is missed). Also: without open_clip, the OpenCLIP side
is recorded as skipped with the reason, not a crash."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "benchmarks" / "gpu"
STAGES = {"tests", "train", "largest_batch", "embed"}
TARGETS = {"vit_b32_speedup", "vit_b16_mfu", "vit_b16_largest_batch", "embed_speedup"}
COUNTS = {"passed", "failed", "error", "skipped"}  # the tests stage's counts may be 0

pytestmark = pytest.mark.slow


def positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(GPU / "run.sh"), "--device", "cpu", "--quick", str(out)],
                       check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not list(out.glob("*-partial.json"))  # replaced by the final record
    rec = json.loads((out / "gpu_check-cpu-latest.json").read_text())
    rec["_stdout"] = p.stdout
    return rec


def test_record_names_the_run_and_its_machine(record):
    assert record["benchmark"] == "gpu_check" and record["mode"] == "quick" and record["requested_device"] == "cpu"
    assert record["file"].startswith("gpu_check-cpu-") and record["file"].endswith(".json")
    assert record["device"].startswith("cpu (") and record["torch"] == torch.__version__
    assert record["gpu"] is None and positive_number(record["seconds_total"])
    assert "target" in record["_stdout"] and "stage" in record["_stdout"]  # the tables printed last


def test_every_stage_ran_and_reports_real_figures(record):
    stages = record["stages"]
    assert set(stages) == STAGES
    for name, s in stages.items():
        assert s["status"] == "ok", (name, s.get("error"), s.get("traceback"))
        assert s["exit_code"] == 0 and positive_number(s["seconds"]) and s["figures"], name
        assert s["device_info"]["type"] == "cpu"
        for key, v in s["figures"].items():
            assert positive_number(v) or (name == "tests" and key in COUNTS and v == 0), (name, key, v)


def test_the_cuda_tests_are_collected_and_skipped_without_a_gpu(record):
    fig = record["stages"]["tests"]["figures"]
    assert fig["collected"] >= 10 and fig["failed"] == fig["error"] == 0
    assert fig["skipped"] == fig["collected"]  # this machine has no CUDA
    assert all(t["outcome"] == "skipped" for t in record["stages"]["tests"]["tests"])


def test_training_figures_cover_both_models_and_both_libraries(record):
    fig = record["stages"]["train"]["figures"]
    for model in ("vit_b32", "vit_b16"):
        for side in ("clipforge", "open_clip"):
            for what in ("samples_per_s", "mfu", "peak_mib"):
                assert positive_number(fig[f"{model}_{side}_{what}"]), (model, side, what)
        assert positive_number(fig[f"{model}_speedup_vs_open_clip"])
    batch = record["stages"]["largest_batch"]["figures"]
    assert batch["clipforge_largest_batch"] % 8 == 0 and batch["open_clip_largest_batch"] % 8 == 0
    embed = record["stages"]["embed"]
    assert embed["images"] > 0 and embed["figures"]["cosine_min_vs_open_clip"] > 0.99  # same weights, same files


def test_every_target_is_judged_and_a_missed_one_carries_a_profile(record):
    targets = {t["name"]: t for t in record["targets"]}
    assert set(targets) == TARGETS
    for t in targets.values():
        assert isinstance(t["met"], bool) and positive_number(t["value"]) and positive_number(t["threshold"]), t
        if not t["met"]:
            assert t["profile"] and all("Name" in table and "%" in table for table in t["profile"].values()), t
    # a CPU cannot reach 40 % of an H100's bf16 peak: this one is always missed, so a profile is always taken
    assert targets["vit_b16_mfu"]["met"] is False and set(targets["vit_b16_mfu"]["profile"]) == {"clipforge",
                                                                                                  "open_clip"}


def test_without_open_clip_the_reference_side_is_skipped_with_the_reason(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["open_clip"] = None  # import fails\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), str(ROOT / "src")]))
    out = tmp_path / "train.json"
    p = subprocess.run([sys.executable, str(GPU / "stage_train.py"), "--device", "cpu", "--quick", "--budget-s", "60",
                        "--out", str(out)], check=False, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    res = json.loads(out.read_text())
    assert p.returncode == 0 and res["status"] == "ok", p.stderr[-3000:]
    for model in res["models"].values():
        assert model["open_clip"]["status"] == "skipped" and "open_clip" in model["open_clip"]["reason"]
        assert set(model["rate_per_s"]) == {"clipforge"}
    targets = {t["name"]: t for t in res["targets"]}
    assert targets["vit_b32_speedup"]["met"] is None and "open_clip" in targets["vit_b32_speedup"]["reason"]
    assert isinstance(targets["vit_b16_mfu"]["met"], bool)

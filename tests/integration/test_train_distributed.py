"""``torchrun --nproc_per_node=2 -m clipforge train`` on CPU (gloo): per-rank data shards,
features gathered across ranks, rank-0 checkpoints, skip counts summed over ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import clipforge
from support.datasets import write_csv


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_two_process_torchrun_run_finishes_and_writes_final(tmp_path):
    bad = {"not_an_image": 2, "missing_file": 2}  # 28 good + 4 bad: 16 rows per rank, 4 batches of 4
    data = write_csv(tmp_path / "data", n=28, bad=bad)
    out = tmp_path / "run"
    cmd = _torchrun() + [
        "--standalone", "--nproc_per_node=2", "-m", "clipforge", "train", "--data", str(data), "--model", "nano",
        "--out", str(out), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--lr", "1e-3",
        "--save-every", "2", "--log-every", "1", "--no-progress", "--no-tensorboard",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    assert summary["steps"] == 4 and summary["samples_seen"] == 32
    assert summary["skipped"] == bad  # counted on both ranks, summed on rank 0
    model, _ = clipforge.load(out / "final")
    assert model.config.name == "nano"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert done.stdout.count('"steps": 4') == 1  # only rank 0 reports

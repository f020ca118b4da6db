"""Exact resume: a run killed with SIGKILL at a random checkpoint and resumed with
``--resume auto`` ends with weights bitwise equal to an uninterrupted run (CPU).

The uninterrupted run reads its data in-process (workers 0); the killed and resumed runs use
two worker processes, so the test also covers worker-count independence of the data order.
The data holds unusable rows, whose skip counts must survive the kill as well.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clipforge.cli import main
from clipforge.train.logging import read_metrics
from support.datasets import write_csv

STEPS, SAVE_EVERY = 12, 2
BAD = {"not_an_image": 2, "missing_file": 1, "empty_file": 1}  # 44 good + 4 bad rows: 6 batches of 8


def _argv(data: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "nano", "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--workers", str(workers), "--seed", "7",
            "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--log-every", "1", "--no-tensorboard",
            "--no-progress", "--patch-dropout", "0.25", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_auto_is_bitwise_exact(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same thread count in every run (and no spin-waiting)
    data = write_csv(tmp_path / "data", n=44, bad=BAD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "clipforge"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + _argv(data, killed, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_at = random.choice(range(SAVE_EVERY, STEPS, SAVE_EVERY))
    marker = killed / "checkpoints" / f"step_{kill_at:08d}" / "COMPLETE"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, f"training ended before step {kill_at}: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    # the uninterrupted reference, in-process
    ref = tmp_path / "ref"
    assert main(_argv(data, ref, 0)) == 0

    # resumed in-process too (saves a second interpreter start-up; the data is still read by 2 workers)
    assert main(_argv(data, killed, 2, "--resume", "auto")) == 0

    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not (a[k] == b[k]).all()]
    assert not differ, f"killed after step {kill_at}: {len(differ)} tensors differ, e.g. {differ[:3]}"

    s_ref = json.loads((ref / "summary.json").read_text())
    s_res = json.loads((killed / "summary.json").read_text())
    assert "resuming from" in capsys.readouterr().err
    assert s_res["resumed_from_step"] >= kill_at and s_ref["resumed_from_step"] is None
    for key in ("steps", "samples_seen", "final_loss", "skipped"):
        assert s_res[key] == s_ref[key], key
    assert s_ref["skipped"] == {k: 2 * v for k, v in BAD.items()}  # two epochs, each bad row seen twice
    # the metrics file holds each step once, though the killed run may have logged past its checkpoint
    assert [r["step"] for r in read_metrics(killed)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in read_metrics(killed)] == [r["loss"] for r in read_metrics(ref)]


@pytest.mark.slow
def test_resume_with_another_batch_size_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = write_csv(tmp_path / "data", n=16)
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--model", "nano", "--out", str(out), "--workers", "0",
            "--no-progress", "--no-tensorboard"]
    assert main(base + ["--steps", "1", "--batch-size", "8"]) == 0
    assert main(base + ["--steps", "2", "--batch-size", "4", "--resume", "auto"]) == 2
    assert "batch_size 8 -> 4" in capsys.readouterr().err

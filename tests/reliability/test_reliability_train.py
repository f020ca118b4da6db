"""Training under faults: repeated SIGKILLs, a dying data worker, NaN/Inf, full disks, the bad-input zoo.

Adds to tests/integration/test_train_{e2e,resume}.py (one SIGKILL right after a checkpoint; a
NaN loss; ENOSPC on the second checkpoint; four kinds of bad rows) what they leave open:

- six SIGKILLs in one run, each at a scripted point (inside a step, half-way through the
  weights, the train state, before the rename, right after it, while pruning), resumed each
  time: only complete checkpoints are ever listed or resumed from, and the run ends bitwise
  equal to an uninterrupted one;
- a DataLoader worker killed mid-run: a one-line error naming the worker and the signal, the
  checkpoints intact, and ``--resume auto`` ends bitwise equal again;
- Inf features (skip policy: exactly that update is dropped), a NaN gradient behind a finite
  loss (stop policy: named with its step), weights that overflow (never checkpointed);
- a full disk (as each writer reports it: OSError, SafetensorError, torch's RuntimeError) while
  writing the weights, the train state, a metrics line or the final model: one line, the previous
  checkpoint intact, and resuming once there is space ends as the uninterrupted run;
- an output directory that cannot be created;
- a full training run over the bad-input zoo (a tenth broken, tables and shards): the run
  completes and ``summary.json`` holds the exact skip counts by kind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.errors import CheckpointError
from clipforge.train import checkpointing as ckpt
from clipforge.train import trainer as trainer_mod
from clipforge.train.config import TrainConfig
from clipforge.train.logging import read_metrics
from support.datasets import write_csv, write_zoo_csv, write_zoo_shards
from support.fault_driver import run_forked
from support.runs import checkpoint_health, children, differing_tensors

STEPS, SAVE_EVERY = 12, 2
BAD = {"not_an_image": 2, "missing_file": 1, "empty_file": 1}  # 44 good + 4 bad rows: 6 batches of 8


pytestmark = pytest.mark.usefixtures("one_omp_thread")  # same thread count in every run; no spin-waiting


def argv(data: Path, out: Path, workers: int = 0, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "nano", "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--workers", str(workers), "--seed", "7",
            "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--log-every", "1", "--no-tensorboard",
            "--no-progress", "--patch-dropout", "0.25", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data and an uninterrupted run over it (in-process, no data workers)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_csv(root / "data", n=44, bad=BAD)
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert main(argv(data, root / "ref")) == 0
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return data, root / "ref"


def assert_same_run(ref: Path, run: Path) -> None:
    differ = differing_tensors(ref / "final", run / "final")
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    for key in ("steps", "samples_seen", "final_loss", "skipped", "nan_skipped_steps"):
        assert a[key] == b[key], key
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))  # each step logged once
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in read_metrics(ref)]


# Six kills in one run; (phase, step): see support/fault_driver.py. After each, what must be on disk.
KILLS = [("state", 4), ("step", 5), ("weights", 6), ("marker", 6), ("prune", 8), ("rename", 10)]
NEWEST_AFTER = [2, 4, 4, 4, 8, 10]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked copies of the test process")
def test_six_sigkills_in_one_run_resume_from_complete_checkpoints_bitwise(reference, tmp_path):
    data, ref = reference
    run = tmp_path / "run"
    for (phase, step), newest in zip(KILLS, NEWEST_AFTER):
        args = argv(data, run) + (["--resume", "auto"] if run.exists() else [])
        assert run_forked(phase, step, args) == -signal.SIGKILL, f"{phase}@{step}: the run was not killed"
        health = checkpoint_health(run / "checkpoints")
        assert not health["broken"], f"after {phase}@{step} a checkpoint marked complete does not load: {health}"
        assert health["complete"][-1] == newest, (phase, step, health)
        assert ckpt.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / f"step_{newest:08d}"
        assert not (run / "final").exists()
    assert main(argv(data, run, 0, "--resume", "auto")) == 0
    assert_same_run(ref, run)
    assert checkpoint_health(run / "checkpoints") == {"complete": [10, 12], "broken": [], "partial": [],
                                                      "unmarked": []}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds worker processes through /proc")
def test_killed_data_worker_is_a_clear_error_and_resume_is_exact(reference, tmp_path, monkeypatch, capsys):
    data, ref = reference
    run = tmp_path / "run"
    real = trainer_mod.Trainer._clip_grads
    killed = []

    def kill_a_worker(self):
        if self.state.step + 1 == 5 and not killed:
            killed.append(children(forked=True)[0])  # the two DataLoader workers are this process's children
            os.kill(killed[0], signal.SIGKILL)
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "_clip_grads", kill_a_worker)
    assert main(argv(data, run, 2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(rf"a data loading process died: DataLoader worker \(pid(\(s\))? {killed[0]}\)", err), err
    assert "--resume auto" in err
    assert checkpoint_health(run / "checkpoints")["complete"] == [2, 4]
    monkeypatch.setattr(trainer_mod.Trainer, "_clip_grads", real)
    assert main(argv(data, run, 2, "--resume", "auto")) == 0
    assert_same_run(ref, run)


@pytest.mark.slow
def test_worker_death_surfacing_inside_a_checkpoint_write_is_still_named(small_data, tmp_path, monkeypatch, capsys):
    # PyTorch raises a dead worker's error from its SIGCHLD handler, wherever the main process is:
    # inside a checkpoint write it becomes that write's reason to fail.
    def dies(cfg, progress=True):
        raise CheckpointError(f"cannot write checkpoint {tmp_path}/step_00000004: DataLoader worker (pid 4242) is "
                              "killed by signal: Killed. ; the previous checkpoint step_00000002 is intact")

    monkeypatch.setattr(trainer_mod, "train", dies)
    assert main(_small_argv(small_data, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge train: error: a data loading process died: DataLoader worker (pid 4242)"), err
    assert len(err.splitlines()) == 1 and "--resume auto" in err


def test_fd_sharing_thread_of_a_dead_worker_prints_no_traceback(monkeypatch):
    # multiprocessing's resource sharer (how workers hand tensors over) meets the dead peer first
    import threading

    from clipforge.cli.train import _quiet_fd_sharing_thread

    shown = []
    monkeypatch.setattr(threading, "excepthook", lambda args: shown.append(args.exc_type))
    _quiet_fd_sharing_thread()
    _quiet_fd_sharing_thread()  # idempotent: one wrapper, however many runs
    for name, exc in [("_serve", ConnectionResetError), ("_serve", ValueError), ("worker", ConnectionResetError)]:
        thread = threading.Thread(target=print, name=f"Thread-9 ({name})")
        threading.excepthook(threading.ExceptHookArgs([exc, exc(), None, thread]))
    assert shown == [ValueError, ConnectionResetError]  # only the dead peer's noise in that thread is dropped


# -- non-finite values -------------------------------------------------------------------------
def _config(data: Path, out: Path, **over) -> TrainConfig:
    base = {"data": str(data), "model": "nano", "out": str(out), "steps": 4, "batch_size": 8, "lr": 2e-3,
            "workers": 0, "save_every": 1, "keep_last": 10, "log_every": 1, "tensorboard": False, "seed": 0}
    return TrainConfig.load(None, {**base, **over})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("small"), n=16)


@pytest.mark.slow
def test_inf_features_with_skip_policy_drop_exactly_that_update(small_data, tmp_path, capsys):
    model = clipforge.create_model("nano", seed=0)
    calls = []

    def poison(module, inputs, output):  # the image tower's output at the third step: +Inf
        calls.append(1)
        return output * float("inf") if len(calls) == 3 else output

    model.visual.register_forward_hook(poison)
    summary = trainer_mod.train(_config(small_data, tmp_path / "run", nan_policy="skip"), model=model, progress=False)
    assert summary["steps"] == 4 and summary["nan_skipped_steps"] == 1
    assert "non-finite loss" in capsys.readouterr().out.split("at step 3: update skipped")[0].splitlines()[-1]
    root = tmp_path / "run" / "checkpoints"
    states = {s: ckpt.load_checkpoint(d)[0] for s, d in ckpt.list_checkpoints(root)}
    assert sorted(states) == [1, 2, 3, 4]
    assert all(torch.isfinite(v).all() for st in states.values() for v in st.values())
    assert all(torch.equal(states[3][k], states[2][k]) for k in states[2])  # step 3 changed nothing
    assert not all(torch.equal(states[4][k], states[3][k]) for k in states[3])  # step 4 trained again
    assert [r["nan_skipped"] for r in read_metrics(tmp_path / "run")] == [0, 0, 1, 1]


@pytest.mark.slow
def test_nan_gradient_behind_a_finite_loss_stops_with_the_step(small_data, tmp_path):
    model = clipforge.create_model("nano", seed=0)
    calls = []

    def poison(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 3 else grad

    model.text.token_embedding.weight.register_hook(poison)
    with pytest.raises(trainer_mod.NonFiniteLossError, match=r"non-finite gradient norm nan at step 3.*step_00000002"):
        trainer_mod.train(_config(small_data, tmp_path / "run"), model=model, progress=False)
    health = checkpoint_health(tmp_path / "run" / "checkpoints")
    assert health["complete"] == [1, 2] and not health["broken"]
    assert not (tmp_path / "run" / "final").exists()


def test_overflowing_weights_are_never_checkpointed(small_data, tmp_path):
    # A finite but absurd learning rate: the first update sends weights to +-Inf while the
    # loss that produced it was still finite. The checkpoint writer is the last line.
    with pytest.raises(CheckpointError, match="refusing to checkpoint step 1: non-finite weights"):
        trainer_mod.train(_config(small_data, tmp_path / "run", lr=1e300, grad_clip=0), progress=False)
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert not (tmp_path / "run" / "final").exists()


# -- disks -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_disk_writing_the_final_model_keeps_the_checkpoint_and_resume_finishes(small_data, tmp_path,
                                                                                    monkeypatch):
    real = ckpt.save_file

    def full_for_final(tensors, filename, metadata=None):
        if Path(filename).parent.name.startswith(".tmp-final"):
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_for_final)
    cfg = _config(small_data, tmp_path / "run", save_every=0)
    with pytest.raises(CheckpointError, match=r"cannot write model to .*final: No space left on device"):
        trainer_mod.train(cfg, progress=False)
    run = tmp_path / "run"
    assert checkpoint_health(run / "checkpoints")["complete"] == [4]  # the end-of-run checkpoint is whole
    assert not (run / "final").exists() and not list(run.glob(".tmp-final*"))
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed
    summary = trainer_mod.train(cfg.replace(resume="auto"), progress=False)
    assert summary["steps"] == 4 and summary["resumed_from_step"] == 4
    final, _ = clipforge.load(run / "final")
    state, _ = ckpt.load_checkpoint(run / "checkpoints" / "step_00000004")
    assert all(torch.equal(v, state[k]) for k, v in final.state_dict().items())  # nothing lost


@pytest.fixture(scope="module")
def small_reference(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("small-ref") / "run"
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert main(_small_argv(small_data, out)) == 0
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    return out


def _small_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "nano", "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--workers", "0", "--save-every", "2", "--log-every", "1", "--no-tensorboard", "--no-progress", *extra]


# What each writer raises when the disk fills up (measured on a full tmpfs): Python's OSError,
# safetensors' SafetensorError, torch.save's zip writer a RuntimeError that does not say why.
def _disk_full(where: str):
    from safetensors import SafetensorError

    return {
        "weights": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "train-state": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        "metrics-log": OSError(errno.ENOSPC, "No space left on device"),
    }[where]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["weights", "train-state", "metrics-log"])
def test_full_disk_mid_run_is_one_line_and_resume_loses_nothing(where, small_data, small_reference, tmp_path,
                                                               monkeypatch, capsys):
    from clipforge.train import logging as logging_mod

    armed = {"on": True}

    def fail_at_step_4(real, step_of):
        def wrapper(*a, **k):
            if armed["on"] and step_of(*a) == 4:
                raise _disk_full(where)
            return real(*a, **k)
        return wrapper

    if where == "weights":
        monkeypatch.setattr(ckpt, "save_file", fail_at_step_4(ckpt.save_file, lambda t, f, *r: 4 if "step_00000004"
                                                                 in str(f) else 0))
    elif where == "train-state":
        monkeypatch.setattr(ckpt.torch, "save", fail_at_step_4(torch.save, lambda o, f, *r: 4 if "step_00000004"
                                                               in str(f) else 0))
    else:
        monkeypatch.setattr(logging_mod.MetricsLogger, "log", fail_at_step_4(logging_mod.MetricsLogger.log,
                                                                             lambda self, step, *r: step + 1))
    run = tmp_path / "run"
    assert main(_small_argv(small_data, run)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    expected = {"weights": "No space left on device", "train-state": "unexpected pos",
                "metrics-log": "No space left on device"}[where]
    assert err.startswith("clipforge train: error: ") and expected in err, err
    if where != "metrics-log":
        assert "step_00000002 is intact" in err
    health = checkpoint_health(run / "checkpoints")
    assert health["complete"] == [2] and not health["broken"] and not health["partial"], health
    armed["on"] = False  # space freed
    assert main(_small_argv(small_data, run, "--resume", "auto")) == 0
    assert not differing_tensors(small_reference / "final", run / "final")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_output_directory_that_cannot_be_created_is_one_line(small_data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    rc = main(["train", "--data", str(small_data), "--model", "nano", "--out", str(tmp_path / "a_file" / "run"),
               "--steps", "1", "--batch-size", "8", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot write to the output directory" in err, err


# -- the bad-input zoo through a whole run -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("source", ["csv", "wds"])
def test_bad_input_zoo_run_completes_with_exact_skip_counts(source, tmp_path, capsys):
    if source == "csv":
        data, expected, rows = write_zoo_csv(tmp_path / "data")
        extra = ["--batch-size", "10", "--workers", "2"]  # 100 rows: ten batches, every row visited once
    else:
        data, expected = write_zoo_shards(tmp_path / "data")
        extra = ["--batch-size", "8", "--workers", "1"]  # one stream: the number of full batches is known
    out = tmp_path / "run"
    rc = main(["train", "--data", str(data), "--model", "nano", "--out", str(out), "--epochs", "1", "--lr", "1e-3",
               "--save-every", "0", "--no-progress", "--no-tensorboard", *extra])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == expected and summary["skipped_total"] == sum(expected.values())
    if source == "csv":
        assert summary["steps"] == 10 and summary["samples_seen"] == rows  # refilled: every batch full
    else:
        from collections import Counter

        from clipforge.data.wds import iter_tar

        kept = len(list(iter_tar(str(tmp_path / "data" / "00001.tar"), Counter())))  # before the cut
        assert 0 < kept < 6 and summary["steps"] == (45 + kept) // 8
    model, _ = clipforge.load(out / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())

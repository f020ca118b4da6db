"""Training trials: SIGKILLs (at random moments and at every kind of checkpoint write), a killed
data worker, NaN/Inf at random steps, a really full disk, damaged checkpoints, the bad-input zoo.

Every trial that kills or breaks a run resumes it with ``--resume auto`` and compares the end
result with an uninterrupted reference run of the same command: "data lost" counts tensors of
the final model that differ, training steps missing from or repeated in the metrics, and
checkpoints marked complete that do not load (all must be zero).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from harness import Proc, Row, fill_disk, run, sleep_or_exit, tmpfs
from support.datasets import write_csv, write_zoo_csv, write_zoo_shards
from support.runs import checkpoint_health, children, differing_tensors

STEPS, SAVE_EVERY = 40, 2
BAD = {"not_an_image": 2, "missing_file": 1, "empty_file": 1}  # 60 good + 4 bad rows: 8 batches of 8


def train_args(data: Path, out: Path, workers: int, resume: bool = False, steps: int = STEPS) -> list[str]:
    args = ["train", "--data", str(data), "--model", "nano", "--out", str(out), "--steps", str(steps),
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--workers", str(workers), "--seed", "7",
            "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--log-every", "1", "--no-tensorboard",
            "--no-progress", "--patch-dropout", "0.25"]
    return args + (["--resume", "auto"] if resume else [])


class Reference:
    """The data and an uninterrupted run (no data workers), timed for choosing kill moments."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = write_csv(root / "data", n=60, bad=BAD)
        self.out = root / "reference"
        rc, err, self.seconds = run(train_args(self.data, self.out, 0), root / "logs")
        assert rc == 0, err
        from clipforge.train.logging import read_metrics

        rates = sorted(r["samples_per_s"] for r in read_metrics(self.out))
        self.per_step = 8 / rates[len(rates) // 2]  # median seconds per step (batch 8)
        self.startup = max(1.0, self.seconds - STEPS * self.per_step)  # interpreter, imports, data, model

    def wait_for_training(self, p: Proc, run_dir: Path) -> bool:
        """Until ``p`` logs a step (training is under way); False if it ended first."""
        metrics = run_dir / "metrics.jsonl"
        size = metrics.stat().st_size if metrics.exists() else 0
        while p.alive():
            if metrics.exists() and metrics.stat().st_size != size:
                return True
            time.sleep(0.005)
        return False

    def compare(self, run_dir: Path) -> tuple[int, str]:
        """(data lost, description) of a finished run against the reference."""
        from clipforge.train.logging import read_metrics

        if not (run_dir / "final").exists():
            return STEPS, "no final model"
        differ = differing_tensors(self.out / "final", run_dir / "final")
        steps = [r["step"] for r in read_metrics(run_dir)]
        bad_steps = len(set(range(1, STEPS + 1)) ^ set(steps)) + (len(steps) - len(set(steps)))
        a, b = (json.loads((d / "summary.json").read_text()) for d in (self.out, run_dir))
        fields = [k for k in ("steps", "samples_seen", "final_loss", "skipped") if a[k] != b[k]]
        lost = len(differ) + bad_steps + len(fields)
        return lost, "bitwise equal" if lost == 0 else f"{len(differ)} tensors differ, {bad_steps} bad steps, {fields}"


def sigkill_random(ref: Reference, trials: int, rng: random.Random, kills: int = 5) -> Row:
    """SIGKILL from outside at random moments, half of them aimed at checkpoint writes (the kill
    lands as soon as a checkpoint's temporary directory appears)."""
    row = Row(f"train: SIGKILL x{kills} in one run, random moments (half aimed at checkpoint writes)")
    for t in range(trials):
        run_dir = ref.root / f"random-{t}"
        done, mid_write, broken, resumed, modes = 0, 0, 0, [], []
        for _ in range(kills * 2):
            if done == kills:
                break
            start = _newest_fast(run_dir)
            root = run_dir / "checkpoints"
            stale = _temporaries(root)  # left by an earlier kill, swept by the next save
            p = Proc(train_args(ref.data, run_dir, 2, resume=run_dir.exists()), ref.root / "logs")
            mode = rng.choice(["start-up", "training", "checkpoint", "checkpoint"])
            modes.append(mode)
            if mode == "start-up":  # imports, data and model set-up, resume
                alive = sleep_or_exit(p, rng.uniform(0, ref.startup))
            elif mode == "training":  # anywhere in the steps still to run
                alive = ref.wait_for_training(p, run_dir) and sleep_or_exit(
                    p, rng.uniform(0, 0.8 * (STEPS - start) * ref.per_step))
            else:  # aim at the write of a checkpoint a few saves ahead: kill as its temporary appears
                target = min(STEPS - SAVE_EVERY, start + SAVE_EVERY * rng.randint(1, 4))
                modes[-1] += f"@{target}"
                alive = False
                while p.alive():
                    if any(n.startswith(f".tmp-step_{target:08d}") for n in _temporaries(root) - stale):
                        time.sleep(rng.uniform(0, 0.004))
                        alive = True
                        break
                    time.sleep(0.0005)
            if not (alive and p.kill()):
                p.wait()
                modes[-1] += " (finished first)"
                break
            done += 1
            health = checkpoint_health(root)
            broken += len(health["broken"])
            mid_write += bool(_temporaries(root) - stale)
            resumed.append(health["complete"][-1] if health["complete"] else 0)
        rc, err, _ = run(train_args(ref.data, run_dir, 2, resume=True), ref.root / "logs")
        lost, how = ref.compare(run_dir) if rc == 0 else (STEPS, err)
        lost += broken
        row.add(done == kills and rc == 0, lost,
                f"trial {t}: {done} kills {modes} ({mid_write} left a half-written checkpoint), newest complete "
                f"checkpoint after each: {resumed}; final: {how}")
    return row


def _temporaries(root: Path) -> set[str]:
    import os

    try:
        return {n for n in os.listdir(root) if n.startswith(".tmp-step_")}
    except OSError:
        return set()


def _newest_fast(run_dir: Path) -> int:
    from clipforge.train import checkpointing as ckpt

    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    return found[-1][0] if found else 0


SCRIPTED = ("step", "weights", "state", "marker", "rename", "prune")


def sigkill_scripted(ref: Reference, trials: int, rng: random.Random, kills: int = 5) -> Row:
    """Five SIGKILLs per run, each at a random (write phase, step) of tests/support/fault_driver.py."""
    row = Row(f"train: SIGKILL x{kills} in one run, at random checkpoint-write phases (fresh processes)")
    for t in range(trials):
        run_dir = ref.root / f"scripted-{t}"
        done, broken, plan = 0, 0, []
        for _ in range(kills):
            newest = _newest_fast(run_dir)
            phase = rng.choice(SCRIPTED)
            step = min(STEPS - 2, newest + rng.randint(1, 6))
            if phase != "step":
                step += step % SAVE_EVERY  # a checkpoint step
            if phase == "prune":
                step = max(step, newest + SAVE_EVERY, 3 * SAVE_EVERY)  # a save that prunes an old one
            p = Proc([phase, str(step), "--", *train_args(ref.data, run_dir, 0, resume=run_dir.exists())],
                     ref.root / "logs", driver=True)
            rc = p.wait()
            plan.append(f"{phase}@{step}")
            if rc != -9:
                plan[-1] += f"(not killed: rc {rc})"
                continue
            done += 1
            broken += len(checkpoint_health(run_dir / "checkpoints")["broken"])
        rc, err, _ = run(train_args(ref.data, run_dir, 0, resume=True), ref.root / "logs")
        lost, how = ref.compare(run_dir) if rc == 0 else (STEPS, err)
        lost += broken
        row.add(done == kills and rc == 0, lost, f"trial {t}: {', '.join(plan)}; final: {how}")
    return row


def worker_death(ref: Reference, trials: int, rng: random.Random) -> Row:
    """A DataLoader worker SIGKILLed from outside (as the OOM killer would) mid-run."""
    row = Row("train: a data-loader worker SIGKILLed mid-run")
    for t in range(trials):
        run_dir = ref.root / f"worker-{t}"
        p = Proc(train_args(ref.data, run_dir, 2), ref.root / "logs")
        victim = None
        workers: list[int] = []
        while not workers and p.alive():  # the loader starts its workers with the first epoch
            time.sleep(0.02)
            workers = children(p.pid, forked=True)
        if workers and sleep_or_exit(p, rng.uniform(0, 0.8 * STEPS * ref.per_step)):
            import os
            import signal

            victim = rng.choice(children(p.pid, forked=True) or workers)
            os.kill(victim, signal.SIGKILL)
        rc = p.wait()
        # the other worker may still log a skipped sample after the error line: look for it
        errors = [ln for ln in p.stderr().splitlines() if ln.startswith("clipforge train: error:")]
        line = errors[-1] if errors else p.last_line()
        clean = rc == 2 and len(errors) == 1 and line.startswith("clipforge train: error: a data loading process "
                                                                 "died") and "Traceback" not in p.stderr()
        broken = len(checkpoint_health(run_dir / "checkpoints")["broken"]) if (run_dir / "checkpoints").exists() else 0
        rc2, err, _ = run(train_args(ref.data, run_dir, 2, resume=True), ref.root / "logs")
        lost, how = ref.compare(run_dir) if rc2 == 0 else (STEPS, err)
        row.add(victim is not None and clean and rc2 == 0, lost + broken,
                f"trial {t}: worker {victim} killed; exit {rc}: {line[:150]!r}; after --resume auto: {how}")
    return row


def nan_inf(root: Path, trials: int, rng: random.Random) -> Row:
    """NaN/Inf injected at a random step (features, or gradients behind a finite loss), under
    both policies: stop names the step and writes nothing after it; skip drops exactly that update."""
    import os

    import torch

    import clipforge
    from clipforge.train import checkpointing as ckpt
    from clipforge.train import trainer as trainer_mod
    from clipforge.train.config import TrainConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    data = write_csv(root / "nan-data", n=16)
    row = Row("train: NaN/Inf at a random step (features or gradients; stop and skip policies)")
    for t in range(trials):
        steps, at = 6, rng.randint(1, 6)
        kind, policy = rng.choice(["features-inf", "features-nan", "gradient-nan"]), rng.choice(["stop", "skip"])
        model = clipforge.create_model("nano", seed=t)
        calls = []

        def poison(value):
            calls.append(1)
            bad = float("inf") if kind == "features-inf" else float("nan")
            return value * bad if len(calls) == at else value

        if kind == "gradient-nan":
            model.text.token_embedding.weight.register_hook(poison)
        else:
            model.visual.register_forward_hook(lambda m, i, out: poison(out))
        out = root / f"nan-{t}"
        cfg = TrainConfig.load(None, {"data": str(data), "model": "nano", "out": str(out), "steps": steps,
                                      "batch_size": 8, "workers": 0, "save_every": 1, "keep_last": 10,
                                      "tensorboard": False, "nan_policy": policy, "seed": t})
        error = None
        try:
            summary = trainer_mod.train(cfg, model=model, progress=False)
        except trainer_mod.NonFiniteLossError as e:
            error, summary = str(e), None
        states = {s: ckpt.load_checkpoint(d)[0] for s, d in ckpt.list_checkpoints(out / "checkpoints")}
        non_finite = sum(not all(torch.isfinite(v).all() for v in st.values()) for st in states.values())
        if policy == "stop":
            ok = error is not None and f"at step {at}" in error and sorted(states) == list(range(1, at))
        else:
            same = at > 1 and all(torch.equal(states[at][k], states[at - 1][k]) for k in states[at])
            ok = summary is not None and summary["nan_skipped_steps"] == 1 and (same or at == 1)
        row.add(ok, non_finite, None if ok else f"trial {t}: {kind} at step {at}, {policy}: {error or summary}")
    row.notes.insert(0, f"{trials} runs: random step 1-6, kind and policy; no non-finite tensor ever checkpointed")
    return row


def disk_full(ref: Reference, trials: int, rng: random.Random) -> Row:
    """A real full file system (tmpfs) mid-run: filled completely (the metrics log or the checkpoint
    hits it first), or with room for the log but not for a checkpoint."""
    row = Row("train: disk full mid-run (real tmpfs)")
    mnt = ref.root / "mnt"
    with tmpfs(mnt, "200m") as resize:
        if resize is None:
            row.notes.append("skipped: mounting a tmpfs is not allowed here")
            return row
        for t in range(trials):
            run_dir = mnt / f"run-{t}"
            p = Proc(train_args(ref.data, run_dir, 0), ref.root / "logs")
            while p.alive() and _newest_fast(run_dir) < 2 * SAVE_EVERY:
                time.sleep(0.01)
            leave = 0 if t % 2 == 0 else 2**20  # 1 MiB: the log fits, a checkpoint (~40 MB) does not
            filler = fill_disk(mnt, leave)
            rc = p.wait()
            line = p.last_line()
            clean = rc == 2 and line.startswith("clipforge train: error:") and "No space left" in line \
                and "Traceback" not in p.stderr()
            health = checkpoint_health(run_dir / "checkpoints")
            filler.unlink()
            rc2, err, _ = run(train_args(ref.data, run_dir, 0, resume=True), ref.root / "logs")
            lost, how = ref.compare(run_dir) if rc2 == 0 else (STEPS, err)
            lost += len(health["broken"])
            row.add(clean and rc2 == 0, lost, f"trial {t} (left {leave} bytes): exit {rc}: {line[:160]!r}; "
                                              f"complete checkpoints {health['complete']}; after freeing space: {how}")
            shutil.rmtree(run_dir, ignore_errors=True)
    return row


def damaged_checkpoints(ref: Reference, trials: int, rng: random.Random) -> Row:
    """Checkpoint files cut at random offsets or with header bytes flipped: always a named
    CheckpointError, never another exception and never a silent load of different weights."""
    from clipforge.errors import CheckpointError
    from clipforge.model.checkpoints import load_state_strict
    from clipforge.model.clip import CLIP
    from clipforge.config import ClipConfig
    from clipforge.train import checkpointing as ckpt

    src = ckpt.latest_checkpoint(ref.out / "checkpoints")
    good = ckpt.load_checkpoint(src)
    row = Row("checkpoint: files truncated at random offsets / header bytes flipped")
    outcomes = {"refused": 0, "harmless": 0, "crash": 0, "silent": 0}
    for t in range(trials):
        d = ref.root / f"damaged-{t}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        name = rng.choice(["model.safetensors", ckpt.STATE_NAME])
        data = bytearray((d / name).read_bytes())
        how = rng.choice(["truncate", "flip"])
        if how == "truncate":
            data = data[: rng.randrange(0, len(data))]
        else:
            i = rng.randrange(0, min(len(data), 400))
            data[i] ^= 1 << rng.randrange(8)
        (d / name).write_bytes(bytes(data))
        try:
            got = ckpt.load_checkpoint(d)
            load_state_strict(CLIP(ClipConfig.from_json(d / "config.json")), got[0], str(d))
            outcome = "harmless" if _same(got, good) else "silent"
            if outcome == "silent":
                row.notes.append(f"{name} {how}: loaded, with different content")
        except CheckpointError:
            outcome = "refused"
        except Exception as e:  # noqa: BLE001 - what the trial looks for
            outcome = "crash"
            row.notes.append(f"{name} {how}: {type(e).__name__}: {e}")
        outcomes[outcome] += 1
        row.add(outcome in ("refused", "harmless"), int(outcome == "silent"))
        shutil.rmtree(d, ignore_errors=True)
    row.notes.insert(0, f"outcomes: {outcomes} (harmless: the flipped bit changed nothing that is read, e.g. "
                        "JSON whitespace or zip metadata)")
    return row


def _same(a, b) -> bool:
    """Deep equality of checkpoint contents (tensors compared exactly)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool((a == b).all())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def bad_input_zoo(root: Path, rng: random.Random) -> Row:
    """Whole training runs over data of which about a tenth is broken (tables and shards)."""
    row = Row("train: bad-input zoo, ~10% broken (14 kinds), full run, 2 workers")
    for source in ("csv", "wds"):
        d = root / f"zoo-{source}"
        if source == "csv":
            data, expected, _ = write_zoo_csv(d / "data")
            extra = ["--batch-size", "10"]
        else:
            data, expected = write_zoo_shards(d / "data")
            extra = ["--batch-size", "8"]
        rc, err, _ = run(["train", "--data", str(data), "--model", "nano", "--out", str(d / "run"), "--epochs", "1",
                          "--workers", "2", "--save-every", "0", "--no-progress", "--no-tensorboard", *extra],
                         root / "logs")
        got = json.loads((d / "run" / "summary.json").read_text())["skipped"] if rc == 0 else None
        missed = sum(abs(got.get(k, 0) - v) for k, v in expected.items()) + sum(
            v for k, v in got.items() if k not in expected) if got is not None else sum(expected.values())
        row.add(rc == 0 and got == expected, 0,
                f"{source}: " + (f"exact counts {json.dumps(got)}" if got == expected
                                 else f"got {got}, expected {expected}, {err}")
                + ("" if not missed else f" (off by {missed})"))
    return row

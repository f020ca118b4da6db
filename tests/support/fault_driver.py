"""Run ``clipforge train`` and SIGKILL it at a chosen point: the fault injector of the
reliability tests and of benchmarks/faults/run_faults.py.

    python tests/support/fault_driver.py PHASE STEP -- train --data ... --out ...

``run_forked`` does the same in a forked copy of the calling process (a test). The module imports
only clipforge and the standard library, so it also runs as a script from any directory.

The process kills itself with SIGKILL (no handler, no cleanup: as the kernel's OOM killer or a
lost node would) at PHASE of step STEP:

    step      inside the step: gradients computed, the optimizer not yet stepped
    weights   writing the checkpoint's model.safetensors (half of it on disk)
    state     writing the checkpoint's train_state.pt (half of it on disk)
    marker    every file and the COMPLETE marker written, before the fsync and rename
    rename    just after the checkpoint directory was renamed into place
    prune     while deleting an old checkpoint (its weights already gone, the rest still there)
    final     writing the final model (half of model.safetensors on disk)
    none      no kill (the run ends normally)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

PHASES = ("step", "weights", "state", "marker", "rename", "prune", "final", "none")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: max(1, len(data) // 2)])
        f.flush()
        os.fsync(f.fileno())


def install(phase: str, step: int) -> None:
    """Patch the trainer and checkpoint writer so that this process dies at (phase, step)."""
    import io

    import torch

    from clipforge.train import checkpointing as ckpt
    from clipforge.train import trainer as trainer_mod

    if phase not in PHASES:
        raise SystemExit(f"unknown phase {phase!r}; one of {', '.join(PHASES)}")
    now = {"saving": None, "final": False}

    real_save = trainer_mod.Trainer._save

    def save(self, t0):
        now["saving"] = self.state.step
        try:
            return real_save(self, t0)
        finally:
            now["saving"] = None

    trainer_mod.Trainer._save = save

    def armed(p: str) -> bool:
        return phase == p and now["saving"] == step and not now["final"]

    real_clip = trainer_mod.Trainer._clip_grads

    def clip_grads(self):
        if phase == "step" and self.state.step + 1 == step:
            _die()  # mid-step: after backward, before the optimizer step
        return real_clip(self)

    trainer_mod.Trainer._clip_grads = clip_grads

    real_save_file = ckpt.save_file

    def save_file(tensors, filename, metadata=None):
        if armed("weights") or (phase == "final" and now["final"]):
            from safetensors.torch import save as to_bytes

            _half_write(filename, to_bytes(tensors, metadata=metadata))
            _die()
        return real_save_file(tensors, filename, metadata=metadata)

    ckpt.save_file = save_file

    real_torch_save = torch.save

    def torch_save(obj, f, *a, **k):
        if armed("state"):
            buf = io.BytesIO()
            real_torch_save(obj, buf, *a, **k)
            _half_write(f, buf.getvalue())
            _die()
        return real_torch_save(obj, f, *a, **k)

    ckpt.torch.save = torch_save

    real_fsync = ckpt._fsync

    def fsync(path):
        if armed("marker"):
            _die()
        return real_fsync(path)

    ckpt._fsync = fsync

    real_replace = os.replace

    def replace(src, dst, *a, **k):
        out = real_replace(src, dst, *a, **k)
        if armed("rename") and Path(src).name.startswith(".tmp-step_"):
            _die()
        return out

    ckpt.os.replace = replace  # ckpt.os is the os module: patched for this process only

    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        p = Path(path)
        if armed("prune") and "step_" in p.name and not p.name.startswith(".tmp-"):
            # rmtree's order is the directory's order, arbitrary: the weights may go first.
            (p / "model.safetensors").unlink(missing_ok=True)
            _die()
        return real_rmtree(path, *a, **k)

    ckpt.shutil.rmtree = rmtree

    real_final = ckpt.save_model_atomic

    def save_model_atomic(*a, **k):
        now["final"] = True
        return real_final(*a, **k)

    ckpt.save_model_atomic = save_model_atomic


def run_forked(phase: str, step: int, argv: list[str]) -> int:
    """Run ``clipforge ARGV`` in a forked copy of this process, to die at (phase, step).

    Returns its exit status as ``subprocess`` reports it (-9 when SIGKILLed). Forking skips a
    fresh interpreter's imports (seconds on a busy machine) and is as abrupt an end: the
    parent sees exactly what the disk holds when the child is killed."""
    import traceback

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller (a test runner)
        rc = 99
        try:
            install(phase, step)
            from clipforge.cli import main as cli_main

            rc = cli_main(argv)
        except BaseException:  # noqa: BLE001 - report, then leave without running the parent's cleanup
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        raise SystemExit(__doc__)
    install(argv[0], int(argv[1]))
    from clipforge.cli import main as cli_main

    return cli_main(argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Where a training run stands, and the parts of a checkpoint that record it: the data position
and counters (``TrainState``), and the settings that give that position its meaning (a run can
resume exactly only with the same batch size, accumulation and world size)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.errors import CheckpointError


@dataclass
class TrainState:
    """Where the run stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` this rank has consumed
    samples_seen: int = 0  # over all ranks
    nan_skipped: int = 0
    elapsed: float = 0.0  # wall seconds of earlier sessions of this run
    last_loss: float | None = None
    skipped: Counter = field(default_factory=Counter)  # this rank's unusable samples, by kind

    def position(self, session_seconds: float) -> dict[str, Any]:
        """The checkpoint's record of the position (``skipped`` is saved per rank, separately)."""
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "samples_seen": self.samples_seen,
                "nan_skipped": self.nan_skipped, "elapsed": self.elapsed + session_seconds,
                "last_loss": self.last_loss}

    def restore(self, train_state: dict[str, Any], rank: int) -> None:
        """Back to a checkpoint's position, with this rank's skip counts."""
        ts = train_state
        self.step, self.epoch, self.batch = ts["step"], ts["epoch"], ts["batch"]
        self.samples_seen, self.nan_skipped, self.elapsed = ts["samples_seen"], ts["nan_skipped"], ts["elapsed"]
        self.last_loss = ts["last_loss"]
        self.skipped = Counter(ts["ranks"][rank]["skipped"])


def resume_settings(batch_size: int, grad_accum: int, world_size: int) -> dict[str, Any]:
    """Settings that give the saved data position its meaning (stored as ``compat``)."""
    return {"batch_size": batch_size, "grad_accum": grad_accum, "world_size": world_size}


def check_resume_settings(train_state: dict[str, Any], now: dict[str, Any], resume_dir: Path) -> None:
    saved = train_state.get("compat", {})
    diff = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume {resume_dir} exactly: {', '.join(diff)}. Start a new run from its "
            f"weights instead (model: {resume_dir})")

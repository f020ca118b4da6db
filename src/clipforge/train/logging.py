"""Run observability: a JSONL metrics file, TensorBoard scalars and a progress bar.

Only the main process creates a ``MetricsLogger`` that writes; the others get a disabled
one, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

METRICS_NAME = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_NAME
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)  # a killed run may have logged past its checkpoint
        self._file = path.open("a", buffering=1)  # line-buffered: each record lands whole
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": prefix, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the record parseable
    return v


def _truncate_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # half a line from a killed process
    path.write_text("".join(k + "\n" for k in kept))


def read_metrics(run_dir: Path | str, kind: str = "train") -> list[dict[str, Any]]:
    """Records of one kind from a run's metrics file (for tests, plots, the demo)."""
    path = Path(run_dir) / METRICS_NAME
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == kind:
            out.append(rec)
    return out


class Progress:
    """A tqdm bar over optimizer steps (ETA from tqdm) showing loss, lr and samples/s."""

    def __init__(self, total: int | None, initial: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)

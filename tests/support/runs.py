"""What a run left behind (checkpoints, weights) and the processes around it."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def checkpoint_health(root: Path) -> dict:
    """What a crash left behind: complete checkpoints (each loaded, to prove it), and the
    partial ones that must be ignored. ``broken`` lists complete-marked ones that fail to load."""
    import clipforge
    from clipforge.train import checkpointing as ckpt

    complete, broken = [], []
    for step, d in ckpt.list_checkpoints(root):
        try:
            ckpt.load_checkpoint(d)
            clipforge.load(d)
            complete.append(step)
        except Exception as e:  # noqa: BLE001 - any failure here is what the caller reports
            broken.append((step, f"{type(e).__name__}: {e}"))
    partial = sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []
    unmarked = sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and not (p / ckpt.MARKER).exists()) \
        if root.is_dir() else []
    return {"complete": complete, "broken": broken, "partial": partial, "unmarked": unmarked}


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ between two model directories (empty: bitwise equal)."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if x.keys() != y.keys():
        return sorted(set(x) ^ set(y))
    return [k for k in x if not (x[k] == y[k]).all()]


def children(pid: int | None = None, forked: bool = False) -> list[int]:
    """Processes whose parent is ``pid`` (default: this one), from /proc (Linux); with
    ``forked``, only those running the parent's command line (forked DataLoader workers)."""
    pid = os.getpid() if pid is None else pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if forked else None
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
            continue
        try:
            if cmdline is None or Path(f"/proc/{entry}/cmdline").read_bytes() == cmdline:
                out.append(int(entry))
        except OSError:
            continue
    return sorted(out)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Helpers shared by the benchmark scripts: the run's environment, JSON records, and
alternating A/B timing with medians (the method in README.md beside this file).

    from common import alternate, summarize, write_record
    times = alternate({"clipforge": step_a, "open_clip": step_b}, reps=7, warmup=2)
    table = summarize(times, reference="open_clip", work=batch_size)   # medians, ratios
    write_record("train_step", {...}, device)   # results/train_step-cpu-latest.json

Records: ``results/BENCH[-DEVICE]-latest.json`` is each benchmark's newest run; every run it
replaced is a line of ``results/history/BENCH.jsonl``. A record's ``file`` field
(``BENCH[-DEVICE]-YYYYmmdd-HHMMSS.json``, UTC time of writing) is the name it is cited by,
wherever it lives: ``grep -r train_step-cpu-20261123-135035 results/`` finds it.

Every speed figure is a ratio against the reference run in the same process; absolute rates
are kept in the record but only mean something beside the device and load they came with.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
HISTORY = "history"  # under RESULTS: one JSONL per benchmark, the records replaced as current
ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def device_name(device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'cpu (Intel(R) Xeon(R) ...)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()})"


def git_state(paths: Sequence[str] = ("src",)) -> str:
    """Short commit, plus the files under ``paths`` (the measured library code) that differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--name-only", "HEAD", "--", *paths],
                               capture_output=True, text=True).stdout.split()
    except OSError:
        return "unknown"
    return (head or "unknown") + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def environment(device="cpu", code_paths: Sequence[str] = ("src",)) -> dict:
    """What a reader needs to judge a figure: device, CPUs, threads, versions, load, code."""
    import torch

    env = {
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "code": git_state(code_paths),
    }
    try:
        import open_clip

        env["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return env


def command() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def save_record(record: Mapping, stem: str, out_dir: Path | None = None,
                when: dt.datetime | None = None) -> Path:
    """Write ``record`` as ``STEM-latest.json`` (``STEM`` = ``BENCH`` or ``BENCH-DEVICE``), the
    benchmark's current record, after appending the record it replaces to
    ``history/BENCH.jsonl``. The written record starts with ``file``, ``STEM-YYYYmmdd-HHMMSS.json``
    from ``when`` (default now, UTC): the name it is cited by once it has moved to the history."""
    when = when or dt.datetime.now(dt.timezone.utc)
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-latest.json"
    if path.exists():
        bench = record.get("benchmark") or stem.split("-")[0]
        history = out / HISTORY / f"{bench}.jsonl"
        history.parent.mkdir(exist_ok=True)
        with history.open("a", encoding="utf-8") as f:
            f.write(json.dumps(json.loads(path.read_text()), ensure_ascii=False) + "\n")
    full = {"file": f"{stem}-{when.strftime('%Y%m%d-%H%M%S')}.json", **record}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(full, indent=2) + "\n")
    tmp.replace(path)
    return path


def write_record(
    name: str, record: Mapping, device="cpu", out_dir: Path | None = None, code_paths: Sequence[str] = ("src",)
) -> Path:
    """Save ``results/NAME-DEVICE-latest.json`` (see :func:`save_record`) with the environment, the
    command, the load average at the end (shared machines) and ``record``'s own fields.
    ``code_paths``: the library code the figures depend on (uncommitted changes there are noted)."""
    import torch

    now = dt.datetime.now(dt.timezone.utc)
    full = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "command": command(),
        **environment(device, code_paths),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **record,
    }
    return save_record(full, f"{name}-{torch.device(device).type}", out_dir, now)


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    fns: Mapping[str, Callable[[], object]], reps: int, warmup: int = 1, device="cpu",
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds per call of each function, after ``warmup`` untimed calls of each. Repetition r
    runs the functions in order when r is even and reversed when odd (A B, B A, ...), so a
    slow drift of the machine's load falls on both sides alike."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            sync(device)
            t0 = clock()
            fns[k]()
            sync(device)
            times[k].append(clock() - t0)
    return times


def summarize(times: Mapping[str, Sequence[float]], reference: str, work: float = 1.0) -> dict:
    """Medians, rates (``work`` units per call / median seconds) and two ratios against the
    reference: of median rates, and the median over repetitions of the adjacent runs' ratio
    (the least disturbed by other load). Ratios > 1 mean faster than the reference."""
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = times[reference]
    out = {
        "reps": len(ref),
        "seconds": {k: [round(t, 5) for t in v] for k, v in times.items()},
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "rate_per_s": {k: round(work / v, 3) for k, v in med.items()},
        "speedup_vs_" + reference: {k: round(med[reference] / v, 3) for k, v in med.items()},
        "paired_speedup_median": {
            k: round(statistics.median(a / b for a, b in zip(ref, v)), 3) for k, v in times.items()
        },
    }
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) without numpy."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def vm_hwm_kb() -> int:
    """This process's peak resident set (kB) since start or the last ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def vm_rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def openclip_twin(model):
    """An ``open_clip.model.CLIP`` of the same architecture holding ``model``'s weights (the
    state dict maps one to one through ``clipforge.model.interop.openai``)."""
    import open_clip

    from clipforge.model.interop.openai import config_to_openclip, to_openai

    cfg = config_to_openclip(model.config)["model_cfg"]
    ref = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                               quick_gelu=cfg["quick_gelu"], init_logit_bias=cfg.get("init_logit_bias"))
    missing, unexpected = ref.load_state_dict(to_openai(model.state_dict()), strict=False)
    # OpenCLIP keeps the causal mask as a non-persistent buffer; nothing else may differ.
    assert not unexpected and all(k.endswith("attn_mask") for k in missing), (missing, unexpected)
    return ref.to(next(model.parameters()).device)


def print_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table, also returned for the record."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text

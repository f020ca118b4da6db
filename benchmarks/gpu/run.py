"""One unattended check of clipforge on a GPU (run through run.sh beside this file): the CUDA
tests, training speed, MFU and memory of ViT-B-32 and ViT-B-16 against OpenCLIP, the largest
ViT-B-16 batch of each library, and JPEG-file embedding against an OpenCLIP script, written into
one JSON record in OUT_DIR (``gpu_check-DEVICE-latest.json``, the format of ``common.save_record``).

    python benchmarks/gpu/run.py OUT_DIR                       # on a GPU: 7.5 minutes at most
    python benchmarks/gpu/run.py --device cpu --quick OUT_DIR  # every stage in seconds, on a CPU

Each stage is a process of its own with a time cap (the caps add up to 7.5 minutes): one that
fails, crashes or runs out of time is recorded as failed with its error, and the next one runs.
The record is rewritten after every stage (``...-partial.json``), so a run cut short still leaves
what it measured. Targets (``stagelib.TARGETS``) are judged in the stages; a missed one carries
the profiler's table of top kernels or allocations.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

GPU_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(GPU_DIR.parent))  # common.py

import common  # noqa: E402

# name, script, cap in seconds on a GPU (the slowest expected part: compiling a model in the tests)
STAGES = [
    ("tests", "stage_tests.py", 150),
    ("train", "stage_train.py", 100),
    ("largest_batch", "stage_batch.py", 100),
    ("embed", "stage_embed.py", 100),
]
QUICK_CAP_S = 90
TARGET_STAGE = {"vit_b32_speedup": "train", "vit_b16_mfu": "train", "vit_b16_largest_batch": "largest_batch",
                "embed_speedup": "embed"}  # as stagelib.TARGETS, without importing torch here


def gpu_info() -> dict | None:
    """Name, driver and memory from nvidia-smi (read without initialising CUDA in this process)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, driver, memory = (x.strip() for x in out[0].split(",", 2))
    return {"name": name, "driver": driver, "memory": memory, "count": len(out)}


def run_stage(name: str, script: str, cap: float, args, work: Path) -> tuple[dict, str]:
    """(the stage's result, its output) after running it under its cap."""
    out = work / f"{name}.json"
    cmd = [sys.executable, str(GPU_DIR / script), "--device", args.device, "--budget-s", str(cap - 8),
           "--peak-tflops", str(args.peak_tflops), "--out", str(out)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # stages may run side by side on a small machine
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=cap, env=env,
                           cwd=GPU_DIR.parent.parent)
        code, log, timed_out = p.returncode, p.stdout + p.stderr, False
    except subprocess.TimeoutExpired as e:
        code, timed_out = None, True
        log = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    wall = round(time.perf_counter() - t0, 2)
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        res = {"status": "failed", "error": None, "figures": {}, "targets": []}
    if timed_out:
        res.update(status="failed", error=f"stopped at its {cap:.0f} s cap")
    elif code != 0 and res["status"] == "ok":
        res["status"] = "failed"
    if res["status"] != "ok" and not res.get("error"):
        res["error"] = (log.strip().splitlines() or [f"exit code {code}"])[-1][:2000]
    res.update(exit_code=code, cap_s=cap, wall_s=wall)
    return res, log


def targets_of(stages: dict) -> list[dict]:
    """Every target, judged or not: a stage that failed before judging its targets leaves them unmet
    (``met`` None) with the stage's error as the reason."""
    out = [t for s in stages.values() for t in s.get("targets", [])]
    seen = {t["name"] for t in out}
    for name, stage in TARGET_STAGE.items():
        if name not in seen and stage in stages:
            out.append({"name": name, "value": None, "met": None,
                        "reason": f"stage {stage} {stages[stage]['status']}: {stages[stage].get('error')}"})
    return out


def tables(stages: dict, targets: list[dict]) -> str:
    """Stages, their figures and the targets, as plain-text tables (printed, and kept in the record)."""
    rows = [(n, s["status"], s.get("wall_s"), (s.get("error") or "")[:90]) for n, s in stages.items()]
    parts = [common.print_table(rows, ("stage", "status", "s", "error"))]
    rows = [(n, k, v) for n, s in stages.items() for k, v in s["figures"].items()]
    print()
    parts.append(common.print_table(rows, ("stage", "figure", "value")))
    status = {True: "met", False: "MISSED", None: "not measured"}
    rows = [(t["name"], t.get("measured_on", "-"), t["value"], t.get("threshold", "-"),
             status[t["met"]] + (" (profile in record)" if "profile" in t else "")) for t in targets]
    print()
    parts.append(common.print_table(rows, ("target", "measured on", "value", "threshold", "status")))
    return "\n\n".join(parts)


def record_of(args, stages: dict, started: float, gpu: dict | None, env: dict) -> dict:
    """The record as common.write_record lays it out (``env``: ``common.environment``), with the
    GPU's name read from nvidia-smi or a stage."""
    device = (gpu or {}).get("name") or next((s["device_info"]["name"] for s in stages.values()
                                              if s.get("device_info", {}).get("name")), None)
    targets = targets_of(stages)
    return {
        "benchmark": "gpu_check",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": common.command(),
        **env,
        "device": device or env["device"],
        "gpu": gpu,
        "load_average_at_end": list(os.getloadavg()),
        "mode": "quick" if args.quick else "full",
        "requested_device": args.device,
        "peak_tflops": args.peak_tflops,
        "jobs": args.jobs,
        "setup": "stages in their own processes, each under a time cap, one after another (with --quick on a "
                 "CPU two at a time: no timing is judged there); training and "
                 "embedding compare clipforge with OpenCLIP on the same weights and inputs, alternating",
        "stages": stages,
        "targets": targets,
        "seconds_total": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for the record (created)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: every stage in seconds (tested on a CPU)")
    ap.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES])
    ap.add_argument("--jobs", type=int, default=None,
                    help="stages run side by side (default 1; 2 with --quick on a CPU, where no timing is judged)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100 SXM: 989)")
    args = ap.parse_args()
    args.jobs = args.jobs or (2 if args.quick and args.device == "cpu" else 1)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = gpu_info() if args.device == "cuda" else None
    stem = f"gpu_check-{args.device}"
    partial = args.out / f"{stem}-partial.json"
    todo = [s for s in STAGES if s[0] in args.stages]
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="clipforge-gpu-check-") as tmp, \
            open(args.out / "run.log", "a") as log, ThreadPoolExecutor(args.jobs) as pool:
        # Side by side, the longest stages (the last ones) start first; one at a time, in order.
        order = todo[::-1] if args.jobs > 1 else todo
        futures = {name: pool.submit(run_stage, name, script, QUICK_CAP_S if args.quick else cap, args, Path(tmp))
                   for name, script, cap in order}
        futures = {name: futures[name] for name, _, _ in todo}  # results gathered in the stages' order
        # Read while the stages run; on the CPU side only, so this process never initialises CUDA.
        env = common.environment("cpu", code_paths=("src/clipforge", "benchmarks"))
        for name, fut in futures.items():
            res, text = fut.result()
            stages[name] = res
            log.write(f"===== stage {name}: {res['status']} in {res['wall_s']} s =====\n{text}\n")
            log.flush()
            print(f"stage {name}: {res['status']} in {res['wall_s']} s" +
                  (f" - {res['error']}" if res.get("error") else ""), flush=True)
            partial.write_text(json.dumps(record_of(args, stages, started, gpu, env), indent=2, default=str) + "\n")
    record = record_of(args, stages, started, gpu, env)
    print()
    record["table"] = tables(stages, record["targets"])
    path = common.save_record(record, stem, args.out)
    partial.unlink(missing_ok=True)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

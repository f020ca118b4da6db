"""``clipforge experiment``: the CLIP paper's central findings, reproduced in miniature.

Each finding trains what it needs on the built-in data world (shared models are trained once
per seed and cached under --work), prints a table, and writes <finding>.json and <finding>.png
under --out. ``all`` runs the seven in turn; ``report`` writes REPORT.md from the JSON results.
The default scale runs everything on two CPU cores within an hour; --scale medium/large
are the same experiments at GPU sizes.
"""

from __future__ import annotations

import argparse
import os
import shlex

ACTIONS = ("objectives", "prompts", "fewshot", "probe", "robustness", "scaling", "labelset", "all", "report")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="reproduce the CLIP paper's findings in miniature", description=__doc__)
    p.add_argument("finding", choices=ACTIONS, help="which finding to run (all: every one; report: REPORT.md only)")
    p.add_argument("--out", default="experiments_out/results",
                   help="results: JSON + plots, in the current directory [experiments_out/results]")
    p.add_argument("--work", default="runs/paper", help="world, trained models and caches [runs/paper]")
    p.add_argument("--report", default=None, help="REPORT.md path [<out>/../REPORT.md]")
    p.add_argument("--scale", default="small", help="smoke | small | medium | large [small]")
    p.add_argument("--seeds", type=int, default=None, help="seeds per experiment [scale's, 3 for small]")
    p.add_argument("--clip-steps", type=int, default=None, help="steps of the shared CLIP models (findings 2-5, 7)")
    p.add_argument("--objectives-steps", type=int, default=None, help="steps per objective (finding 1)")
    p.add_argument("--scaling-steps", type=int, default=None, help="steps per model size (finding 6)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda [auto]")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch per job (sets OMP_NUM_THREADS; use 1 on a busy machine)")
    p.add_argument("--jobs", type=int, default=None,
                   help="'all' only: run findings 1+6 in a second process beside 2-5, 7 [2 on a CPU with 2+ cores]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# Flags that change what is computed or where it goes, with their defaults (left out when equal).
_RECORDED = {"out": "experiments_out/results", "work": "runs/paper", "scale": "small", "seeds": None,
             "clip_steps": None, "objectives_steps": None, "scaling_steps": None, "device": "auto", "threads": None}


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, as recorded in every result."""
    words = ["clipforge", "experiment", args.finding]
    for name, default in _RECORDED.items():
        value = getattr(args, name)
        if value is not None and value != default:
            words += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(words)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clipforge.cli import CliError

    if args.threads is not None:
        if args.threads < 1:
            raise CliError("--threads must be >= 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the trainer reads it; set before torch spins up
    import torch

    from clipforge.experiments import ExperimentConfig, get_scale, run_all, run_finding, write_report

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for flag in ("seeds", "clip_steps", "objectives_steps", "scaling_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be >= 1")
    scale = get_scale(args.scale, seeds=args.seeds, clip_steps=args.clip_steps,
                      objectives_steps=args.objectives_steps, scaling_steps=args.scaling_steps)
    out = Path(args.out)
    report = Path(args.report) if args.report else out.parent / "REPORT.md"
    cfg = ExperimentConfig(scale=scale, out=out, work=Path(args.work), device=args.device,
                           progress=not args.no_progress, command=command_line(args))
    if args.finding == "all":
        jobs = args.jobs
        if jobs is None:  # two single-threaded streams use two cores better than one two-threaded one
            cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
            jobs = 2 if cpu and (os.cpu_count() or 1) >= 2 else 1
        if jobs < 1:
            raise CliError("--jobs must be >= 1")
        run_all(cfg, jobs=jobs, threads=args.threads)
    elif args.finding != "report":
        record = run_finding(args.finding, cfg)
        verdict = record["verdict"]["verdict"]
        print(f"[{args.finding}] {verdict} ({record['wall_s']:.0f} s) -> {out / args.finding}.json", flush=True)
    path = write_report(out, report)
    print(f"report: {path}")
    return 0

"""The CLIP paper's central findings, reproduced in miniature on the built-in data world.

    from clipforge.experiments import ExperimentConfig, get_scale, run_finding
    cfg = ExperimentConfig(scale=get_scale("small"), out=Path("experiments_out/results"), work=Path("runs/paper"))
    record = run_finding("prompts", cfg)     # prints a table, writes prompts.json + prompts.png under out
    write_report(cfg.out, Path("experiments_out/REPORT.md"))

Findings (one module each, ``run(cfg) -> record``): ``objectives`` (f1: contrastive vs predictive
objectives), ``prompts`` (f2: prompt engineering), ``fewshot`` (f3: zero-shot vs k-shot probes),
``probe`` (f4: linear probe vs a supervised model), ``robustness`` (f5: effective robustness),
``scaling`` (f6: error vs compute), ``labelset`` (f7: adding a group's natural category to the
label set cuts its misclassification). Shared CLIP models, supervised baselines and features are
trained once per seed and cached under ``cfg.work`` (``shared``); the predictive baselines live in
``objectives`` and ``supervised``. ``clipforge experiment`` is the command line.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from clipforge.experiments.config import FINDINGS, SCALES, ExperimentConfig, Scale, get_scale

__all__ = ["FINDINGS", "SCALES", "ExperimentConfig", "Scale", "get_scale", "run_finding", "run_all", "write_report"]

MODULES = {"objectives": "f1_objectives", "prompts": "f2_prompts", "fewshot": "f3_fewshot", "probe": "f4_probe",
           "robustness": "f5_robustness", "scaling": "f6_scaling", "labelset": "f7_labelset"}
# Shared models first (prompts trains the CLIP runs, probe the supervised ones), the longest last.
RUN_ORDER = ("prompts", "fewshot", "probe", "robustness", "labelset", "scaling", "objectives")
# With two jobs: findings 2-5 and 7 (the shared models) beside 6 and 1 (their own models); shared
# artefacts are trained once under file locks, whichever asks first. The first stream ends sooner
# and then trains finding 1's runs that the second has not started (``help_train``), so finding 1
# comes last in the second stream.
STREAMS = (("prompts", "fewshot", "probe", "robustness", "labelset"), ("scaling", "objectives"))


def run_finding(name: str, cfg: ExperimentConfig) -> dict[str, Any]:
    if name not in MODULES:
        raise KeyError(f"unknown finding {name!r}; known: {', '.join(FINDINGS)}")
    return importlib.import_module(f"clipforge.experiments.{MODULES[name]}").run(cfg)


def run_all(cfg: ExperimentConfig, names: tuple[str, ...] = RUN_ORDER, jobs: int = 1,
            threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Run ``names``; with ``jobs=2`` as two parallel processes (``STREAMS``) of ``threads`` torch
    threads each (default: the cores divided between them). Returns the records by finding."""
    if jobs <= 1:
        _run_stream(names, cfg, None)
        return {n: json.loads((cfg.out / f"{n}.json").read_text()) for n in names}
    import multiprocessing as mp

    from clipforge.errors import ClipforgeError
    from clipforge.experiments.common import ensure_world
    from clipforge.utils import usable_cpus

    cores = usable_cpus()
    threads = threads or max(1, cores // 2)
    here, there = ([n for n in s if n in names] for s in STREAMS)
    here += [n for n in names if n not in here and n not in there]
    ensure_world(cfg)  # once, before two processes would both find it missing
    child = mp.get_context("spawn").Process(target=_run_stream, args=(tuple(there), cfg, threads))
    child.start()
    try:
        _run_stream(tuple(here), cfg, threads, helps=tuple(there))
    finally:
        child.join()
    if child.exitcode != 0:
        raise ClipforgeError(f"the parallel job running {', '.join(there)} failed (exit code {child.exitcode})")
    return {n: json.loads((cfg.out / f"{n}.json").read_text()) for n in names}


def _run_stream(names: tuple[str, ...], cfg: ExperimentConfig, threads: int | None,
                helps: tuple[str, ...] = ()) -> None:
    """Run ``names`` in order, then train what the other stream's findings ``helps`` still need
    (their ``help_train``, where they have one)."""
    if threads is not None:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # the trainer sizes its thread pool from it
        torch.set_num_threads(threads)
    import time

    t0 = time.time()
    for i, n in enumerate(names, 1):
        rec = run_finding(n, cfg)
        print(f"[{n}] {rec['verdict']['verdict']} ({rec['wall_s']:.0f} s) -> {cfg.out / n}.json", flush=True)
        print(progress_line(names, i, time.time() - t0), flush=True)
    for n in helps:
        helper = getattr(importlib.import_module(f"clipforge.experiments.{MODULES[n]}"), "help_train", None)
        if helper is not None:
            print(f"[{n}] this stream's findings are done: training the runs of {n} that the other stream "
                  "has not started", flush=True)
            helper(cfg)


def progress_line(names: tuple[str, ...], done: int, elapsed: float) -> str:
    """'[2/5 findings of this stream, 4.0 min elapsed, ~6.0 min left]': the ETA at the mean pace
    so far (the first findings train the shared models, so it errs long, not short)."""
    left = elapsed / done * (len(names) - done)
    return (f"[{done}/{len(names)} findings of this stream ({', '.join(names)}), {elapsed / 60:.1f} min elapsed, "
            f"~{left / 60:.1f} min left]")


def write_report(*args: Any, **kwargs: Any) -> Any:
    from clipforge.experiments.report import write_report as _write

    return _write(*args, **kwargs)

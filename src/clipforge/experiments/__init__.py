"""The CLIP paper's central findings, reproduced in miniature on the built-in data world.

    from clipforge.experiments import ExperimentConfig, get_scale, run_finding
    cfg = ExperimentConfig(scale=get_scale("small"), out=Path("benchmarks/paper/results"), work=Path("runs/paper"))
    record = run_finding("prompts", cfg)     # prints a table, writes prompts.json + prompts.png under out
    write_report(cfg.out, Path("benchmarks/paper/REPORT.md"))

Findings (one module each, ``run(cfg) -> record``): ``objectives`` (f1: contrastive vs predictive
objectives), ``prompts`` (f2: prompt engineering), ``fewshot`` (f3: zero-shot vs k-shot probes),
``probe`` (f4: linear probe vs a supervised model), ``robustness`` (f5: effective robustness),
``scaling`` (f6: error vs compute). Shared CLIP models, supervised baselines and features are
trained once per seed and cached under ``cfg.work`` (``shared``); the predictive baselines live in
``objectives`` and ``supervised``. ``clipforge experiment`` is the command line.
"""

from __future__ import annotations

import importlib
from typing import Any

from clipforge.experiments.config import FINDINGS, SCALES, ExperimentConfig, Scale, get_scale

__all__ = ["FINDINGS", "SCALES", "ExperimentConfig", "Scale", "get_scale", "run_finding", "run_all", "write_report"]

MODULES = {"objectives": "f1_objectives", "prompts": "f2_prompts", "fewshot": "f3_fewshot", "probe": "f4_probe",
           "robustness": "f5_robustness", "scaling": "f6_scaling"}
# Shared models first (prompts trains the CLIP runs, probe the supervised ones), the longest last.
RUN_ORDER = ("prompts", "fewshot", "probe", "robustness", "scaling", "objectives")


def run_finding(name: str, cfg: ExperimentConfig) -> dict[str, Any]:
    if name not in MODULES:
        raise KeyError(f"unknown finding {name!r}; known: {', '.join(FINDINGS)}")
    return importlib.import_module(f"clipforge.experiments.{MODULES[name]}").run(cfg)


def run_all(cfg: ExperimentConfig, names: tuple[str, ...] = RUN_ORDER) -> dict[str, dict[str, Any]]:
    return {n: run_finding(n, cfg) for n in names}


def write_report(*args: Any, **kwargs: Any) -> Any:
    from clipforge.experiments.report import write_report as _write

    return _write(*args, **kwargs)

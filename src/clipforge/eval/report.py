"""Evaluation results on disk, and reports that aggregate them.

One JSON per (model, dataset, task) with CLIP_benchmark's fields (``dataset``, ``model``,
``pretrained``, ``task``, ``metrics``: ``clip_benchmark build`` reads these files) plus
``details`` (confusion matrix, per-template accuracy, ...), the
options, the command line and library versions. :func:`write_report` turns a folder of them
into ``report.md``, ``report.csv`` (long format: one metric per row) and ``report.html`` with
plots. Plots use matplotlib's object API on the Agg canvas, so no display or global backend
switch is involved.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = [
    "TASKS",
    "make_result",
    "write_result",
    "load_results",
    "main_metric",
    "plot_few_shot",
    "plot_per_template",
    "write_report",
]

# CLIP_benchmark's task names where it has them.
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "few_shot", "robustness")
_MAIN = {
    "zeroshot_classification": "acc1",
    "linear_probe": "acc1",
    "zeroshot_retrieval": "image_retrieval_recall@1",
    "robustness": "mean_shifted_acc1",
}
_FIRST = ("acc1", "acc5", "mean_per_class_recall")


def _versions() -> dict[str, str]:
    import numpy
    import torch

    from clipforge.version import __version__

    return {"clipforge": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf become null (JSON has no NaN), tuples lists, paths strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def make_result(
    task: str, model: str, dataset: str, metrics: dict[str, Any], details: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None, command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A result record; ``command`` defaults to this process's command line."""
    return {
        "dataset": dataset,
        "model": model,
        # CLIP_benchmark's weights tag beside the architecture; `clip_benchmark build` needs the
        # field. clipforge names the weights in `model` (a path or a pretrained name): empty.
        "pretrained": "",
        "task": task,
        "metrics": metrics,
        "details": details or {},
        "options": options or {},
        "command": " ".join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_result(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(result), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every ``*.json`` under ``folder`` that is a result record (other JSON files are ignored)."""
    out = []
    for p in sorted(Path(folder).rglob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and {"dataset", "model", "task", "metrics"} <= set(r):
            r["_path"] = str(p)
            out.append(r)
    return out


def main_metric(result: dict[str, Any]) -> tuple[str, float | None]:
    key = _MAIN.get(result["task"])
    if key is None:  # few-shot: the largest k
        shots = [k for k in result["metrics"] if k.startswith("acc1_") and k.endswith("shot")]
        key = max(shots, key=lambda k: int(k[5:-4]), default="acc1")
    return key, result["metrics"].get(key)


# -- plots ------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path | None) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def plot_few_shot(
    shots: Sequence[dict[str, Any]], zeroshot_acc: float | None = None, path: str | Path | None = None,
    title: str = "",
) -> bytes:
    """Accuracy against k (mean +- std over draws), zero-shot accuracy as a horizontal line. PNG bytes."""
    fig = _figure(5, 3.5)
    ax = fig.add_subplot()
    ks = [r["k"] for r in shots]
    ax.errorbar(ks, [100 * r["acc1_mean"] for r in shots], yerr=[100 * r["acc1_std"] for r in shots],
                marker="o", capsize=3, label="linear probe (k-shot)")
    if zeroshot_acc is not None:
        ax.axhline(100 * zeroshot_acc, color="tab:red", linestyle="--", label="zero-shot")
    if ks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path) if path else None)


def plot_per_template(per_template: Sequence[dict[str, Any]], path: str | Path | None = None, title: str = "",
                      ensemble_acc: float | None = None) -> bytes:
    """Top-1 accuracy of each template alone, sorted, with the ensemble as a line. PNG bytes."""
    rows = sorted(per_template, key=lambda r: r["acc1"] or 0.0)
    fig = _figure(6, 0.8 + 0.18 * max(len(rows), 1))
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [100 * (r["acc1"] or 0.0) for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [r["template"] for r in rows], fontsize=7)
    if ensemble_acc is not None:
        ax.axvline(100 * ensemble_acc, color="tab:red", linestyle="--", label="ensemble")
        ax.legend(fontsize=8)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(path) if path else None)


def _plot_bars(results: Sequence[dict[str, Any]], task: str, path: Path | None) -> bytes:
    by = defaultdict(dict)
    metric = ""
    for r in results:
        metric, value = main_metric(r)
        by[r["dataset"]][r["model"]] = 100 * value if value is not None else 0.0
    datasets = sorted(by)
    models = sorted({m for d in by.values() for m in d})
    fig = _figure(max(4, 1 + 0.9 * len(datasets) * max(1, len(models)) ** 0.5), 3.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        ax.bar([j + i * width for j in range(len(datasets))], [by[d].get(m, 0.0) for d in datasets], width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], datasets, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(task, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


# -- tables and pages -------------------------------------------------------------------


def _column_order(key: str) -> tuple:
    """acc1, acc5, recall, then the rest with numbers compared as numbers (@5 before @10), counts last."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key) if p)
    first = _FIRST.index(key) if key in _FIRST else len(_FIRST)
    return (first, key.startswith("num_"), parts)


def _metric_columns(results: Iterable[dict[str, Any]]) -> list[str]:
    keys = {k for r in results for k, v in r["metrics"].items() if isinstance(v, (int, float)) or v is None}
    return sorted(keys, key=_column_order)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_report(folder: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Aggregate the results under ``folder`` into report.md / report.csv / report.html (+ plots/)."""
    from clipforge.errors import DataError

    results = load_results(folder)
    if not results:
        raise DataError(f"{folder}: no result JSON files (with dataset, model, task, metrics)")
    out = Path(out_dir) if out_dir is not None else Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_task[r["task"]].append(r)

    md = ["# Evaluation report", "", f"{len(results)} results from `{folder}`.", ""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>clipforge evaluation report</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2)"
            "{text-align:left}img{max-width:100%}</style></head><body><h1>Evaluation report</h1>"]
    plots: list[tuple[str, bytes]] = []
    for task in sorted(by_task, key=lambda t: (TASKS.index(t) if t in TASKS else len(TASKS), t)):
        rows = sorted(by_task[task], key=lambda r: (r["dataset"], r["model"]))
        cols = _metric_columns(rows)
        md += [f"## {task}", "", "| model | dataset | " + " | ".join(cols) + " |",
               "|---|---|" + "---:|" * len(cols)]
        md += ["| " + " | ".join([r["model"], r["dataset"], *(_fmt(r["metrics"].get(c)) for c in cols)]) + " |"
               for r in rows]
        md.append("")
        page.append(f"<h2>{html.escape(task)}</h2><table><tr><th>model</th><th>dataset</th>"
                    + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        for r in rows:
            cells = [r["model"], r["dataset"], *(_fmt(r["metrics"].get(c)) for c in cols)]
            page.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        page.append("</table>")
        task_plots = []
        if task != "few_shot":  # few-shot results get curves instead of bars
            task_plots.append((f"{task}.png", _plot_bars(rows, task, out / "plots" / f"{task}.png")))
        for i, r in enumerate(rows):
            label = f"{r['model']} on {r['dataset']}"
            if task == "few_shot" and r["details"].get("shots"):
                zs = r["metrics"].get("zeroshot_acc1") or next(
                    (z["metrics"].get("acc1") for z in by_task.get("zeroshot_classification", [])
                     if z["model"] == r["model"] and z["dataset"] == r["dataset"]), None)
                name = f"few_shot_{i}.png"
                task_plots.append((name, plot_few_shot(r["details"]["shots"], zs, out / "plots" / name, label)))
            if task == "zeroshot_classification" and len(r["details"].get("per_template") or []) > 1:
                name = f"templates_{i}.png"
                png = plot_per_template(r["details"]["per_template"], out / "plots" / name, label,
                                        r["metrics"].get("acc1"))
                task_plots.append((name, png))
        for name, png in task_plots:
            md.append(f"![{name}](plots/{name})")
            page.append(f"<p><img alt='{html.escape(name)}' src='data:image/png;base64,"
                        f"{base64.b64encode(png).decode()}'></p>")
            plots.append((name, png))
        md.append("")
    page.append("</body></html>")

    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text("\n".join(page) + "\n")
    with (out / "report.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "dataset", "task", "metric", "value"])
        for r in results:
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)) or v is None:
                    w.writerow([r["model"], r["dataset"], r["task"], k, "" if v is None else v])
    return {"markdown": out / "report.md", "csv": out / "report.csv", "html": out / "report.html",
            "plots": out / "plots"}

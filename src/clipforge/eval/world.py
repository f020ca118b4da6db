"""Evaluate a model on a generated data world (``clipforge data synth``) in one pass.

Reads only the world's files (``<split>.csv`` and ``tasks/*.json``), so it works on any world
directory. Image features are computed once per split and shared by every task; each task is
scored with the bare class name, the single "good" template and the template ensemble, which
is the paper's prompt-engineering comparison. Tasks whose prompts need per-image values (the
relation task: "{a} is {} {b}") get per-row classifiers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import DataError
from clipforge.eval import metrics
from clipforge.eval.datasets import read_table
from clipforge.eval.features import FeatureOptions, extract_image_features, extract_text_features
from clipforge.eval.templates import fill
from clipforge.eval.zeroshot import ensemble_prompts

PROMPT_SETS = ("plain", "template", "ensemble")


@dataclass
class SplitFeatures:
    rows: list[dict[str, Any]]
    paths: list[Path]
    features: torch.Tensor  # [N, E] normalised; rows of unreadable images are zero
    readable: torch.Tensor  # [N] bool


@dataclass(frozen=True)
class WorldEvalConfig:
    splits: tuple[str, ...] = ("test", "test_heldout", "test_sketch", "test_noise", "test_texture",
                               "test_scale_rotation")
    tasks: tuple[str, ...] | None = None  # None: every task of the world
    retrieval_split: str = "test"
    retrieval_captions: int = 1000
    retrieval_queries: tuple[str, ...] = ("a red circle", "two blue squares", "a large yellow star",
                                          "a green triangle at the top", "a pink heart on the left")
    retrieval_top: int = 8
    # Accuracy also broken down by these row columns, per split: which held-out pair fails.
    group_by: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"test_heldout": ("colour", "shape")})
    options: FeatureOptions = field(default_factory=lambda: FeatureOptions(batch_size=256, progress=False))


def load_tasks(world: Path, names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    task_dir = world / "tasks"
    if not task_dir.is_dir():
        raise DataError(f"{world}: no tasks/ folder; is this a data world (clipforge data synth)?")
    tasks = {p.stem: json.loads(p.read_text()) for p in sorted(task_dir.glob("*.json"))}
    if names is not None:
        unknown = sorted(set(names) - set(tasks))
        if unknown:
            raise DataError(f"{world}: unknown tasks {unknown}; known: {sorted(tasks)}")
        tasks = {n: tasks[n] for n in names}
    return tasks


def split_features(model: nn.Module, world: Path, split: str, options: FeatureOptions) -> SplitFeatures:
    table = world / f"{split}.csv"
    if not table.is_file():
        raise DataError(f"{table}: split not found")
    rows = read_table(table)
    paths = [world / r["image"] for r in rows]
    got = extract_image_features(model, paths, options=options, desc=f"{split} images")
    feats = torch.zeros(len(rows), got.features.shape[1] if got.features.numel() else 1)
    readable = torch.zeros(len(rows), dtype=torch.bool)
    if got.features.numel():
        feats[got.index] = F.normalize(got.features, dim=-1)
        readable[got.index] = True
    return SplitFeatures(rows, paths, feats, readable)


def _encode(model: nn.Module, texts: list[str], options: FeatureOptions) -> torch.Tensor:
    return F.normalize(extract_text_features(model, texts, options, desc="prompts"), dim=-1)


def _class_prompt_sets(model: nn.Module, task: dict[str, Any], options: FeatureOptions) -> dict[str, torch.Tensor]:
    """Classifier [E, C] for each prompt set: bare name, one template, ensemble of templates.
    The bare name is the task's ``names`` entry where it has them: a polysemous class's bare word
    ("diamond" for "diamond gemstone"), since a bare name carries no context to disambiguate it."""
    classes = task["classes"]
    sets = {"plain": [task.get("plain_template", "{}")], "template": [task["template"]], "ensemble": task["templates"]}
    out = {}
    for name, templates in sets.items():
        words = task.get("names", classes) if name == "plain" else classes
        emb = _encode(model, [fill(t, c) for t in templates for c in words], options)
        out[name] = ensemble_prompts(emb.reshape(len(templates), len(classes), -1))  # [E, C]
    return out


def _row_prompt_logits(
    model: nn.Module, task: dict[str, Any], rows: list[dict[str, Any]], img: torch.Tensor, options: FeatureOptions
) -> dict[str, torch.Tensor]:
    """Per-row classifiers for tasks whose prompts name the row's objects ({a}, {b})."""
    classes, fields = task["classes"], task["fields"]
    sets = {"plain": [task.get("plain_template", "{}")], "template": [task["template"]], "ensemble": task["templates"]}
    out = {}
    for name, templates in sets.items():
        texts = []
        for r in rows:
            for t in templates:
                for c in classes:
                    prompt = fill(t, c)
                    for key, column in fields.items():
                        prompt = prompt.replace("{" + key + "}", str(r[column]))
                    texts.append(prompt)
        emb = _encode(model, texts, options).reshape(len(rows), len(templates), len(classes), -1)
        cls = F.normalize(emb.mean(dim=1), dim=-1)  # [N, C, E]
        out[name] = torch.einsum("ne,nce->nc", img, cls)
    return out


def evaluate_task(
    model: nn.Module, task: dict[str, Any], split: SplitFeatures, options: FeatureOptions,
    group_by: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Accuracy with each prompt set, and for the ensemble the per-class recall and confusion
    matrix; with ``group_by`` columns also ``by_group``: ensemble accuracy per distinct value
    of those columns (e.g. "black hexagon"), rows missing one of them left out."""
    column, classes = task["label_column"], task["classes"]
    index = {c: i for i, c in enumerate(classes)}
    keep = [i for i, r in enumerate(split.rows) if str(r.get(column) or "") in index and split.readable[i]]
    if not keep:
        return None
    labels = torch.tensor([index[str(split.rows[i][column])] for i in keep])
    img = split.features[keep]  # [n, E]
    if task.get("fields"):
        logits = _row_prompt_logits(model, task, [split.rows[i] for i in keep], img, options)
    else:
        logits = {name: img @ w for name, w in _class_prompt_sets(model, task, options).items()}
    result: dict[str, Any] = {"num_samples": len(keep)}
    for name, lg in logits.items():
        result[name] = metrics.topk_accuracy(lg, labels, 1)
    full = metrics.classification_metrics(logits["ensemble"], labels, len(classes))
    result["mean_per_class_recall"] = full["mean_per_class_recall"]
    result["confusion_matrix"] = full["confusion_matrix"]
    if group_by:
        right = (logits["ensemble"].argmax(dim=1) == labels).tolist()
        groups: dict[str, list[bool]] = {}
        for ok, i in zip(right, keep):
            values = [str(split.rows[i].get(c) or "") for c in group_by]
            if all(values):
                groups.setdefault(" ".join(values), []).append(ok)
        result["by_group"] = {k: {"accuracy": sum(v) / len(v), "num_samples": len(v)}
                              for k, v in sorted(groups.items())}
    return result


def evaluate_world(model: nn.Module, world: str | Path, cfg: WorldEvalConfig = WorldEvalConfig()) -> dict[str, Any]:
    """Zero-shot accuracy per task, split and prompt set; retrieval on test captions; example searches.

    Returns ``{"zeroshot": {task: {split: {...}}}, "retrieval": {...}, "examples": [...]}``.
    """
    world = Path(world)
    tasks = load_tasks(world, cfg.tasks)
    was_training = model.training
    model.eval()
    try:
        features = {s: split_features(model, world, s, cfg.options) for s in cfg.splits}
        zeroshot: dict[str, dict[str, Any]] = {}
        for name, task in tasks.items():
            per_split = {}
            for s in cfg.splits:
                if s in task.get("splits", cfg.splits):
                    r = evaluate_task(model, task, features[s], cfg.options, cfg.group_by.get(s, ()))
                    if r is not None:
                        per_split[s] = r
            zeroshot[name] = per_split
        retrieval, examples = _retrieval(model, features.get(cfg.retrieval_split) or split_features(
            model, world, cfg.retrieval_split, cfg.options), cfg)
    finally:
        model.train(was_training)
    return {"zeroshot": zeroshot, "retrieval": retrieval, "examples": examples}


def _retrieval(model: nn.Module, split: SplitFeatures, cfg: WorldEvalConfig) -> tuple[dict[str, Any], list[dict]]:
    n = min(cfg.retrieval_captions, len(split.rows))
    rows = [i for i in range(n) if split.readable[i]]
    img = split.features[rows]
    txt = _encode(model, [split.rows[i]["caption"] for i in rows], cfg.options)
    result = metrics.retrieval_metrics(img, txt, list(range(len(rows))), ks=(1, 5, 10))
    queries = _encode(model, list(cfg.retrieval_queries), cfg.options)
    top = (queries @ split.features[split.readable].T).topk(cfg.retrieval_top, dim=1)  # [Q, k]
    readable_paths = [p for p, ok in zip(split.paths, split.readable.tolist()) if ok]
    examples = [
        {"query": q, "paths": [str(readable_paths[j]) for j in idx.tolist()], "scores": s.tolist()}
        for q, idx, s in zip(cfg.retrieval_queries, top.indices, top.values)
    ]
    return result, examples

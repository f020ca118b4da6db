"""Models and features shared between findings, trained once per seed and cached under ``work``.

* CLIP models are trained by the library's trainer (``train(TrainConfig(...))``) on the world's
  ``train.csv``, exactly as ``clipforge train`` would, and loaded back with ``clipforge.load``.
  Findings 2-5 and 7 share one per seed; finding 6 adds other sizes (its ``clip_model`` point is
  the same run when the step counts agree). All train with the scale's recipe (the demo's).
* Their world evaluation (``evaluate_world``), the supervised baselines and image features are
  cached next to them, so each finding can be run alone, in any order, and reruns are cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clipforge.experiments.common import (
    CLASS_TASKS, LoopConfig, SplitData, batched, ensure_world, load_split, load_task_specs, locked,
    log_spaced_steps, read_json, seed_everything, write_json,
)
from clipforge.experiments.config import ExperimentConfig, model_config
from clipforge.utils import resolve_device

EVAL_SPLITS = ("test", "test_heldout", "test_sketch", "test_noise", "test_texture", "test_scale_rotation")
SHIFTED = EVAL_SPLITS[1:]


def class_tasks(world: Path) -> dict[str, dict[str, Any]]:
    return {n: t for n, t in load_task_specs(world).items() if n in CLASS_TASKS}


def clip_run_dir(cfg: ExperimentConfig, seed: int, size: str | None = None, steps: int | None = None) -> Path:
    size, steps = size or cfg.scale.clip_model, steps or cfg.scale.clip_steps
    return cfg.scale_dir / "clip" / f"{size}-{steps}steps-s{seed}"


def clip_model(cfg: ExperimentConfig, seed: int, size: str | None = None, steps: int | None = None
               ) -> tuple[Any, dict[str, Any]]:
    """The trained CLIP of (size, steps, seed), training it through the trainer when not cached.
    Returns (model in eval mode, the trainer's summary)."""
    from clipforge.model import factory

    size, steps = size or cfg.scale.clip_model, steps or cfg.scale.clip_steps
    run = clip_run_dir(cfg, seed, size, steps)
    summary_file = run / "summary.json"
    world = ensure_world(cfg)
    with locked(run.parent / f".{run.name}.lock"):
        if not (summary_file.is_file() and (run / "final").is_dir()):
            _train_clip(cfg, seed, size, steps, run, world)
    model, _ = factory.load(run / "final", device=resolve_device(cfg.device))
    return model, json.loads(summary_file.read_text())


def _train_clip(cfg: ExperimentConfig, seed: int, size: str, steps: int, run: Path, world: Path) -> None:
    from clipforge.model import factory
    from clipforge.data.config import DataConfig
    from clipforge.train.config import OptimConfig, ScheduleConfig, TrainConfig
    from clipforge.train.trainer import train

    scale = cfg.scale
    device = resolve_device(cfg.device)
    tcfg = TrainConfig(
        data=DataConfig(path=str(world / "train.csv"), cache_mb=1024), model=size, out=str(run), steps=steps,
        batch_size=scale.batch_size, workers=0, seed=seed, device=device.type,
        precision=cfg.precision(device.type), crop_scale=scale.crop_scale,  # type: ignore[arg-type]
        save_every=0, keep_last=1, tensorboard=False, log_every=max(1, min(20, steps // 20)),
        optim=OptimConfig(lr=scale.lr, weight_decay=scale.weight_decay, sparse_embeddings=scale.sparse_embeddings),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=min(scale.warmup, max(1, steps // 10))),
    )
    torch.manual_seed(seed)
    model = factory.create_model(model_config(size))
    if cfg.progress:
        print(f"training CLIP {size} for {steps} steps (seed {seed}) -> {run}", flush=True)
    train(tcfg, model=model, progress=cfg.progress)


def clip_world_eval(cfg: ExperimentConfig, seed: int, size: str | None = None, steps: int | None = None,
                    splits: tuple[str, ...] = EVAL_SPLITS) -> dict[str, Any]:
    """``evaluate_world`` of that CLIP (zero-shot per task / split / prompt set), cached as JSON."""
    from clipforge.eval.features import FeatureOptions
    from clipforge.eval.world import WorldEvalConfig, evaluate_world

    run = clip_run_dir(cfg, seed, size, steps)
    cache = run / f"world_eval-{'-'.join(splits)}.json"
    model, summary = clip_model(cfg, seed, size, steps)  # trains first when needed (under its own lock)
    with locked(cache.with_suffix(".lock")):
        if cache.is_file():
            return read_json(cache)
        world = ensure_world(cfg)
        opts = FeatureOptions(batch_size=256, progress=False, workers=0, device=str(resolve_device(cfg.device)))
        res = evaluate_world(model, world, WorldEvalConfig(splits=splits, options=opts))
        out = {"zeroshot": res["zeroshot"], "retrieval": res["retrieval"], "train": summary}
        write_json(cache, out)
    return out


def supervised_model(cfg: ExperimentConfig, seed: int) -> tuple[Any, dict[str, Any]]:
    """The supervised baseline of this seed (same image tower as ``clip_model``), trained when not
    cached; its history holds accuracies on every evaluation split at log-spaced steps."""
    from clipforge.experiments.supervised import SupervisedClassifier

    scale = cfg.scale
    vision = model_config(scale.clip_model).vision
    path = cfg.scale_dir / "supervised" / f"{scale.clip_model}-{scale.supervised_steps}steps-s{seed}"
    world = ensure_world(cfg)
    tasks = class_tasks(world)
    device = str(resolve_device(cfg.device))
    with locked(path.parent / f".{path.name}.lock"):
        if (path / "model.pt").is_file() and (path / "history.json").is_file():
            model = SupervisedClassifier(vision, {t: len(tasks[t]["classes"]) for t in tasks})
            model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
            return model.to(device).eval(), read_json(path / "history.json")
        return _train_supervised(cfg, seed, path, world, tasks, device)


def _train_supervised(cfg: ExperimentConfig, seed: int, path: Path, world: Path, tasks: dict[str, dict[str, Any]],
                      device: str) -> tuple[Any, dict[str, Any]]:
    from clipforge.experiments.supervised import train_supervised

    scale = cfg.scale
    vision = model_config(scale.clip_model).vision
    seed_everything(seed)
    train = load_split(world, "train")
    evals = {s: load_split(world, s) for s in EVAL_SPLITS}
    loop = LoopConfig.from_scale(cfg, scale.supervised_steps, seed, device)
    model, history = train_supervised(vision, train, tasks, loop, evals,
                                      log_spaced_steps(scale.supervised_steps, scale.supervised_evals), cfg.progress)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / "model.pt")
    write_json(path / "history.json", history)  # written last: its presence marks a complete run
    return model.eval(), history


def features(cfg: ExperimentConfig, kind: str, seed: int, split: str) -> tuple[torch.Tensor, SplitData]:
    """Pre-projection image features [N, W] of ``kind`` ('clip' | 'supervised') on a split, cached."""
    world = ensure_world(cfg)
    data = load_split(world, split)
    cache = cfg.scale_dir / "features" / f"{kind}-{cfg.scale.clip_model}-s{seed}-{split}.pt"
    with locked(cache.with_suffix(".lock")):
        if cache.is_file():
            return torch.load(cache, weights_only=True), data
        return _extract(cfg, kind, seed, data, cache), data


def _extract(cfg: ExperimentConfig, kind: str, seed: int, data: SplitData, cache: Path) -> torch.Tensor:
    device = str(resolve_device(cfg.device))
    if kind == "clip":
        model, _ = clip_model(cfg, seed)
        feats = batched(lambda x: model.encode_image(x, project=False), data.images, device)
    elif kind == "supervised":
        model, _ = supervised_model(cfg, seed)
        feats = batched(model.features, data.images, device)
    else:
        raise ValueError(f"unknown feature kind {kind!r}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(cache)  # atomic
    return feats


def fitted_probe(cfg: ExperimentConfig, kind: str, seed: int, name: str, task: dict[str, Any]) -> Any:
    """The paper's linear probe on ``kind`` features for one task: C chosen on val by the parametric
    search, refit on train + val (as ``linear_probe`` does); cached, so finding 4 (scored on test)
    and finding 5 (scored on the shifted splits) share one fit. Returns a ``LogisticModel``."""
    from clipforge.eval.linear_probe import LinearProbeConfig, LogisticModel, fit_logistic, search_c

    cache = cfg.scale_dir / "probes" / f"{kind}-{cfg.scale.clip_model}-s{seed}-{name}.pt"
    with locked(cache.with_suffix(".lock")):
        if cache.is_file():
            return LogisticModel(**torch.load(cache, weights_only=True))
        (xtr, tr), (xva, va) = features(cfg, kind, seed, "train"), features(cfg, kind, seed, "val")
        ytr, yva = tr.labels(task), va.labels(task)
        keep = (ytr >= 0).nonzero().squeeze(1)
        if len(keep) > cfg.scale.probe_max_train:  # a fixed random subset per seed
            order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
            keep = keep[order[: cfg.scale.probe_max_train]]
        vkeep = yva >= 0
        pc = LinearProbeConfig(backend="sklearn", refine_steps=cfg.scale.probe_refine_steps, seed=seed)
        n = len(task["classes"])
        c, _ = search_c(xtr[keep], ytr[keep], xva[vkeep], yva[vkeep], pc, n)
        model = fit_logistic(torch.cat([xtr[keep], xva[vkeep]]), torch.cat([ytr[keep], yva[vkeep]]), c, n, pc)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"weight": model.weight, "bias": model.bias, "classes": model.classes,
                    "num_classes": model.num_classes, "c": model.c}, tmp)
        tmp.replace(cache)
        return model


def probe_accuracy(model: Any, feats: torch.Tensor, data: SplitData, task: dict[str, Any]) -> float | None:
    """Accuracy of a fitted probe on a split's labelled rows (None when the split has none)."""
    y = data.labels(task)
    if not (y >= 0).any():
        return None
    return float((model.predict(feats[y >= 0]) == y[y >= 0]).float().mean())

"""How long the default set of findings takes on two free cores, from CPU-time measurements.

A shared, busy machine makes wall times of the real run meaningless (other jobs take the cores),
but the CPU time one single-threaded process spends on a unit of work depends far less on it (it
still grows somewhat when other jobs share the caches, so these figures lean high).
This script measures, single-threaded, the CPU seconds of each unit the findings are made of
(a training step of each model through its real code path, an evaluation, a probe), multiplies by
how many of each the scale runs, and writes ``results/budget.json``:

    python benchmarks/paper/budget.py [--scale small] [--work runs/paper]

It needs the scale's world (any finding generates it) and, for the probe costs, the features of
seed 0's CLIP (``clipforge experiment fewshot`` leaves them). Not counted: generating the world
(about a minute on two cores) and process start-up. Estimates, labelled as such; ``--reuse``
recomputes them from the stored unit costs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from clipforge.experiments import ExperimentConfig, get_scale  # noqa: E402
from clipforge.experiments.common import (  # noqa: E402
    CLASS_TASKS, LoopConfig, batched, environment, fit, load_split, load_task_specs, write_json,
)
from clipforge.experiments.config import model_config  # noqa: E402


def cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def trainer_step(cfg: ExperimentConfig, size: str, world: Path) -> float:
    """CPU seconds per step of the library's trainer (12-step minus 4-step run: no fixed costs)."""
    import clipforge
    from clipforge.data.config import DataConfig
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train

    def run(steps: int) -> None:
        tc = TrainConfig(data=DataConfig(path=str(world / "train.csv")), model=size, steps=steps, workers=0,
                         batch_size=cfg.scale.batch_size, device="cpu", precision="fp32", save_every=0,
                         tensorboard=False, out=f"/tmp/clipforge-budget/{size}-{steps}")
        train(tc, model=clipforge.create_model(model_config(size)), progress=False)

    return (cpu(lambda: run(12)) - cpu(lambda: run(4))) / 8


def loop_step(make, images: torch.Tensor, scale) -> float:
    """CPU seconds per step of the baselines' loop (same differencing)."""
    def run(steps: int) -> None:
        model, loss = make()
        fit(model, loss, images, LoopConfig(steps=steps, batch_size=scale.batch_size, lr=1e-3, weight_decay=0.1,
                                           warmup=1))
    return (cpu(lambda: run(10)) - cpu(lambda: run(4))) / 6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="small")
    p.add_argument("--work", default="runs/paper")
    p.add_argument("--out", default="benchmarks/paper/results")
    p.add_argument("--reuse", action="store_true", help="recompute the estimate from budget.json's unit costs")
    args = p.parse_args()
    s = get_scale(args.scale)
    if args.reuse:
        import json

        path = Path(args.out) / "budget.json"
        rec = json.loads(path.read_text())
        tasks = load_task_specs(ExperimentConfig(scale=s, work=Path(args.work)).scale_dir / "world")
        rec["estimate"] = estimate(rec["unit_cpu_s"], s, len([t for t in tasks if t in CLASS_TASKS]))
        write_json(path, rec)
        report(rec["estimate"])
        return
    import clipforge
    from clipforge.eval.features import FeatureOptions
    from clipforge.eval.fewshot import few_shot
    from clipforge.eval.linear_probe import LinearProbeConfig, linear_probe
    from clipforge.eval.world import WorldEvalConfig, evaluate_world
    from clipforge.experiments import f1_objectives
    from clipforge.experiments.objectives import KINDS, Vocab, build_objective
    from clipforge.experiments.shared import EVAL_SPLITS, features
    from clipforge.experiments.supervised import SupervisedClassifier, supervised_loss

    cfg = ExperimentConfig(scale=s, work=Path(args.work), device="cpu", progress=False)
    world = cfg.scale_dir / "world"
    tasks = {n: t for n, t in load_task_specs(world).items() if n in CLASS_TASKS}
    train = load_split(world, "train")
    test = load_split(world, "test", limit=s.objectives_eval_images)
    unit: dict[str, float] = {}
    for size in sorted({s.clip_model, *s.scaling_models}):
        unit[f"trainer_step_{size}"] = trainer_step(cfg, size, world)
    vocab = Vocab.from_texts(train.captions)
    arch = model_config(s.objectives_model)
    for kind in KINDS:
        def make(kind: str = kind):
            obj = build_objective(kind, arch, train.captions, vocab)  # type: ignore[arg-type]
            return obj.model, obj.loss
        unit[f"objective_step_{kind}"] = loop_step(make, train.images, s)
        obj = build_objective(kind, arch, train.captions, vocab)  # type: ignore[arg-type]
        unit[f"objective_eval_{kind}"] = cpu(lambda: f1_objectives.zero_shot(obj, test, tasks, torch.device("cpu")))
    labels = {t: train.labels(tasks[t]) for t in tasks}

    def make_sup():
        m = SupervisedClassifier(model_config(s.clip_model).vision, {t: len(tasks[t]["classes"]) for t in tasks})
        return m, supervised_loss(m, labels)
    unit["supervised_step"] = loop_step(make_sup, train.images, s)
    sup, _ = make_sup()
    from clipforge.experiments.supervised import accuracies
    evals = {sp: load_split(world, sp) for sp in EVAL_SPLITS}
    unit["supervised_eval"] = cpu(lambda: [accuracies(sup, d, tasks, "cpu") for d in evals.values()])
    opts = FeatureOptions(batch_size=256, progress=False, workers=0)
    for size, splits in ((s.clip_model, EVAL_SPLITS), (s.clip_model, ("test",))):
        m = clipforge.create_model(model_config(size))
        unit[f"world_eval_{len(splits)}_splits"] = cpu(
            lambda: evaluate_world(m, world, WorldEvalConfig(splits=splits, options=opts)))
    tower = clipforge.create_model(model_config(s.clip_model)).eval()
    unit["features_all_splits"] = cpu(lambda: [batched(lambda x: tower.encode_image(x, project=False),
                                                       load_split(world, sp).images, "cpu")
                                               for sp in ("train", "val", *EVAL_SPLITS)])
    (xtr, tr), (xva, va), (xte, te) = (features(cfg, "clip", 0, sp) for sp in ("train", "val", "test"))
    probe_cfg = LinearProbeConfig(backend="sklearn", refine_steps=s.probe_refine_steps)
    per_task_fs, per_task_lp = [], []
    for t in tasks.values():
        ytr, yva, yte = tr.labels(t), va.labels(t), te.labels(t)
        per_task_fs.append(cpu(lambda: few_shot(xtr[ytr >= 0], ytr[ytr >= 0], xte[yte >= 0], yte[yte >= 0],
                                                shots=list(s.shots), draws=s.fewshot_draws, config=probe_cfg)))
        per_task_lp.append(cpu(lambda: linear_probe(xtr[ytr >= 0], ytr[ytr >= 0], xte[yte >= 0], yte[yte >= 0],
                                                    probe_cfg, val_features=xva[yva >= 0], val_labels=yva[yva >= 0])))
    unit["fewshot_per_task"] = float(np.mean(per_task_fs))
    unit["linear_probe_per_task"] = float(np.mean(per_task_lp))

    est = estimate(unit, s, len(tasks))
    rec = {"what": "estimated cost of the default findings from single-threaded CPU-time measurements",
           "scale": s.name, "environment": environment(), "unit_cpu_s": unit, "estimate": est,
           "command": f"python benchmarks/paper/budget.py --scale {s.name}"}
    write_json(Path(args.out) / "budget.json", rec)
    for k, v in unit.items():
        print(f"{k:32s} {v:8.3f} s")
    report(est)


def estimate(unit: dict[str, float], s, nt: int) -> dict:
    """Minutes of single-core CPU per finding from the unit costs, and the wall time of
    ``clipforge experiment all`` on two free cores (two single-threaded streams, see STREAMS)."""
    from clipforge.experiments.objectives import KINDS

    n, w = s.seeds, s.world
    f_ref = (w.train + w.val + w.test) / (w.train + w.val + w.test + 5 * w.shifted)  # share of the images
    clip_train = n * (s.clip_steps * unit[f"trainer_step_{s.clip_model}"] + unit["world_eval_6_splits"])
    minutes = {
        "objectives": sum(n * (s.objectives_steps * unit[f"objective_step_{k}"]
                               + s.objectives_evals * unit[f"objective_eval_{k}"]) for k in KINDS),
        "prompts": clip_train,
        "fewshot": n * (unit["features_all_splits"] * f_ref + nt * unit["fewshot_per_task"]),
        "probe": n * (s.supervised_steps * unit["supervised_step"] + s.supervised_evals * unit["supervised_eval"]
                      + unit["features_all_splits"] * f_ref + 2 * (nt + 1) * unit["linear_probe_per_task"]),
        "robustness": n * unit["features_all_splits"] * (1 - f_ref),  # shifted splits; probes are reused
        "scaling": n * sum(s.scaling_steps * unit[f"trainer_step_{m}"] + unit["world_eval_1_splits"]
                           for m in s.scaling_models if m != s.clip_model) + n * unit["world_eval_1_splits"],
    }
    minutes = {k: v / 60 for k, v in minutes.items()}
    from clipforge.experiments import STREAMS

    streams = [sum(minutes[f] for f in stream) for stream in STREAMS]
    return {"single_core_cpu_min": {**minutes, "total": sum(minutes.values())},
            "streams": {" + ".join(st): m for st, m in zip(STREAMS, streams)},
            "two_streams_wall_min": max(streams), "one_stream_wall_min": sum(minutes.values())}


def report(est: dict) -> None:
    for k, v in est["single_core_cpu_min"].items():
        print(f"{k:12s} {v:6.1f} CPU-min")
    print(f"clipforge experiment all on 2 free cores (two single-threaded jobs): "
          f"~{est['two_streams_wall_min']:.0f} min")


if __name__ == "__main__":
    main()

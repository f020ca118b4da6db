"""``clipforge eval {zeroshot,linear-probe,retrieval,robustness,report}``: the paper's evaluations.

Each action writes one JSON result (``dataset``, ``model``, ``task``, ``metrics``, ``details``,
options, versions, command); ``eval report DIR`` aggregates a folder of them into Markdown,
CSV and an HTML page with plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="checkpoint: anything clipforge.load accepts")
        p.add_argument("--arch", default=None, help="architecture name for state dicts that do not reveal it")
    p.add_argument("--out", required=True, type=Path, help="result JSON file")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache image features here (keyed by model, images and options)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dataset-name", default=None, help="name recorded in the result (default: from the path)")


def _labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", default=None,
                   help="class names: a file (one per line) or a built-in set (imagenet, cifar10, cifar100); "
                        "a folder of class sub-folders needs none")
    p.add_argument("--label-key", default=None, help="label column of a CSV/Parquet table (default: label)")
    p.add_argument("--image-key", default="image", help="image-path column of a table (default: image)")
    p.add_argument("--task", default=None,
                   help="a data-world task: its JSON file, or a name looked up in tasks/ beside the data; "
                        "supplies the label column, class names and templates")


def _templates(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", default=None,
                   help="prompt templates: a file (one per line, {} for the class name) or a built-in set; "
                        "default: the --classes built-in set's, else 'a photo of a {}.'")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="zero-shot, linear-probe, retrieval and robustness evaluation",
                            description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("zeroshot", help="zero-shot classification with prompt ensembling",
                           description="Zero-shot top-1/top-5, mean per-class recall, confusion matrix and "
                                       "per-template accuracy.")
    _common(p)
    p.add_argument("--data", required=True, type=Path, help="a folder of class sub-folders or a CSV/TSV/Parquet table")
    _labels(p)
    _templates(p)
    p.set_defaults(func=run_zeroshot)

    p = actions.add_parser("linear-probe", help="logistic-regression probe (or k-shot) on frozen image features",
                           description="The paper's linear probe: L-BFGS logistic regression, C chosen on a "
                                       "validation split, refit on train+val. With --shots: k-shot probes.")
    _common(p)
    p.add_argument("--train", required=True, type=Path, help="labelled training images (folder or table)")
    p.add_argument("--test", required=True, type=Path, help="labelled test images (folder or table)")
    p.add_argument("--val", type=Path, default=None, help="validation images (default: a split of --train)")
    _labels(p)
    p.add_argument("--features", choices=["post", "pre"], default="post",
                   help="image features after (post) or before (pre) the projection (default post)")
    p.add_argument("--backend", choices=["auto", "sklearn", "torch"], default="auto",
                   help="auto: torch (GPU L-BFGS) when CUDA is available, else scikit-learn")
    p.add_argument("--shots", type=int, nargs="+", default=None, metavar="K", help="k-shot probes, e.g. 1 2 4 8 16")
    p.add_argument("--draws", type=int, default=5, help="random draws per k (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zeroshot", action="store_true",
                   help="also compute zero-shot accuracy on --test (drawn as a line on the few-shot plot)")
    _templates(p)
    p.add_argument("--plot", type=Path, default=None, help="few-shot plot PNG (default: next to --out)")
    p.set_defaults(func=run_linear_probe)

    p = actions.add_parser("retrieval", help="image<->text recall@K with several captions per image",
                           description="Recall@K both ways (CLIP_benchmark naming: image_retrieval = text->image, "
                                       "text_retrieval = image->text), mean and median rank.")
    _common(p)
    p.add_argument("--data", required=True, type=Path, help="CSV/TSV/Parquet with image and caption columns")
    p.add_argument("--image-key", default="image")
    p.add_argument("--caption-key", default="caption")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K")
    p.add_argument("--chunk-size", type=int, default=512, help="queries per similarity block (memory bound)")
    p.set_defaults(func=run_retrieval)

    p = actions.add_parser("robustness", help="one zero-shot classifier on a reference set and shifted sets",
                           description="Accuracy on each shifted set, its drop from the reference and, with "
                                       "--baseline, effective robustness (Taori et al. 2020).")
    _common(p)
    p.add_argument("--reference", required=True, type=Path, help="reference labelled images")
    p.add_argument("--shifted", required=True, type=Path, nargs="+", help="shifted labelled image sets, same labels")
    _labels(p)
    _templates(p)
    p.add_argument("--baseline", type=Path, default=None,
                   help="JSON: {shifted name: [[ref_acc, shifted_acc], ...] or {slope, intercept}} (logit space)")
    p.set_defaults(func=run_robustness)

    p = actions.add_parser("report", help="aggregate a folder of result JSONs into Markdown/CSV/HTML",
                           description="Tables per task (report.md, report.csv) and an HTML page with plots.")
    p.add_argument("dir", type=Path, help="folder of result JSON files (searched recursively)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: DIR)")
    p.set_defaults(func=run_report)


# -- helpers ------------------------------------------------------------------------------


def _feature_options(args: argparse.Namespace, project: bool = True) -> Any:
    from clipforge.eval.features import FeatureOptions

    return FeatureOptions(batch_size=args.batch_size, device=args.device, precision=args.precision,
                          workers=args.workers, project=project, cache_dir=args.cache_dir,
                          progress=not args.no_progress)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import clipforge

    return clipforge.load(args.model, arch=args.arch)


def _apply_task(args: argparse.Namespace, data: Path) -> None:
    """Fill label column, class names and templates from ``--task`` (explicit flags win)."""
    args.task_info = None
    if args.task:
        from clipforge.eval.templates import load_task

        path = Path(args.task)
        if not path.is_file():
            path = (data if data.is_dir() else data.parent) / "tasks" / f"{args.task}.json"
        args.task_info = load_task(path)
        args.label_key = args.label_key or args.task_info["label_column"]
    args.label_key = args.label_key or "label"


def _classnames(args: argparse.Namespace) -> list[str] | None:
    from clipforge.eval.templates import load_classnames

    if args.classes:
        return load_classnames(args.classes)
    return list(args.task_info["classes"]) if args.task_info else None


def _templates_for(args: argparse.Namespace) -> list[str]:
    from clipforge.eval.templates import BUILTIN_SETS, DEFAULT_TEMPLATES, load_templates

    if args.templates:
        return load_templates(args.templates)
    if args.task_info:
        return list(args.task_info["templates"])
    if args.classes in BUILTIN_SETS and not Path(args.classes).exists():
        return load_templates(args.classes)
    return list(DEFAULT_TEMPLATES)


def _dataset_name(args: argparse.Namespace, path: Path) -> str:
    """The file or folder name plus the task or label column, e.g. 'test (shape)'."""
    name = path.name if path.is_dir() else path.stem
    if args.task_info or (not path.is_dir() and args.label_key != "label"):
        name += f" ({args.task_info.get('name', args.label_key) if args.task_info else args.label_key})"
    return name


def _load(args: argparse.Namespace, path: Path, classnames: list[str] | None, name: str | None = None) -> Any:
    from clipforge.eval.datasets import load_labelled

    name = name or _dataset_name(args, path)
    return load_labelled(path, classnames, image_key=args.image_key, label_key=args.label_key, name=name)


def _unique_names(paths: list[Path]) -> list[str]:
    """Dataset names from paths: the stem, or parent/stem where stems collide (split/labels.csv)."""
    stems = [p.stem if p.is_file() else p.name for p in paths]
    return [f"{p.parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]


def _options_record(args: argparse.Namespace) -> dict[str, Any]:
    skip = ("func", "task_info")
    return {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items() if k not in skip}


def _command_line(args: argparse.Namespace) -> list[str]:
    """The parsed command, rebuilt as a replayable command line (also right when called in-process)."""
    words = ["clipforge", "eval", args.action]
    for key, value in vars(args).items():
        if key in ("func", "command", "action", "task_info") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            words += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return words


def _finish(args: argparse.Namespace, task: str, dataset: str, out: dict[str, Any]) -> int:
    from clipforge.eval.report import make_result, write_result

    result = make_result(task, str(args.model), dataset, out["metrics"], out.get("details"), _options_record(args),
                         _command_line(args))
    write_result(result, args.out)
    shown = {k: v for k, v in out["metrics"].items() if isinstance(v, float)}
    print(" ".join(f"{k}={v:.4f}" for k, v in list(shown.items())[:8]) + f"  -> {args.out}")
    return 0


# -- actions ------------------------------------------------------------------------------


def run_zeroshot(args: argparse.Namespace) -> int:
    from clipforge.eval.zeroshot import evaluate_zeroshot

    _apply_task(args, args.data)
    data = _load(args, args.data, _classnames(args), args.dataset_name)
    model, preprocess = _load_model(args)
    out = evaluate_zeroshot(model, data, data.classnames, _templates_for(args), _feature_options(args), preprocess)
    if data.skipped_rows:
        out["metrics"]["num_skipped_rows"] = data.skipped_rows
    return _finish(args, "zeroshot_classification", data.name, out)


def run_linear_probe(args: argparse.Namespace) -> int:
    import torch

    from clipforge.errors import DataError
    from clipforge.eval.features import extract_image_features
    from clipforge.eval.fewshot import few_shot
    from clipforge.eval.linear_probe import LinearProbeConfig, linear_probe
    from clipforge.eval.report import plot_few_shot
    from clipforge.eval.zeroshot import evaluate_zeroshot

    _apply_task(args, args.train)
    train = _load(args, args.train, _classnames(args))
    classnames = train.classnames  # test/val labels map through train's classes
    test = _load(args, args.test, classnames, args.dataset_name)
    val = _load(args, args.val, classnames) if args.val else None
    model, preprocess = _load_model(args)
    options = _feature_options(args, project=args.features == "post")

    def features(data: Any, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        f = extract_image_features(model, data.paths, preprocess, options, desc=f"{desc} features")
        if f.features.shape[0] == 0:
            raise DataError(f"{data.name}: none of the {len(data)} images could be read")
        return f.features, torch.tensor(data.labels, dtype=torch.long)[f.index]

    x, y = features(train, "train")
    tx, ty = features(test, "test")
    vx, vy = features(val, "val") if val is not None else (None, None)
    num_classes = max(train.num_classes, test.num_classes, val.num_classes if val is not None else 0)
    config = LinearProbeConfig(backend=args.backend, seed=args.seed, device=args.device)
    zeroshot_acc = None
    if args.zeroshot:
        if not classnames:
            raise DataError("--zeroshot needs class names (class folders, name labels or --classes)")
        zs = evaluate_zeroshot(model, test, classnames, _templates_for(args), _feature_options(args), preprocess)
        zeroshot_acc = zs["metrics"]["acc1"]
    if args.shots:
        if val is not None:  # k-shot draws come from train; a given val set joins the pool
            x, y = torch.cat([x, vx]), torch.cat([y, vy])
        out = few_shot(x, y, tx, ty, args.shots, args.draws, config, num_classes, args.seed)
        plot = args.plot or args.out.with_suffix(".png")
        plot_few_shot(out["details"]["shots"], zeroshot_acc, plot, f"{args.model} on {test.name}")
        out["details"]["plot"] = str(plot)
        task = "few_shot"
    else:
        out = linear_probe(x, y, tx, ty, config, vx, vy, num_classes)
        task = "linear_probe"
    if zeroshot_acc is not None:
        out["metrics"]["zeroshot_acc1"] = zeroshot_acc
    out["details"]["features"] = args.features
    return _finish(args, task, test.name, out)


def run_retrieval(args: argparse.Namespace) -> int:
    from clipforge.eval.datasets import load_captions
    from clipforge.eval.retrieval import evaluate_retrieval

    data = load_captions(args.data, args.image_key, args.caption_key, args.dataset_name)
    model, preprocess = _load_model(args)
    out = evaluate_retrieval(model, data, _feature_options(args), preprocess, ks=args.recall_k,
                             chunk_size=args.chunk_size)
    if data.skipped_rows:
        out["metrics"]["num_skipped_rows"] = data.skipped_rows
    return _finish(args, "zeroshot_retrieval", data.name, out)


def _baselines(path: Path | None) -> dict[str, Any] | None:
    import json

    from clipforge.errors import DataError
    from clipforge.eval.robustness import BaselineFit, fit_baseline

    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
        return {name: BaselineFit(float(v["slope"]), float(v["intercept"])) if isinstance(v, dict)
                else fit_baseline([(float(r), float(s)) for r, s in v]) for name, v in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataError(f"{path}: not a baseline file ({{name: [[ref, shifted], ...] or {{slope, intercept}}}}): {e}")


def run_robustness(args: argparse.Namespace) -> int:
    from clipforge.eval.robustness import evaluate_robustness

    _apply_task(args, args.reference)
    names = _unique_names([args.reference, *args.shifted])  # plain names: they prefix metric keys
    reference = _load(args, args.reference, _classnames(args), names[0])
    shifted = [_load(args, p, reference.classnames, n) for p, n in zip(args.shifted, names[1:])]
    model, preprocess = _load_model(args)
    out = evaluate_robustness(model, reference, shifted, reference.classnames, _templates_for(args),
                              _feature_options(args), preprocess, baselines=_baselines(args.baseline))
    return _finish(args, "robustness", args.dataset_name or _dataset_name(args, args.reference), out)


def run_report(args: argparse.Namespace) -> int:
    from clipforge.eval.report import write_report

    paths = write_report(args.dir, args.out)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0

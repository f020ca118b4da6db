"""``clipforge eval {zeroshot,linear-probe,retrieval,robustness,report}``: the paper's evaluations.

Each action writes one JSON result (``dataset``, ``model``, ``task``, ``metrics``, ``details``,
options, versions, command); ``eval report DIR`` aggregates a folder of them into Markdown,
CSV and an HTML page with plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from clipforge.cli.convert import HELP_TEXT_MODEL_DIR


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="checkpoint path or pretrained name: anything clipforge.load accepts")
        p.add_argument("--arch", default=None, help="architecture name for state dicts that do not reveal it")
        p.add_argument("--text-model-dir", default=None, metavar="DIR", help=HELP_TEXT_MODEL_DIR)
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


# -- flags to configs ----------------------------------------------------------------------


def _feature_options(args: argparse.Namespace, project: bool = True) -> Any:
    from clipforge.eval.features import FeatureOptions

    return FeatureOptions(batch_size=args.batch_size, device=args.device, precision=args.precision,
                          workers=args.workers, project=project, cache_dir=args.cache_dir,
                          progress=not args.no_progress)


def _labelling(args: argparse.Namespace, data: Path) -> Any:
    """The label flags (``--task``, ``--label-key``, ``--classes``, ...) resolved against ``data``."""
    from clipforge.eval.inputs import LabelOptions, resolve_labels

    options = LabelOptions(classes=args.classes, label_key=args.label_key, image_key=args.image_key,
                           task=args.task, templates=args.templates)
    return resolve_labels(options, data)


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    import clipforge

    return clipforge.load(args.model, arch=args.arch, text_model_dir=args.text_model_dir)


# -- the result record --------------------------------------------------------------------


def _settings(args: argparse.Namespace, labels: Any = None) -> dict[str, Any]:
    """The parsed flags with the label column as resolved (``--task`` may supply it)."""
    settings = dict(vars(args))
    if labels is not None:
        settings["label_key"] = labels.label_key
    return settings


def _options_record(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
            for k, v in settings.items() if k != "func"}


def _command_line(settings: dict[str, Any]) -> list[str]:
    """The parsed command, rebuilt as a replayable command line (also right when called in-process)."""
    words = ["clipforge", "eval", settings["action"]]
    for key, value in settings.items():
        if key in ("func", "command", "action") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        else:
            words += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    return words


def _finish(args: argparse.Namespace, task: str, dataset: str, out: dict[str, Any], labels: Any = None) -> int:
    from clipforge.eval.report import make_result, write_result

    settings = _settings(args, labels)
    result = make_result(task, str(args.model), dataset, out["metrics"], out.get("details"),
                         _options_record(settings), _command_line(settings))
    write_result(result, args.out)
    _update_card(Path(str(args.model)), result)
    shown = {k: v for k, v in out["metrics"].items() if isinstance(v, float)}
    print(" ".join(f"{k}={v:.4f}" for k, v in list(shown.items())[:8]) + f"  -> {args.out}")
    return 0


def _update_card(model_dir: Path, result: dict[str, Any]) -> None:
    """A clipforge model directory's card gains this result (a pretrained name has no card here)."""
    from clipforge.config import ClipConfig
    from clipforge.model.card import add_result
    from clipforge.model.checkpoints import CONFIG_NAME, is_own_format

    if is_own_format(model_dir):
        try:
            add_result(model_dir, ClipConfig.from_json(model_dir / CONFIG_NAME), result)
        except OSError as e:  # a read-only model directory: the result file is what was asked for
            print(f"note: model card not updated ({e})")


def _with_skipped_rows(out: dict[str, Any], data: Any) -> dict[str, Any]:
    if data.skipped_rows:
        out["metrics"]["num_skipped_rows"] = data.skipped_rows
    return out


# -- actions ------------------------------------------------------------------------------


def run_zeroshot(args: argparse.Namespace) -> int:
    from clipforge.eval.zeroshot import evaluate_zeroshot

    labels = _labelling(args, args.data)
    data = labels.load(args.data, labels.classnames(), args.dataset_name)
    model, preprocess = _load_model(args)
    out = evaluate_zeroshot(model, data, data.classnames, labels.templates(), _feature_options(args), preprocess)
    return _finish(args, "zeroshot_classification", data.name, _with_skipped_rows(out, data), labels)


def run_linear_probe(args: argparse.Namespace) -> int:
    from clipforge.cli import CliError
    from clipforge.eval.linear_probe import LinearProbeConfig
    from clipforge.eval.probes import evaluate_few_shot, evaluate_linear_probe

    labels = _labelling(args, args.train)
    train = labels.load(args.train, labels.classnames())
    classnames = train.classnames  # test/val labels map through train's classes
    test = labels.load(args.test, classnames, args.dataset_name)
    val = labels.load(args.val, classnames) if args.val else None
    if args.zeroshot and not classnames:
        raise CliError("--zeroshot needs class names (class folders, name labels or --classes)")
    model, preprocess = _load_model(args)
    options = _feature_options(args, project=args.features == "post")
    config = LinearProbeConfig(backend=args.backend, seed=args.seed, device=args.device)
    templates = labels.templates() if args.zeroshot else None
    if args.shots:
        plot = args.plot or args.out.with_suffix(".png")
        out = evaluate_few_shot(model, train, test, val, args.shots, args.draws, config, options, preprocess,
                                zeroshot_templates=templates, plot=plot, title=f"{args.model} on {test.name}")
        task = "few_shot"
    else:
        out = evaluate_linear_probe(model, train, test, val, config, options, preprocess, zeroshot_templates=templates)
        task = "linear_probe"
    return _finish(args, task, test.name, out, labels)


def run_retrieval(args: argparse.Namespace) -> int:
    from clipforge.eval.datasets import load_captions
    from clipforge.eval.retrieval import evaluate_retrieval

    data = load_captions(args.data, args.image_key, args.caption_key, args.dataset_name)
    model, preprocess = _load_model(args)
    out = evaluate_retrieval(model, data, _feature_options(args), preprocess, ks=args.recall_k,
                             chunk_size=args.chunk_size)
    return _finish(args, "zeroshot_retrieval", data.name, _with_skipped_rows(out, data))


def run_robustness(args: argparse.Namespace) -> int:
    from clipforge.eval.inputs import load_baselines, unique_names
    from clipforge.eval.robustness import evaluate_robustness

    labels = _labelling(args, args.reference)
    names = unique_names([args.reference, *args.shifted])  # plain names: they prefix metric keys
    reference = labels.load(args.reference, labels.classnames(), names[0])
    shifted = [labels.load(p, reference.classnames, n) for p, n in zip(args.shifted, names[1:])]
    model, preprocess = _load_model(args)
    templates = labels.templates()
    baselines = load_baselines(args.baseline) if args.baseline is not None else None
    out = evaluate_robustness(model, reference, shifted, reference.classnames, templates,
                              _feature_options(args), preprocess, baselines=baselines)
    return _finish(args, "robustness", args.dataset_name or labels.dataset_name(args.reference), out, labels)


def run_report(args: argparse.Namespace) -> int:
    from clipforge.eval.report import write_report

    paths = write_report(args.dir, args.out)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0

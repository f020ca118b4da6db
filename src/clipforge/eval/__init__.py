"""Evaluation: zero-shot classification, linear probes, few-shot, retrieval, robustness, reports.

    import clipforge
    from clipforge.eval import build_zeroshot_classifier, evaluate_zeroshot, load_labelled, load_templates

    model, preprocess = clipforge.load("model_dir")
    data = load_labelled("images/")                       # one sub-folder per class
    templates = load_templates("imagenet")                # the paper's 80 prompts (or a file)
    W = build_zeroshot_classifier(model, data.classnames, templates, device="cpu")  # [E, C]
    result = evaluate_zeroshot(model, data, data.classnames, templates)
    result["metrics"]["acc1"], result["details"]["per_template"]

Every ``evaluate_*`` returns ``{"metrics": {scalars}, "details": {...}}``, which
``report.make_result`` turns into the JSON record the CLI writes. Names are imported on first
use, so ``import clipforge.eval`` loads neither scikit-learn nor matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "metrics": [
        "target_rank", "topk_accuracy", "confusion_matrix", "per_class_recall", "mean_per_class_recall",
        "classification_metrics", "retrieval_metrics",
    ],
    "datasets": ["LabelledImages", "CaptionedImages", "load_labelled", "load_captions"],
    "features": ["FeatureOptions", "ImageFeatures", "extract_image_features", "extract_text_features"],
    "templates": ["load_classnames", "load_templates", "load_task", "list_builtin"],
    "zeroshot": [
        "prompt_embeddings", "ensemble_prompts", "build_zeroshot_classifier", "zeroshot_logits",
        "zeroshot_metrics", "evaluate_zeroshot",
    ],
    # The function ``linear_probe`` shares its module's name, so it is imported from the module:
    # ``from clipforge.eval.linear_probe import linear_probe``.
    "linear_probe": ["LinearProbeConfig", "LogisticModel", "fit_logistic", "search_c"],
    "fewshot": ["sample_few_shot", "few_shot"],
    "retrieval": ["evaluate_retrieval"],
    "robustness": ["BaselineFit", "fit_baseline", "effective_robustness", "robustness_summary", "evaluate_robustness"],
    "probes": ["probe_features", "evaluate_linear_probe", "evaluate_few_shot"],
    "inputs": ["LabelOptions", "Labelling", "find_task", "resolve_labels", "unique_names", "load_baselines"],
    "report": ["make_result", "write_result", "load_results", "write_report", "plot_few_shot", "plot_per_template"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'clipforge.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"clipforge.eval.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

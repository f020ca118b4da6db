"""Robustness to distribution shift: one zero-shot classifier on a reference set and shifted sets.

For each shifted set: accuracy, the drop from the reference accuracy, and the *effective
robustness* of Taori et al. (2020), used in the CLIP paper: the shifted accuracy above what a
baseline family of models with the same reference accuracy achieves. The baseline is a linear
fit in logit space, ``logit(shift) = slope * logit(ref) + intercept``, fitted to the (reference,
shifted) accuracies of baseline models (:func:`fit_baseline`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from clipforge.errors import DataError
from clipforge.eval import metrics
from clipforge.eval.datasets import LabelledImages
from clipforge.eval.features import FeatureOptions, Tokenizer, extract_image_features
from clipforge.eval.zeroshot import Template, _model_scale, ensemble_prompts, prompt_embeddings, zeroshot_logits

__all__ = ["BaselineFit", "fit_baseline", "effective_robustness", "robustness_summary", "evaluate_robustness"]

_EPS = 1e-6  # keeps logit() finite at 0% and 100%


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class BaselineFit:
    """``logit(shifted acc) = slope * logit(reference acc) + intercept``."""

    slope: float
    intercept: float

    def predict(self, reference_acc: float) -> float:
        return 1.0 / (1.0 + math.exp(-(self.slope * _logit(reference_acc) + self.intercept)))


def fit_baseline(points: Sequence[tuple[float, float]]) -> BaselineFit:
    """Least-squares line in logit space through baseline models' (reference acc, shifted acc)."""
    if len(points) < 2:
        raise DataError("a robustness baseline needs at least two (reference, shifted) accuracy pairs")
    x = np.array([_logit(r) for r, _ in points])
    y = np.array([_logit(s) for _, s in points])
    slope, intercept = np.polyfit(x, y, 1)
    return BaselineFit(float(slope), float(intercept))


def effective_robustness(reference_acc: float, shifted_acc: float, baseline: BaselineFit) -> float:
    """Shifted accuracy minus the baseline's prediction at the same reference accuracy."""
    return shifted_acc - baseline.predict(reference_acc)


def robustness_summary(
    reference_acc: float,
    shifted_accs: Mapping[str, float],
    baselines: Mapping[str, BaselineFit] | None = None,
) -> dict[str, float]:
    """Flat metrics: per shifted set ``<name>_acc1``, ``<name>_drop`` (reference - shifted) and, when
    it has a baseline, ``<name>_effective_robustness``; plus their means over the shifted sets."""
    out: dict[str, float] = {"reference_acc1": reference_acc}
    drops, ers = [], []
    for name, acc in shifted_accs.items():
        out[f"{name}_acc1"] = acc
        out[f"{name}_drop"] = reference_acc - acc
        drops.append(reference_acc - acc)
        if baselines and name in baselines:
            out[f"{name}_effective_robustness"] = effective_robustness(reference_acc, acc, baselines[name])
            ers.append(out[f"{name}_effective_robustness"])
    if shifted_accs:
        out["mean_shifted_acc1"] = float(np.mean(list(shifted_accs.values())))
        out["mean_drop"] = float(np.mean(drops))
    if ers:
        out["mean_effective_robustness"] = float(np.mean(ers))
    return out


def evaluate_robustness(
    model: nn.Module,
    reference: LabelledImages,
    shifted: Sequence[LabelledImages],
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] = ("a photo of a {}.",),
    options: FeatureOptions = FeatureOptions(),
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Tokenizer | None = None,
    baselines: Mapping[str, BaselineFit] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of one classifier on ``reference`` and each ``shifted`` set (same labels)."""
    classnames = list(classnames) if classnames is not None else reference.classnames
    if not classnames:
        raise DataError(f"{reference.name}: labels are indices; class names are needed (a classes file)")
    names = [d.name for d in shifted]
    if len(set(names + [reference.name])) != len(names) + 1:
        raise DataError(f"datasets need distinct names, got {reference.name!r} and {names}")
    text_options = replace(options, batch_size=max(options.batch_size, 256), progress=False)
    classifier = ensemble_prompts(prompt_embeddings(model, classnames, templates, text_options, tokenizer))  # [E, C]
    scale = _model_scale(model)
    per_set: dict[str, dict[str, Any]] = {}
    for data in [reference, *shifted]:
        if data.num_classes > len(classnames):
            raise DataError(f"{data.name}: labels go up to {data.num_classes - 1} but {len(classnames)} class names")
        feats = extract_image_features(model, data.paths, preprocess, replace(options, project=True), desc=data.name)
        if feats.features.shape[0] == 0:
            raise DataError(f"{data.name}: none of the {len(data)} images could be read")
        labels = torch.tensor(data.labels, dtype=torch.long)[feats.index]
        m = metrics.classification_metrics(zeroshot_logits(feats.features, classifier, scale), labels, len(classnames))
        per_set[data.name] = {k: v for k, v in m.items() if k != "confusion_matrix"} | {
            "num_failed_images": feats.num_failed
        }
    ref_acc = per_set[reference.name]["acc1"]
    scalars = robustness_summary(ref_acc, {n: per_set[n]["acc1"] for n in names}, baselines)
    return {"metrics": scalars, "details": {"reference": reference.name, "datasets": per_set}}

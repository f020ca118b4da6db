"""Zero-shot classification with prompt ensembling, as in the CLIP paper.

Every template is filled with every class name and encoded; the text embeddings are
L2-normalised, averaged over templates and renormalised, giving one unit vector per class.
An image's logits are ``scale * cosine(image, class)``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import DataError
from clipforge.eval import metrics
from clipforge.eval.datasets import LabelledImages
from clipforge.eval.features import FeatureOptions, Tokenizer, extract_image_features, extract_text_features
from clipforge.eval.templates import fill

__all__ = [
    "prompt_embeddings",
    "ensemble_prompts",
    "build_zeroshot_classifier",
    "zeroshot_logits",
    "zeroshot_metrics",
    "evaluate_zeroshot",
]

Template = str | Callable[[str], str]


def _prompt(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else fill(template, classname)


def prompt_embeddings(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[Template],
    options: FeatureOptions = FeatureOptions(batch_size=256, progress=False),
    tokenizer: Tokenizer | None = None,
) -> torch.Tensor:
    """L2-normalised text embeddings of every (template, class) prompt -> [T, C, E]."""
    if not classnames or not templates:
        raise DataError("zero-shot classification needs at least one class name and one template")
    texts = [_prompt(t, c) for t in templates for c in classnames]  # template-major
    emb = extract_text_features(model, texts, options, tokenizer, desc="prompts")  # [T*C, E]
    return F.normalize(emb, dim=-1).reshape(len(templates), len(classnames), -1)  # [T, C, E]


def ensemble_prompts(embeddings: torch.Tensor) -> torch.Tensor:
    """The paper's ensembling: mean of normalised [T, C, E] over templates, renormalised -> [E, C]."""
    return F.normalize(embeddings.mean(dim=0), dim=-1).T  # [E, C]


def build_zeroshot_classifier(
    model: nn.Module,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: str | torch.device | None = None,
    tokenizer: Tokenizer | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot classifier weights [E, C] (unit columns, float32 on CPU) for ``scale * img @ W``.

    ``device=None`` encodes wherever the model is; ``'auto'`` picks CUDA when available.
    """
    options = FeatureOptions(batch_size=batch_size, device=None if device is None else str(device), progress=False)
    return ensemble_prompts(prompt_embeddings(model, classnames, templates, options, tokenizer))


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``scale * cosine``: image_features [N, E] (any norm), classifier [E, C] (unit columns) -> [N, C]."""
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier.float()


def _model_scale(model: nn.Module) -> float:
    return float(model.scale().detach()) if hasattr(model, "scale") else 100.0


def zeroshot_metrics(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    embeddings: torch.Tensor,
    templates: Sequence[Template] | None = None,
    scale: float = 100.0,
) -> dict[str, Any]:
    """Metrics of the ensembled classifier, plus top-1 accuracy of each template used alone.

    image_features [N, E], labels [N], embeddings [T, C, E] from :func:`prompt_embeddings`.
    Returns ``{"metrics": {acc1, acc5?, mean_per_class_recall, num_samples}, "details": {...}}``.
    """
    num_classes = embeddings.shape[1]
    labels = labels.long()
    logits = zeroshot_logits(image_features, ensemble_prompts(embeddings), scale)  # [N, C]
    full = metrics.classification_metrics(logits, labels, num_classes)
    scalars = {k: v for k, v in full.items() if isinstance(v, (int, float))}
    details: dict[str, Any] = {k: v for k, v in full.items() if k not in scalars}
    names = [t if isinstance(t, str) else getattr(t, "__name__", repr(t)) for t in (templates or [])]
    per_template = []
    for t in range(embeddings.shape[0]):
        acc = metrics.topk_accuracy(zeroshot_logits(image_features, embeddings[t].T, scale), labels, 1)
        per_template.append({"template": names[t] if t < len(names) else str(t), "acc1": acc})
    details["per_template"] = per_template
    return {"metrics": scalars, "details": details}


def evaluate_zeroshot(
    model: nn.Module,
    dataset: LabelledImages,
    classnames: Sequence[str] | None = None,
    templates: Sequence[Template] = ("a photo of a {}.",),
    options: FeatureOptions = FeatureOptions(),
    preprocess: Callable[[Any], torch.Tensor] | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Zero-shot evaluation of ``model`` on a labelled image set.

    ``classnames`` defaults to the dataset's own (folder names, or the table's label names).
    Unreadable images are skipped and reported under ``details["failed_images"]``.
    """
    classnames = list(classnames) if classnames is not None else dataset.classnames
    if not classnames:
        raise DataError(f"{dataset.name or 'dataset'}: labels are indices; class names are needed (a classes file)")
    if dataset.num_classes > len(classnames):
        raise DataError(f"{dataset.name}: labels go up to {dataset.num_classes - 1} but {len(classnames)} class names")
    # Zero-shot compares images with text, so only the shared (projected) space makes sense.
    feats = extract_image_features(model, dataset.paths, preprocess, replace(options, project=True))
    if feats.features.shape[0] == 0:
        raise DataError(f"{dataset.name}: none of the {len(dataset)} images could be read")
    text_options = FeatureOptions(
        batch_size=max(options.batch_size, 256), device=options.device, precision=options.precision, progress=False
    )
    emb = prompt_embeddings(model, classnames, templates, text_options, tokenizer)  # [T, C, E]
    labels = torch.tensor(dataset.labels, dtype=torch.long)[feats.index]  # [M]
    out = zeroshot_metrics(feats.features, labels, emb, templates, _model_scale(model))
    out["metrics"]["num_failed_images"] = feats.num_failed
    out["details"]["classnames"] = list(classnames)
    out["details"]["failed_images"] = feats.failed
    return out

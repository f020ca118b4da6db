"""Linear and k-shot probes of a model on labelled image sets: the paper's probe evaluations end to end.

:mod:`clipforge.eval.linear_probe` and :mod:`clipforge.eval.fewshot` fit probes on feature
arrays; this module starts from a model and image sets. It extracts the frozen image features
(``options.project``: after or before the projection), fits the probe, and optionally scores
zero-shot on the same test set for comparison (the paper's Figure 6):

    options = FeatureOptions(device="cpu", project=False)
    out = evaluate_linear_probe(model, train, test, options=options)
    out = evaluate_few_shot(model, train, test, shots=(1, 2, 4), options=options,
                            zeroshot_templates=["a photo of a {}."], plot="few_shot.png")

Both return ``{"metrics": {...}, "details": {...}}`` like every ``evaluate_*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from clipforge.errors import DataError
from clipforge.eval.datasets import LabelledImages
from clipforge.eval.features import FeatureOptions, extract_image_features
from clipforge.eval.fewshot import few_shot
from clipforge.eval.linear_probe import LinearProbeConfig, linear_probe
from clipforge.eval.zeroshot import Template, evaluate_zeroshot

__all__ = ["probe_features", "evaluate_linear_probe", "evaluate_few_shot"]

Preprocess = Callable[[Any], torch.Tensor]


def probe_features(
    model: nn.Module, data: LabelledImages, preprocess: Preprocess | None = None,
    options: FeatureOptions = FeatureOptions(), desc: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image features [M, D] of the readable images of ``data`` and their labels [M]."""
    f = extract_image_features(model, data.paths, preprocess, options, desc=f"{desc or data.name} features")
    if f.features.shape[0] == 0:
        raise DataError(f"{data.name}: none of the {len(data)} images could be read")
    return f.features, torch.tensor(data.labels, dtype=torch.long)[f.index]


def _features(
    model: nn.Module, train: LabelledImages, test: LabelledImages, val: LabelledImages | None,
    options: FeatureOptions, preprocess: Preprocess | None,
) -> tuple[tuple[torch.Tensor, ...], int]:
    x, y = probe_features(model, train, preprocess, options, "train")
    tx, ty = probe_features(model, test, preprocess, options, "test")
    vx, vy = probe_features(model, val, preprocess, options, "val") if val is not None else (None, None)
    num_classes = max(train.num_classes, test.num_classes, val.num_classes if val is not None else 0)
    return (x, y, tx, ty, vx, vy), num_classes


def _zeroshot_acc(
    model: nn.Module, test: LabelledImages, classnames: Sequence[str] | None, templates: Sequence[Template] | None,
    options: FeatureOptions, preprocess: Preprocess | None,
) -> float | None:
    if templates is None:
        return None
    return evaluate_zeroshot(model, test, classnames, templates, options, preprocess)["metrics"]["acc1"]


def _finish(out: dict[str, Any], zeroshot_acc: float | None, options: FeatureOptions) -> dict[str, Any]:
    if zeroshot_acc is not None:
        out["metrics"]["zeroshot_acc1"] = zeroshot_acc
    out["details"]["features"] = "post" if options.project else "pre"
    return out


def evaluate_linear_probe(
    model: nn.Module,
    train: LabelledImages,
    test: LabelledImages,
    val: LabelledImages | None = None,
    config: LinearProbeConfig = LinearProbeConfig(),
    options: FeatureOptions = FeatureOptions(),
    preprocess: Preprocess | None = None,
    zeroshot_templates: Sequence[Template] | None = None,
) -> dict[str, Any]:
    """The paper's linear probe on frozen features: C chosen on ``val`` (else a split of train),
    refit on train + val, scored on ``test``. ``test`` and ``val`` labels index train's classes.

    With ``zeroshot_templates``, also zero-shot accuracy on ``test`` (``metrics["zeroshot_acc1"]``)
    with train's class names. ``details["features"]`` is "post" or "pre" (``options.project``).
    """
    (x, y, tx, ty, vx, vy), num_classes = _features(model, train, test, val, options, preprocess)
    zeroshot_acc = _zeroshot_acc(model, test, train.classnames, zeroshot_templates, options, preprocess)
    out = linear_probe(x, y, tx, ty, config, vx, vy, num_classes)
    return _finish(out, zeroshot_acc, options)


def evaluate_few_shot(
    model: nn.Module,
    train: LabelledImages,
    test: LabelledImages,
    val: LabelledImages | None = None,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    draws: int = 5,
    config: LinearProbeConfig = LinearProbeConfig(),
    options: FeatureOptions = FeatureOptions(),
    preprocess: Preprocess | None = None,
    zeroshot_templates: Sequence[Template] | None = None,
    plot: str | Path | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """k-shot probes: ``draws`` random draws of k examples per class from train (and ``val``, which
    joins the pool), each probe scored on ``test``; draws are seeded by ``config.seed``.

    With ``zeroshot_templates``, also zero-shot accuracy on ``test``. With ``plot``, a PNG of
    accuracy against k there (zero-shot as a line), its path in ``details["plot"]``.
    """
    (x, y, tx, ty, vx, vy), num_classes = _features(model, train, test, val, options, preprocess)
    zeroshot_acc = _zeroshot_acc(model, test, train.classnames, zeroshot_templates, options, preprocess)
    if vx is not None:
        x, y = torch.cat([x, vx]), torch.cat([y, vy])
    out = few_shot(x, y, tx, ty, shots, draws, config, num_classes, config.seed)
    if plot is not None:
        from clipforge.eval.report import plot_few_shot

        plot_few_shot(out["details"]["shots"], zeroshot_acc, plot, title if title is not None else test.name)
        out["details"]["plot"] = str(plot)
    return _finish(out, zeroshot_acc, options)

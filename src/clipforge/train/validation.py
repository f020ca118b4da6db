"""Periodic evaluation during training: retrieval recall and (with class names) zero-shot accuracy."""

from __future__ import annotations

import torch

from clipforge.model.clip import CLIP
from clipforge.model.factory import get_preprocess
from clipforge.train.config import ValConfig


def run_validation(model: CLIP, val: ValConfig, device: torch.device, precision: str) -> dict[str, float]:
    """Retrieval recall@1/5/10 both ways on ``val.path``; zero-shot accuracy with class names."""
    from clipforge.eval.datasets import load_captions, load_labelled
    from clipforge.eval.features import FeatureOptions
    from clipforge.eval.retrieval import evaluate_retrieval

    opts = FeatureOptions(batch_size=val.batch_size, device=str(device), precision=precision, progress=False)
    preprocess = get_preprocess(model)
    captions = load_captions(val.path, val.image_key, val.caption_key)
    metrics = dict(evaluate_retrieval(model, captions, opts, preprocess)["metrics"])
    if val.classnames:
        from clipforge.eval.templates import load_classnames, load_templates
        from clipforge.eval.zeroshot import evaluate_zeroshot

        classnames = load_classnames(val.classnames)
        templates = load_templates(val.templates) if val.templates else ["a photo of a {}."]
        labelled = load_labelled(val.path, classnames, val.image_key, val.label_key)
        zs = evaluate_zeroshot(model, labelled, classnames, templates, opts, preprocess)["metrics"]
        metrics.update({f"zeroshot_{k}": v for k, v in zs.items()})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

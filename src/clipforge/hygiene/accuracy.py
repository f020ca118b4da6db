"""Accuracy on All / Overlap / Clean, as the CLIP paper's Figure 17 reports it, and its plot.

If training on copies of test images inflated a score, the Overlap subset would be easier than
the Clean one. The difference (Overlap - Clean) comes with a Clopper-Pearson interval of the
Overlap accuracy (the smaller subset, whose count dominates the uncertainty) and the two-sided
binomial test of the Overlap successes against the Clean accuracy. No overlap gives None for
the Overlap figures: an empty overlap is a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    if n == 0:
        return (float("nan"), float("nan"))
    a = (1 - confidence) / 2
    lo = 0.0 if successes == 0 else float(beta.ppf(a, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - a, successes + 1, n - successes))
    return lo, hi


def split_accuracy(correct: np.ndarray, overlap: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """All / Overlap / Clean accuracy of boolean ``correct`` [n] split by boolean ``overlap`` [n]."""
    from scipy.stats import binomtest

    correct, overlap = np.asarray(correct, bool), np.asarray(overlap, bool)

    def acc(mask: np.ndarray) -> dict[str, Any]:
        n, k = int(mask.sum()), int(correct[mask].sum())
        return {"n": n, "correct": k, "accuracy": k / n if n else None}

    out: dict[str, Any] = {"all": acc(np.ones_like(overlap)), "overlap": acc(overlap), "clean": acc(~overlap),
                           "confidence": confidence}
    o, c = out["overlap"], out["clean"]
    if o["n"] and c["n"]:
        lo, hi = clopper_pearson(o["correct"], o["n"], confidence)
        out["difference"] = o["accuracy"] - c["accuracy"]
        out["difference_interval"] = [lo - c["accuracy"], hi - c["accuracy"]]
        out["p_value"] = float(binomtest(o["correct"], o["n"], min(max(c["accuracy"], 1e-12), 1 - 1e-12)).pvalue)
    else:
        out["difference"] = out["difference_interval"] = out["p_value"] = None
    return out


def zeroshot_correct(model, test: str | Path, task: str, paths: Sequence[str], batch_size: int = 256,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Whether each test item (by path) is classified right zero-shot on ``task``, which items the
    task labels at all (a row without a label, e.g. 'shape' of a many-shape image, is left out),
    and the task's name."""
    import torch

    from clipforge.errors import DataError
    from clipforge.eval.features import FeatureOptions, extract_image_features
    from clipforge.eval.inputs import LabelOptions, resolve_labels
    from clipforge.eval.zeroshot import build_zeroshot_classifier, zeroshot_logits

    labelling = resolve_labels(LabelOptions(task=task), test)
    data = labelling.load(test, labelling.classnames())
    feats = extract_image_features(model, data.paths, None, FeatureOptions(batch_size=batch_size, device="cpu",
                                                                           progress=progress, workers=0))
    classifier = build_zeroshot_classifier(model, data.classnames, labelling.templates(), device="cpu")
    pred = zeroshot_logits(feats.features, classifier).argmax(1)  # [M]
    labels = torch.tensor(data.labels)[feats.index]
    ok = {str(Path(data.paths[int(i)]).resolve()): bool(p == t) for i, p, t in zip(feats.index, pred, labels)}
    keys = [str(Path(p).resolve()) for p in paths]
    labelled = np.array([k in ok for k in keys], bool)
    if not labelled.any():
        raise DataError(f"none of the test items has a {task!r} label in {test}")
    correct = np.array([ok.get(k, False) for k in keys], bool)
    return correct, labelled, {"task": labelling.dataset_name(test), "unlabelled": int((~labelled).sum())}


def plot_overlap(nearest: np.ndarray, flagged: np.ndarray, threshold: float, accuracy: dict | None,
                 out: str | Path, title: str = "") -> Path:
    """Nearest-training-cosine histogram (flagged vs clean, the threshold marked) and, with a
    model and task, the All / Overlap / Clean bars with the Overlap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    finite = np.isfinite(nearest)
    bins = np.linspace(float(np.min(nearest[finite], initial=0.0)), 1.0, 40)
    ax.hist(nearest[finite & ~flagged], bins=bins, alpha=0.7, label=f"clean ({int((~flagged).sum())})")
    ax.hist(nearest[finite & flagged], bins=bins, alpha=0.7, label=f"overlap ({int(flagged.sum())})")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4f}")
    ax.set_xlabel("cosine to the nearest training item")
    ax.set_ylabel("test items")
    ax.legend(fontsize=8)
    if accuracy:
        ax = axes[0][1]
        names = ["all", "overlap", "clean"]
        vals = [accuracy[k]["accuracy"] if accuracy[k]["accuracy"] is not None else 0.0 for k in names]
        ax.bar(names, [100 * v for v in vals], color=["grey", "tab:orange", "tab:blue"])
        if accuracy.get("difference_interval"):
            lo, hi = clopper_pearson(accuracy["overlap"]["correct"], accuracy["overlap"]["n"], accuracy["confidence"])
            ax.errorbar([1], [100 * vals[1]], yerr=[[100 * (vals[1] - lo)], [100 * (hi - vals[1])]], color="k",
                        capsize=6)
        for x, k in enumerate(names):
            ax.text(x, 100 * vals[x] + 1, f"n={accuracy[k]['n']}", ha="center", fontsize=8)
        ax.set_ylabel("zero-shot top-1 accuracy (%)")
        diff = accuracy.get("difference")
        ax.set_title("overlap - clean: " + (f"{100 * diff:+.1f} points" if diff is not None else "no overlap"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

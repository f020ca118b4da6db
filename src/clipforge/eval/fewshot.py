"""k-shot linear probes: k training examples per class, several random draws, mean and spread.

This is the paper's comparison of zero-shot transfer with few-shot logistic regression on the
same features (its Figure 6): draw k examples of every class, fit the linear probe, score on the
full test set, repeat with other draws.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from clipforge.eval.linear_probe import ArrayLike, LinearProbeConfig, _as_numpy, linear_probe

__all__ = ["sample_few_shot", "few_shot"]


def sample_few_shot(labels: ArrayLike, k: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``k`` examples of every class (all of a class's examples when it has fewer).

    Deterministic per ``(labels, k, seed)``; a class-balanced draw without replacement.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    y = _as_numpy(labels, np.int64)
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), size=min(k, int((y == c).sum())), replace=False) for c in np.unique(y)]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)


def few_shot(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    draws: int = 5,
    config: LinearProbeConfig = LinearProbeConfig(),
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear probes on k-shot subsets of train, ``draws`` random draws per k.

    Returns ``{"metrics": {"acc1_<k>shot": mean, "acc1_<k>shot_std": std, ...},
    "details": {"shots": [{"k", "acc1_mean", "acc1_std", "acc1_draws", "c_draws"}, ...]}}``.
    C is searched on a split of each draw when every class has >= 2 examples, else
    ``config.default_c`` is used (as for 1-shot).
    """
    x = _as_numpy(train_features)
    y = _as_numpy(train_labels, np.int64)
    ty = _as_numpy(test_labels, np.int64)
    num_classes = num_classes or int(max(y.max(), ty.max())) + 1
    scalars: dict[str, float] = {}
    rows = []
    for k in shots:
        accs, cs = [], []
        for d in range(draws):
            draw_seed = int(np.random.SeedSequence([seed, k, d]).generate_state(1)[0])
            idx = sample_few_shot(y, k, draw_seed)
            res = linear_probe(
                x[idx], y[idx], test_features, ty, replace(config, seed=draw_seed), num_classes=num_classes
            )
            accs.append(res["metrics"]["acc1"])
            cs.append(res["details"]["c"])
        mean, std = float(np.mean(accs)), float(np.std(accs))
        scalars[f"acc1_{k}shot"] = mean
        scalars[f"acc1_{k}shot_std"] = std
        rows.append({"k": int(k), "acc1_mean": mean, "acc1_std": std, "acc1_draws": accs, "c_draws": cs})
    return {"metrics": scalars, "details": {"shots": rows, "draws": draws, "seed": seed}}

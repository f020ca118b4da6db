"""Linear probes on frozen features: the CLIP paper's protocol.

L2-regularised multinomial logistic regression fitted with L-BFGS. The regularisation strength
is chosen on a held-out validation split by the paper's parametric binary search (start at
C = 1e-6, 1e-4, ..., 1e6, then halve the step around the best value until 8 steps per decade),
and the final classifier is refit on train + validation with that C.

Two backends minimise the same objective, scikit-learn's ``C * sum_i CE_i + ||W||^2 / 2`` (bias
not penalised), so C values and results are interchangeable: ``sklearn`` on the CPU, and
``torch`` (full-batch L-BFGS) for large feature sets on a GPU.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.errors import DataError
from clipforge.eval import metrics
from clipforge.utils import resolve_device

__all__ = [
    "LinearProbeConfig",
    "LogisticModel",
    "fit_logistic",
    "stratified_split",
    "search_c",
    "linear_probe",
]

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class LinearProbeConfig:
    backend: Literal["auto", "sklearn", "torch"] = "auto"  # auto: torch when CUDA is available
    c_start: tuple[float, ...] = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)  # the paper's initial sweep
    refine_steps: int = 4  # halvings of the 2-decade step: 4 reach 8 steps per decade
    val_fraction: float = 0.2  # held out of train when no validation set is given
    default_c: float = 1.0  # used when the data is too small for a validation split
    max_iter: int = 1000
    seed: int = 0
    device: str = "auto"  # torch backend only


@dataclass
class LogisticModel:
    """A fitted multinomial logistic regression; classes never seen in training score -inf."""

    weight: torch.Tensor  # [D, K] over the ``classes`` seen in training
    bias: torch.Tensor  # [K]
    classes: torch.Tensor  # [K] the labels seen in training
    num_classes: int
    c: float
    extra: dict[str, Any] = field(default_factory=dict)

    def logits(self, features: ArrayLike) -> torch.Tensor:
        x = torch.from_numpy(_as_numpy(features))  # [N, D] float32, CPU
        z = x @ self.weight.float() + self.bias.float()  # [N, K]
        out = torch.full((x.shape[0], self.num_classes), float("-inf"))
        out[:, self.classes] = z
        return out  # [N, num_classes]

    def predict(self, features: ArrayLike) -> torch.Tensor:
        return self.logits(features).argmax(dim=1)


def _as_numpy(x: ArrayLike, dtype: Any = np.float32) -> np.ndarray:
    return x.detach().cpu().numpy().astype(dtype) if isinstance(x, torch.Tensor) else np.asarray(x, dtype=dtype)


def _pick_backend(config: LinearProbeConfig) -> str:
    if config.backend != "auto":
        return config.backend
    return "torch" if resolve_device(config.device).type == "cuda" else "sklearn"


def _fit_sklearn(
    x: np.ndarray, y: np.ndarray, c: float, config: LinearProbeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=config.max_iter, random_state=config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # extreme C values of the sweep rarely converge
        clf.fit(x, y)
    coef = torch.from_numpy(clf.coef_.T.astype(np.float32))  # [D, K] or [D, 1] for two classes
    bias = torch.from_numpy(clf.intercept_.astype(np.float32))
    if coef.shape[1] == 1:  # binary: sklearn keeps one logit for the second class; first is 0
        coef = torch.cat([torch.zeros_like(coef), coef], dim=1)
        bias = torch.cat([torch.zeros_like(bias), bias])
    return coef, bias


def _fit_torch(
    x: np.ndarray, y: np.ndarray, c: float, config: LinearProbeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    device = resolve_device(config.device)
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)  # [N, D]
    yt = torch.as_tensor(y, dtype=torch.long, device=device)  # [N] in [0, K)
    n, d = xt.shape
    k = int(yt.max()) + 1
    weight = torch.zeros(d, k, device=device, requires_grad=True)
    bias = torch.zeros(k, device=device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=config.max_iter, history_size=20,
        tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # scikit-learn's objective divided by C * N: same minimiser, better scaled numbers.
        loss = F.cross_entropy(xt @ weight + bias, yt) + weight.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach().cpu(), bias.detach().cpu()


def fit_logistic(
    features: ArrayLike, labels: ArrayLike, c: float, num_classes: int | None = None,
    config: LinearProbeConfig = LinearProbeConfig(),
) -> LogisticModel:
    """Fit L2-regularised logistic regression with inverse regularisation strength ``c``."""
    x = _as_numpy(features)
    y = _as_numpy(labels, np.int64)
    classes, y_local = np.unique(y, return_inverse=True)  # train only over the classes present
    num_classes = num_classes or int(y.max()) + 1
    if len(classes) < 2:
        raise DataError("a linear probe needs samples of at least two classes")
    fit = _fit_torch if _pick_backend(config) == "torch" else _fit_sklearn
    weight, bias = fit(x, y_local, c, config)
    return LogisticModel(weight, bias, torch.from_numpy(classes), num_classes, c)


def stratified_split(labels: ArrayLike, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): about ``val_fraction`` of each class with >= 2 samples
    goes to validation, always leaving one in train; deterministic per seed."""
    y = _as_numpy(labels, np.int64)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction))) if len(idx) >= 2 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def search_c(
    train_x: ArrayLike, train_y: ArrayLike, val_x: ArrayLike, val_y: ArrayLike,
    config: LinearProbeConfig = LinearProbeConfig(), num_classes: int | None = None,
) -> tuple[float, list[tuple[float, float]]]:
    """The paper's parametric binary search over C by validation accuracy -> (best C, [(C, acc)])."""
    num_classes = num_classes or int(max(_as_numpy(train_y, np.int64).max(), _as_numpy(val_y, np.int64).max())) + 1
    val_t = torch.as_tensor(_as_numpy(val_y, np.int64))
    scores: dict[float, float] = {}

    def score(log_c: float) -> float:
        log_c = round(log_c, 6)
        if log_c not in scores:
            model = fit_logistic(train_x, train_y, 10.0**log_c, num_classes, config)
            scores[log_c] = metrics.topk_accuracy(model.logits(_as_numpy(val_x)), val_t, 1)
        return scores[log_c]

    logs = [math.log10(c) for c in config.c_start]
    for lc in logs:
        score(lc)
    best = max(scores, key=lambda lc: (scores[lc], -abs(lc)))  # ties: the value nearest C = 1
    step = (logs[1] - logs[0]) if len(logs) > 1 else 1.0
    for _ in range(config.refine_steps):
        step /= 2
        for lc in (best - step, best + step):
            score(lc)
        best = max(scores, key=lambda lc: (scores[lc], -abs(lc - best)))  # ties: stay put
    curve = sorted((10.0**lc, acc) for lc, acc in scores.items())
    return 10.0**best, curve


def linear_probe(
    train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike, test_labels: ArrayLike,
    config: LinearProbeConfig = LinearProbeConfig(), val_features: ArrayLike | None = None,
    val_labels: ArrayLike | None = None, num_classes: int | None = None,
) -> dict[str, Any]:
    """Choose C on validation (given, or split off train), refit on train + val, score on test.

    Returns ``{"metrics": {acc1, acc5?, mean_per_class_recall, ...}, "details": {c, search, ...}}``.
    """
    x, y = _as_numpy(train_features), _as_numpy(train_labels, np.int64)
    tx, ty = _as_numpy(test_features), _as_numpy(test_labels, np.int64)
    num_classes = num_classes or int(max(y.max(), ty.max())) + 1
    if val_features is None:
        tr, va = stratified_split(y, config.val_fraction, config.seed)
        vx, vy, x, y = x[va], y[va], x[tr], y[tr]
    else:
        vx, vy = _as_numpy(val_features), _as_numpy(val_labels, np.int64)
    if len(vy) and len(np.unique(y)) >= 2:
        best_c, curve = search_c(x, y, vx, vy, config, num_classes)
        selection = "validation search"
    else:
        best_c, curve, selection = config.default_c, [], "default (too few samples for a validation split)"
    model = fit_logistic(np.concatenate([x, vx]), np.concatenate([y, vy]), best_c, num_classes, config)
    full = metrics.classification_metrics(model.logits(tx), torch.as_tensor(ty), num_classes)
    scalars = {k: v for k, v in full.items() if isinstance(v, (int, float))}
    details = {k: v for k, v in full.items() if k not in scalars}
    details.update(c=best_c, c_selection=selection, search=curve, backend=_pick_backend(config),
                   num_train=int(len(y) + len(vy)), num_val=int(len(vy)))
    return {"metrics": scalars, "details": details}

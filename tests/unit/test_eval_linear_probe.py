"""Linear probe and few-shot: recovers a known linear rule; sampling is deterministic and balanced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipforge.eval.fewshot import few_shot, sample_few_shot
from clipforge.eval.linear_probe import LinearProbeConfig, fit_logistic, linear_probe, search_c, stratified_split


def linear_rule(n: int, seed: int, dim: int = 10, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features labelled by a fixed linear rule (argmax of a fixed projection)."""
    w = np.random.default_rng(123).normal(size=(dim, classes))
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x, (x @ w).argmax(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems: one thread avoids thread-pool contention on a shared 2-core machine."""
    import sklearn.linear_model  # noqa: F401  (load scipy's BLAS first: only loaded libraries get limited)
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # BLAS/OpenMP used by scikit-learn's L-BFGS
        yield
    torch.set_num_threads(threads)


SK = LinearProbeConfig(backend="sklearn")
TORCH = LinearProbeConfig(backend="torch", device="cpu")
# A shorter sweep keeps the many fits of the few-shot tests fast.
SHORT = LinearProbeConfig(backend="sklearn", c_start=(1e-3, 1e-1, 1e1), refine_steps=1)


def test_probe_recovers_a_linear_rule_with_the_papers_sweep():
    x, y = linear_rule(300, seed=0)
    tx, ty = linear_rule(300, seed=1)
    out = linear_probe(x, y, tx, ty, SK)
    assert out["metrics"]["acc1"] > 0.9  # chance is ~0.25
    assert out["details"]["c_selection"] == "validation search"
    assert out["details"]["num_train"] == 300 and 50 <= out["details"]["num_val"] <= 70
    assert len(out["details"]["search"]) == 7 + 2 * 4  # the paper's sweep: 7 starts, 4 halvings
    # A strongly regularised probe (tiny C) cannot fit the rule: the search had something to choose.
    assert min(acc for _, acc in out["details"]["search"]) < 0.6


def test_torch_backend_probe_recovers_the_rule():
    x, y = linear_rule(300, seed=0)
    tx, ty = linear_rule(300, seed=1)
    out = linear_probe(x, y, tx, ty, LinearProbeConfig(backend="torch", device="cpu", c_start=(1e-3, 1e-1, 1e1),
                                                       refine_steps=1))
    assert out["metrics"]["acc1"] > 0.9 and out["details"]["backend"] == "torch"


def test_torch_and_sklearn_fit_the_same_objective():
    x, y = linear_rule(300, seed=2)
    tx, _ = linear_rule(200, seed=3)
    a = fit_logistic(x, y, 0.5, config=SK)
    b = fit_logistic(x, y, 0.5, config=TORCH)
    pa, pb = a.logits(tx).softmax(1), b.logits(tx).softmax(1)
    assert (pa - pb).abs().max() < 2e-2
    assert (a.predict(tx) == b.predict(tx)).float().mean() > 0.98


def test_unseen_class_scores_minus_infinity_and_binary_case():
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]], dtype=np.float32)
    y = np.array([0, 0, 2, 2])  # class 1 never seen, 3 classes in all
    model = fit_logistic(x, y, 10.0, num_classes=3, config=SK)
    logits = model.logits(np.array([[-3.0], [3.0]]))
    assert logits.shape == (2, 3) and torch.isinf(logits[:, 1]).all()
    assert model.predict(np.array([[-3.0], [3.0]])).tolist() == [0, 2]


def test_search_picks_the_best_validation_accuracy():
    x, y = linear_rule(200, seed=4)
    vx, vy = linear_rule(100, seed=5)
    best, curve = search_c(x, y, vx, vy, SHORT)
    accs = dict(curve)
    assert accs[best] == max(accs.values())
    assert len(curve) == 3 + 2  # 3 starts, one halving: the two neighbours of the best


def test_stratified_split_is_balanced_deterministic_and_keeps_singletons_in_train():
    y = np.array([0] * 10 + [1] * 5 + [2])
    tr, va = stratified_split(y, 0.2, seed=7)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(16))
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 0]
    tr2, va2 = stratified_split(y, 0.2, seed=7)
    assert va.tolist() == va2.tolist()


def test_few_shot_sampling_is_deterministic_and_class_balanced():
    y = np.repeat(np.arange(5), 20)
    a = sample_few_shot(y, 4, seed=1)
    assert np.bincount(y[a]).tolist() == [4] * 5
    assert a.tolist() == sample_few_shot(y, 4, seed=1).tolist()
    assert a.tolist() != sample_few_shot(y, 4, seed=2).tolist()
    assert len(set(a.tolist())) == 20  # without replacement
    # A class with fewer than k examples contributes all it has.
    y2 = np.array([0] * 10 + [1] * 2)
    assert np.bincount(y2[sample_few_shot(y2, 4, seed=0)]).tolist() == [4, 2]
    with pytest.raises(ValueError):
        sample_few_shot(y, 0)


def test_few_shot_reports_mean_and_spread_per_k():
    x, y = linear_rule(300, seed=6)
    tx, ty = linear_rule(200, seed=7)
    out = few_shot(x, y, tx, ty, shots=(1, 4, 16), draws=3, config=SHORT, seed=0)
    rows = {r["k"]: r for r in out["details"]["shots"]}
    assert sorted(rows) == [1, 4, 16]
    for k, r in rows.items():
        assert len(r["acc1_draws"]) == 3
        assert r["acc1_mean"] == pytest.approx(np.mean(r["acc1_draws"]))
        assert r["acc1_std"] == pytest.approx(np.std(r["acc1_draws"]))
        assert out["metrics"][f"acc1_{k}shot"] == r["acc1_mean"]
    assert rows[1]["c_draws"] == [SHORT.default_c] * 3  # 1-shot leaves nothing to validate on
    assert rows[16]["acc1_mean"] > rows[1]["acc1_mean"]
    again = few_shot(x, y, tx, ty, shots=(1, 4, 16), draws=3, config=SHORT, seed=0)
    assert again["details"]["shots"] == out["details"]["shots"]

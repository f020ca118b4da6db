"""Fixtures shared by every test directory. Builders (data, images, models, runs) live in
``tests/support/``; ``tests/`` is on ``sys.path`` through ``pythonpath`` in pyproject.toml.

Tests run alone and in any order: ``pytest -p random_order --random-order`` shuffles modules and
the tests within each (pytest-random-order, in the dev extra; off unless asked for).

Tests that take more than about 3 s (training and fault runs, distributed and subprocess runs, the
demo, the browser, full-width models) carry ``@pytest.mark.slow``; ``make test-fast`` runs the rest
(``pytest -m "not slow"``), ``make test`` everything.
"""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _same_torch_rng():
    """Every test starts from the same state of torch's global generator (seed 0), whatever ran
    before it: a test that draws from it (an unseeded model initialisation, ``torch.randn``) gets
    the same numbers alone and in any order. Python's and NumPy's generators are left alone (a test
    may pick a random case on purpose)."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: on a shared 2-core machine thread hand-offs
    cost more than they save and spin-wait. Restores the previous count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def one_omp_thread(monkeypatch):
    """OMP_NUM_THREADS=1 for the test's child processes and data workers: the same thread count in
    every run (bitwise comparisons) and no OpenMP spin-waiting on 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def nano():
    """A nano model (seed 0) in eval mode, one per module."""
    import clipforge

    return clipforge.create_model("nano", seed=0).eval()


@pytest.fixture(scope="module")
def quiet_logs():
    """Only errors from the root logger for a module (open_clip logs a warning for every model it
    builds without pretrained weights)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)

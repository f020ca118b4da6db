"""Builders shared by the test modules (and by benchmarks/faults/): import them from here, never
from another test module. ``tests/`` is on ``sys.path`` for pytest (``pythonpath`` in
pyproject.toml), so ``from support.datasets import write_csv`` works from every test directory.

- ``images``: image bytes: solid colours, numbered colours, odd-but-valid and hostile files;
- ``datasets``: training data on disk: CSV tables, Parquet, folders, WebDataset shards, bad-input zoos;
- ``fakes``: the stand-in tokenizer (caption bytes as ids) and small deterministic transforms;
- ``models``: the nano model saved to a directory, and a nano TrainConfig;
- ``runs``: what a run left behind (checkpoints, weights), child processes, a free port;
- ``search``: embeddings directories without a model, and an index's id bookkeeping;
- ``fault_driver``: runs ``clipforge train`` and SIGKILLs it at a chosen point (also a script).

Fixtures built on these live in ``tests/conftest.py``.
"""

"""The nano model (the smallest registered CLIP) as tests use it: built, saved, trained."""

from __future__ import annotations

from pathlib import Path


def save_nano(path: Path, seed: int = 0) -> Path:
    """A randomly initialised nano model saved as a model directory at ``path``; returns it."""
    import clipforge

    return clipforge.save(clipforge.create_model("nano", seed=seed), path)


def nano_config(data: str, out: Path, **over):
    """A TrainConfig for ten CPU steps of nano over ``data`` (batch 8, in-process data, no
    checkpoints, no TensorBoard); ``over`` replaces any field."""
    from clipforge.train.config import TrainConfig

    base = {"data": data, "model": "nano", "out": str(out), "steps": 10, "batch_size": 8, "lr": 2e-3,
            "warmup": 2, "workers": 0, "save_every": 0, "log_every": 1, "tensorboard": False, "seed": 0}
    return TrainConfig.load(None, {**base, **over})

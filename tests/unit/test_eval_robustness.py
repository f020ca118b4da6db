"""Robustness: accuracy drop and effective robustness, by hand and with a deterministic fake model."""

from __future__ import annotations

import math
import re

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from clipforge.eval.datasets import load_labelled
from clipforge.eval.features import FeatureOptions
from clipforge.eval.robustness import (
    BaselineFit,
    effective_robustness,
    evaluate_robustness,
    fit_baseline,
    robustness_summary,
)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_fit_baseline_recovers_a_logit_line():
    line = BaselineFit(slope=0.8, intercept=-0.5)
    points = [(r, _sigmoid(0.8 * math.log(r / (1 - r)) - 0.5)) for r in (0.3, 0.5, 0.7, 0.9)]
    fit = fit_baseline(points)
    assert fit.slope == pytest.approx(0.8) and fit.intercept == pytest.approx(-0.5)
    # A model on the baseline line has zero effective robustness; above it, positive.
    assert effective_robustness(0.6, line.predict(0.6), fit) == pytest.approx(0.0, abs=1e-9)
    assert effective_robustness(0.6, line.predict(0.6) + 0.1, fit) == pytest.approx(0.1)


def test_summary_hand_computed():
    base = {"sketch": BaselineFit(1.0, 0.0)}  # identity: the baseline keeps its accuracy under shift
    s = robustness_summary(0.8, {"sketch": 0.5, "noise": 0.7}, base)
    assert s["sketch_drop"] == pytest.approx(0.3) and s["noise_drop"] == pytest.approx(0.1)
    assert s["sketch_effective_robustness"] == pytest.approx(-0.3)
    assert "noise_effective_robustness" not in s
    assert s["mean_shifted_acc1"] == pytest.approx(0.6) and s["mean_drop"] == pytest.approx(0.2)
    assert s["mean_effective_robustness"] == pytest.approx(-0.3)


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class RGBModel(nn.Module):
    """Images embed as mean RGB; a prompt embeds as the one-hot of the colour it names."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def encode_image(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()

    def scale(self) -> torch.Tensor:
        return torch.tensor(100.0)


def tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[int(w in re.findall(r"[a-z]+", t)) for w in COLOURS] for t in texts])


def _folder(root, content):
    for cls, colours in content.items():
        (root / cls).mkdir(parents=True)
        for i, c in enumerate(colours):
            Image.new("RGB", (4, 4), c).save(root / cls / f"{i}.png")
    return root


def test_evaluate_robustness_exact(tmp_path):
    R, G, B = COLOURS["red"], COLOURS["green"], COLOURS["blue"]
    ref = _folder(tmp_path / "ref", {"red": [R, R], "green": [G, G], "blue": [B, B]})  # 6/6
    # Shifted: a greyish red still reads as red; the washed-out green leans blue; one class missing.
    dim = _folder(tmp_path / "dim", {"red": [(200, 90, 90)], "green": [(60, 110, 120), G]})  # 2/3
    data = [load_labelled(ref), load_labelled(dim, ["blue", "green", "red"])]
    out = evaluate_robustness(
        RGBModel(), data[0], data[1:], None, ["a {} photo"],
        FeatureOptions(batch_size=4, device="cpu", progress=False), T.ToTensor(), tokenizer,
        baselines={"dim": BaselineFit(1.0, 0.0)},
    )
    m = out["metrics"]
    assert m["reference_acc1"] == 1.0
    assert m["dim_acc1"] == pytest.approx(2 / 3)
    assert m["dim_drop"] == pytest.approx(1 / 3)
    # Against an identity baseline, the effective robustness is the shifted accuracy minus ~reference.
    assert m["dim_effective_robustness"] == pytest.approx(2 / 3 - 1.0, abs=1e-5)
    assert out["details"]["datasets"]["dim"]["per_class_recall"] == [None, 0.5, 1.0]

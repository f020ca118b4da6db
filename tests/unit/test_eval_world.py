"""The data-world evaluator scores tasks exactly, with a fake model whose answers we know."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipforge.eval.features import FeatureOptions
from clipforge.eval.world import SplitFeatures, evaluate_task

CLASSES = ["red", "green", "blue"]


class KeywordTextModel(nn.Module):
    """encode_text: one-hot of the first class word found in the prompt (decoded from fake ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        self.prompts = list(texts)
        return torch.arange(len(texts)).unsqueeze(1)

    def encode_text(self, tokens: torch.Tensor, **_: object) -> torch.Tensor:
        out = torch.full((tokens.shape[0], 4), 0.01)
        for row, i in enumerate(tokens[:, 0].tolist()):
            words = self.prompts[i].split()
            hit = [c for c in CLASSES if c in words]
            if hit and "{a}" not in self.prompts[i]:
                out[row, CLASSES.index(hit[0])] = 1.0
        return out


def split(labels: list[str]) -> SplitFeatures:
    feats = torch.zeros(len(labels), 4)
    for i, name in enumerate(labels):
        feats[i, CLASSES.index(name)] = 1.0
    rows = [{"colour": name, "image": f"{i}.png", "caption": name} for i, name in enumerate(labels)]
    rows.append({"colour": "", "image": "x.png", "caption": "unlabelled"})  # no label: left out
    feats = torch.cat([feats, torch.ones(1, 4) / 2])
    return SplitFeatures(rows, [Path(r["image"]) for r in rows], feats, torch.ones(len(rows), dtype=torch.bool))


def test_evaluate_task_counts_only_labelled_rows_and_scores_each_prompt_set(monkeypatch):
    model = KeywordTextModel()
    monkeypatch.setattr("clipforge.eval.features.default_tokenizer", lambda m: model.tokenize)
    task = {"label_column": "colour", "classes": CLASSES, "plain_template": "{}",
            "template": "a {} thing.", "templates": ["a {} thing.", "the colour {}."]}
    got = evaluate_task(model, task, split(["red", "green", "blue", "blue"]), FeatureOptions(progress=False))
    assert got["num_samples"] == 4
    assert got["plain"] == got["template"] == got["ensemble"] == 1.0
    assert got["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 2]]


def test_evaluate_task_returns_none_without_labels(monkeypatch):
    model = KeywordTextModel()
    monkeypatch.setattr("clipforge.eval.features.default_tokenizer", lambda m: model.tokenize)
    task = {"label_column": "colour", "classes": ["purple"], "plain_template": "{}", "template": "{}",
            "templates": ["{}"]}
    assert evaluate_task(model, task, split(["red"]), FeatureOptions(progress=False)) is None


def test_evaluate_task_breaks_accuracy_down_by_group(monkeypatch):
    """by_group: ensemble accuracy per distinct value of the group columns, counting each row once;
    rows missing a group value are scored overall but grouped nowhere."""
    model = KeywordTextModel()
    monkeypatch.setattr("clipforge.eval.features.default_tokenizer", lambda m: model.tokenize)
    task = {"label_column": "colour", "classes": CLASSES, "plain_template": "{}",
            "template": "a {} thing.", "templates": ["a {} thing."]}
    data = split(["red", "green", "blue", "blue"])
    data.features[3] = torch.tensor([1.0, 0, 0, 0])  # the second blue image looks red: wrong
    for row, shape in zip(data.rows, ["circle", "circle", "star", "star", "star"]):
        row["shape"] = shape
    data.rows[1]["shape"] = ""  # green: no shape, so in no group
    got = evaluate_task(model, task, data, FeatureOptions(progress=False), group_by=("colour", "shape"))
    assert got["ensemble"] == 0.75 and got["num_samples"] == 4
    assert got["by_group"] == {"blue star": {"accuracy": 0.5, "num_samples": 2},
                               "red circle": {"accuracy": 1.0, "num_samples": 1}}
    assert "by_group" not in evaluate_task(model, task, data, FeatureOptions(progress=False))

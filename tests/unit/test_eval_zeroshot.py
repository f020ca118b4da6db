"""Zero-shot classification: the paper's prompt ensembling, and exact accuracy with a fake model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

import clipforge
from clipforge.errors import DataError
from clipforge.eval.datasets import load_labelled
from clipforge.eval.features import FeatureOptions
from clipforge.eval.zeroshot import (
    build_zeroshot_classifier,
    ensemble_prompts,
    evaluate_zeroshot,
    prompt_embeddings,
    zeroshot_metrics,
)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
WORDS = list(COLOURS)


class FakeColourModel(nn.Module):
    """Images embed as their mean RGB; texts as the colour word they name. A prompt containing
    'inverted' names the next colour instead (red -> green), so that template is always wrong."""

    context_length = 8

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, x: torch.Tensor, normalize: bool = False, project: bool = True) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # [B, 3]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        onehot = tokens[:, :3].float()  # [B, 3]
        inverted = tokens[:, 3:4].bool()
        return torch.where(inverted, onehot.roll(1, dims=1), onehot)

    def scale(self) -> torch.Tensor:
        return torch.tensor(100.0)


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    words = [set(re.findall(r"[a-z]+", t)) for t in texts]
    return torch.tensor([[int(w in ws) for w in WORDS] + [int("inverted" in ws)] for ws in words])


PREPROCESS = T.Compose([T.Resize((4, 4)), T.ToTensor()])
OPTIONS = FeatureOptions(batch_size=4, device="cpu", progress=False)


def make_colour_folder(root: Path, broken: bool = False) -> Path:
    """2 red, 2 green, 2 'blue' of which one is actually red: ensembled top-1 = 5/6."""
    for name, colours in {"red": ["red", "red"], "green": ["green", "green"], "blue": ["blue", "red"]}.items():
        (root / name).mkdir(parents=True)
        for i, c in enumerate(colours):
            Image.new("RGB", (8, 8), COLOURS[c]).save(root / name / f"{i}.png")
    if broken:
        (root / "green" / "broken.png").write_bytes(b"not a png")
    return root


def test_exact_accuracy_and_per_template_accuracy(tmp_path):
    data = load_labelled(make_colour_folder(tmp_path / "colours"))
    assert data.classnames == ["blue", "green", "red"]
    templates = ["a photo of a {}.", "a {} thing", "an inverted {}"]
    out = evaluate_zeroshot(FakeColourModel(), data, None, templates, OPTIONS, PREPROCESS, fake_tokenizer)
    m = out["metrics"]
    assert m["acc1"] == pytest.approx(5 / 6)
    assert "acc5" not in m  # 3 classes
    # recalls: blue 1/2, green 1, red 1
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["details"]["confusion_matrix"] == [[1, 0, 1], [0, 2, 0], [0, 0, 2]]
    per_template = {r["template"]: r["acc1"] for r in out["details"]["per_template"]}
    # The inverted template maps the red image in the blue folder to 'blue': right by accident.
    assert per_template == pytest.approx({"a photo of a {}.": 5 / 6, "a {} thing": 5 / 6, "an inverted {}": 1 / 6})


def test_evaluation_restores_training_mode(tmp_path):
    data = load_labelled(make_colour_folder(tmp_path / "colours"))
    model = FakeColourModel().train()  # e.g. evaluated from inside a training loop
    opts = FeatureOptions(batch_size=4, progress=False)  # device=None: the model stays where it is
    evaluate_zeroshot(model, data, None, ["a {}"], opts, PREPROCESS, fake_tokenizer)
    assert model.training


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    data = load_labelled(make_colour_folder(tmp_path / "colours", broken=True))
    assert len(data) == 7
    out = evaluate_zeroshot(FakeColourModel(), data, None, ["a {}"], OPTIONS, PREPROCESS, fake_tokenizer)
    assert out["metrics"]["num_failed_images"] == 1
    assert out["metrics"]["num_samples"] == 6
    assert out["details"]["failed_images"][0][0].endswith("broken.png")
    assert out["metrics"]["acc1"] == pytest.approx(5 / 6)


def test_integer_labels_without_class_names_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "t.csv").write_text("image,label\na.png,0\na.png,1\n")
    data = load_labelled(tmp_path / "t.csv")
    with pytest.raises(DataError, match="class names"):
        evaluate_zeroshot(FakeColourModel(), data, None, ["a {}"], OPTIONS, PREPROCESS, fake_tokenizer)


def test_ensembling_is_normalise_average_renormalise():
    model = clipforge.create_model("nano", seed=0).eval()
    classes = ["cat", "dog", "red car"]
    templates = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]
    weights = build_zeroshot_classifier(model, classes, templates, device="cpu")  # [E, C]
    explicit = []
    with torch.no_grad():
        for c in classes:
            tokens = clipforge.tokenize([t.format(c) for t in templates], context_length=model.context_length)
            e = model.encode_text(tokens)  # [T, E]
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(dim=0)
            explicit.append(e / e.norm())
    explicit = torch.stack(explicit, dim=1)  # [E, C]
    assert weights.shape == (model.config.embed_dim, 3)
    torch.testing.assert_close(weights, explicit, atol=1e-5, rtol=1e-5)
    # Averaging unnormalised embeddings would give a different classifier: the test can fail.
    with torch.no_grad():
        raw = torch.stack([
            F.normalize(model.encode_text(clipforge.tokenize([t.format(c) for t in templates])).mean(0), dim=0)
            for c in classes], dim=1)
    assert not torch.allclose(weights, raw, atol=1e-6)


def test_zeroshot_metrics_from_features_uses_ensembled_classifier():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(4, 5, 16, generator=g), dim=-1)  # [T, C, E]
    feats = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    out = zeroshot_metrics(feats, labels, emb, [f"t{i} {{}}" for i in range(4)])
    classifier = ensemble_prompts(emb)  # [E, C]
    expected = (F.normalize(feats, dim=-1) @ classifier).argmax(1).eq(labels).float().mean().item()
    assert out["metrics"]["acc1"] == pytest.approx(expected)
    assert len(out["details"]["per_template"]) == 4
    assert out["metrics"]["acc5"] == 1.0  # 5 classes


def test_prompt_embeddings_are_unit_and_template_major():
    emb = prompt_embeddings(FakeColourModel(), ["red", "green"], ["a {}", "an inverted {}"], OPTIONS, fake_tokenizer)
    assert emb.shape == (2, 2, 3)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 2))
    assert emb[0, 0].tolist() == [1, 0, 0] and emb[1, 0].tolist() == [0, 1, 0]  # inverted red -> green


def test_template_without_placeholder_is_an_error():
    with pytest.raises(DataError, match="placeholder"):
        prompt_embeddings(FakeColourModel(), ["red"], ["no slot"], OPTIONS, fake_tokenizer)

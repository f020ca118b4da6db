"""CLIP_benchmark against clipforge: `clip_benchmark build` reads `clipforge eval` result files, and
a model exported by `clipforge convert --to openclip` scores under CLIP_benchmark's own metric
functions what `clipforge eval` reports on the same data-world split (within 0.5 points).

The model is nano with random weights: the figures are near chance, but both sides score the
same 64-pixel images (no resizing on either side) with the same prompts, so they must agree."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.models import save_nano

from clipforge.cli import main

pytest.importorskip("clip_benchmark", reason="clip_benchmark is not installed (make install-dev installs it)")
open_clip = pytest.importorskip("open_clip")

COMMON = ["--device", "cpu", "--no-progress", "--batch-size", "128"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cb")
    assert main(["data", "synth", "--out", str(root / "world"), "--train", "0", "--val", "0", "--test", "1000",
                 "--shifted", "0", "--image-size", "64", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    save_nano(root / "model")
    assert main(["convert", "--model", str(root / "model"), "--to", "openclip", "--out", str(root / "oc")]) == 0
    results = root / "results"
    assert main(["eval", "zeroshot", "--model", str(root / "model"), "--data", str(root / "world/test.csv"),
                 "--task", "shape", "--out", str(results / "shape.json"), *COMMON]) == 0  # fmt: skip
    assert main(["eval", "retrieval", "--model", str(root / "model"), "--data", str(root / "world/test.csv"),
                 "--recall-k", "1", "5", "--out", str(results / "retrieval.json"), *COMMON]) == 0  # fmt: skip
    yield root
    torch.set_num_threads(threads)


def _openclip(root: Path):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{root / 'oc'}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{root / 'oc'}")


def _rows(root: Path) -> list[dict]:
    with open(root / "world/test.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_clip_benchmark_zeroshot_metrics_match_clipforge_eval(world):
    from clip_benchmark.metrics import zeroshot_classification

    task = json.loads((world / "world/tasks/shape.json").read_text())
    classes = task["classes"]
    rows = [r for r in _rows(world) if r["shape"] in classes]
    model, preprocess, tokenizer = _openclip(world)
    images = torch.stack([preprocess(Image.open(world / "world" / r["image"])) for r in rows])  # [N, 3, 64, 64]
    labels = torch.tensor([classes.index(r["shape"]) for r in rows])
    dataset = torch.utils.data.TensorDataset(images, labels)
    dataset.classes = classes  # CLIP_benchmark reads the class names off its datasets
    loader = torch.utils.data.DataLoader(dataset, batch_size=128)
    templates = [t.replace("{}", "{c}") for t in task["templates"]]  # CLIP_benchmark fills template.format(c=...)
    try:
        theirs = zeroshot_classification.evaluate(model, loader, tokenizer, classes, templates, "cpu", amp=False)
    except TypeError:  # its accuracy() calls float() on a 1-element array, an error since NumPy 2
        theirs = _scored_beside(zeroshot_classification, model, loader, tokenizer, classes, templates)
    ours = json.loads((world / "results/shape.json").read_text())["metrics"]
    assert ours["num_samples"] == len(rows) > 300
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        print(f"{key}: CLIP_benchmark {theirs[key]:.4f} clipforge {ours[key]:.4f}")
        assert abs(theirs[key] - ours[key]) <= 0.005, (key, theirs[key], ours[key])


def _scored_beside(zc, model, loader, tokenizer, classes, templates) -> dict:
    """CLIP_benchmark's classifier and logits (zero_shot_classifier, run_classification), with
    top-k counted here and its per-class recall (scikit-learn's balanced accuracy)."""
    classifier = zc.zero_shot_classifier(model, tokenizer, classes, templates, "cpu", amp=False)
    logits, target = zc.run_classification(model, classifier, loader, "cpu", amp=False)
    top = logits.topk(5, dim=1).indices  # [N, 5]
    return {"acc1": (top[:, 0] == target).float().mean().item(),
            "acc5": (top == target[:, None]).any(dim=1).float().mean().item(),
            "mean_per_class_recall": zc.balanced_accuracy_score(target, logits.argmax(dim=1))}


def test_clip_benchmark_retrieval_metrics_match_clipforge_eval(world):
    from clip_benchmark.metrics import zeroshot_retrieval

    rows = _rows(world)
    model, preprocess, tokenizer = _openclip(world)
    images = torch.stack([preprocess(Image.open(world / "world" / r["image"])) for r in rows])
    pairs = [(images[i], [r["caption"]]) for i, r in enumerate(rows)]  # one caption per image

    def collate(batch):
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    loader = torch.utils.data.DataLoader(pairs, batch_size=128, collate_fn=collate)
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
    ours = json.loads((world / "results/retrieval.json").read_text())["metrics"]
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5",
                "text_retrieval_recall@5"):  # fmt: skip
        print(f"{key}: CLIP_benchmark {theirs[key]:.4f} clipforge {ours[key]:.4f}")
        assert abs(theirs[key] - ours[key]) <= 0.005, (key, theirs[key], ours[key])


def test_clip_benchmark_build_reads_clipforge_results(world, tmp_path, monkeypatch):
    from clip_benchmark import cli

    out = tmp_path / "benchmark.csv"
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "build", str(world / "results"), "--output", str(out)])
    cli.main()
    with open(out, newline="") as f:
        table = {r["task"]: r for r in csv.DictReader(f)}
    assert set(table) == {"zeroshot_classification", "zeroshot_retrieval"}
    ours = json.loads((world / "results/shape.json").read_text())
    assert float(table["zeroshot_classification"]["acc1"]) == pytest.approx(ours["metrics"]["acc1"])
    assert table["zeroshot_classification"]["dataset"] == ours["dataset"]
    assert float(table["zeroshot_retrieval"]["image_retrieval_recall@5"]) >= 0
    card = (world / "model" / "README.md").read_text()  # clipforge eval put both results in the model card
    assert f"| {ours['dataset']} | zeroshot_classification |" in card and "| zeroshot_retrieval |" in card

"""Evaluation inputs: labelled/captioned datasets, built-in prompt sets, feature extraction and cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

from clipforge.errors import DataError
from clipforge.eval.datasets import load_captions, load_labelled
from clipforge.eval.features import FeatureOptions, extract_image_features, weights_digest
from clipforge.eval.templates import fill, load_classnames, load_task, load_templates


def _img(path: Path, colour: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), colour).save(path)
    return path


# -- datasets -----------------------------------------------------------------------------

def test_class_folders_sorted_names_and_display_names(tmp_path):
    for cls in ("dog", "cat"):
        for i in range(2):
            _img(tmp_path / "d" / cls / f"{i}.png")
    (tmp_path / "d" / "cat" / "notes.txt").write_text("ignored")
    data = load_labelled(tmp_path / "d")
    assert data.classnames == ["cat", "dog"] and data.labels == [0, 0, 1, 1] and data.name == "d"
    # A classes file with display names, one per sorted folder:
    assert load_labelled(tmp_path / "d", ["a cat", "a dog"]).classnames == ["a cat", "a dog"]
    # A classes file with the folder names in another order defines the label order:
    data = load_labelled(tmp_path / "d", ["dog", "cat", "bird"])
    assert data.classnames == ["dog", "cat", "bird"] and sorted(data.labels) == [0, 0, 1, 1]
    assert all(("dog" in str(p)) == (lab == 0) for p, lab in zip(data.paths, data.labels))
    with pytest.raises(DataError, match="class names"):
        load_labelled(tmp_path / "d", ["x", "y", "z"])


def test_table_labels_names_integers_relative_paths_and_skipped_rows(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    (tmp_path / "t.csv").write_text("image,label\nimgs/a.png,dog\nimgs/a.png,cat\n,cat\nimgs/a.png,\n")
    data = load_labelled(tmp_path / "t.csv")
    assert data.classnames == ["cat", "dog"] and data.labels == [1, 0] and data.skipped_rows == 2
    assert data.paths[0] == tmp_path / "imgs" / "a.png"
    data = load_labelled(tmp_path / "t.csv", ["dog", "cat"])
    assert data.labels == [0, 1]
    with pytest.raises(DataError, match="not in the class names"):
        load_labelled(tmp_path / "t.csv", ["dog", "bird"])
    (tmp_path / "i.tsv").write_text("path\tshape\n/abs/x.png\t2\nimgs/a.png\t0\n")
    data = load_labelled(tmp_path / "i.tsv", image_key="path", label_key="shape")
    assert data.labels == [2, 0] and data.classnames is None and data.num_classes == 3
    assert data.paths[0] == Path("/abs/x.png")
    with pytest.raises(DataError, match="no column 'label'"):
        load_labelled(tmp_path / "i.tsv", image_key="path")


def test_parquet_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ["a.png", "b.png"], "label": [1, 0]}), tmp_path / "t.parquet")
    data = load_labelled(tmp_path / "t.parquet", ["x", "y"])
    assert data.labels == [1, 0] and data.classnames == ["x", "y"]
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        load_labelled(tmp_path / "t.parquet", ["x"])


def test_captions_group_rows_by_image(tmp_path):
    (tmp_path / "c.csv").write_text(
        'image,caption\na.png,"a red, round thing"\nb.png,two\na.png,three\nc.png,\n')
    data = load_captions(tmp_path / "c.csv")
    assert [p.name for p in data.image_paths] == ["a.png", "b.png"]
    assert data.captions == ["a red, round thing", "two", "three"]
    assert data.text_to_image == [0, 1, 0] and data.skipped_rows == 1


# -- templates ----------------------------------------------------------------------------

def test_builtin_sets_are_the_papers():
    assert len(load_templates("imagenet")) == 80 and len(load_classnames("imagenet")) == 1000
    assert load_classnames("imagenet")[:2] == ["tench", "goldfish"]
    assert len(load_templates("cifar10")) == 18 and len(load_classnames("cifar10")) == 10
    assert len(load_classnames("cifar100")) == 100 and load_classnames("cifar100")[-1] == "worm"
    assert all("{}" in t for name in ("imagenet", "cifar10", "cifar100") for t in load_templates(name))


def test_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("a {} photo\n\n  an {} with {braces}  \n")
    assert load_templates(tmp_path / "t.txt") == ["a {} photo", "an {} with {braces}"]
    assert fill("an {} with {braces}", "owl") == "an owl with {braces}"
    (tmp_path / "bad.txt").write_text("a {} photo\nno slot\n")
    with pytest.raises(DataError, match="placeholder"):
        load_templates(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="no such"):
        load_classnames(tmp_path / "missing.txt")


def test_task_files(tmp_path):
    import json

    (tmp_path / "t.json").write_text(json.dumps({"label_column": "shape", "classes": ["a"], "templates": ["{}!"]}))
    assert load_task(tmp_path / "t.json")["label_column"] == "shape"
    (tmp_path / "f.json").write_text(json.dumps({"label_column": "r", "classes": ["a"], "templates": ["{a} {}"],
                                                 "fields": {"a": "rel_a"}}))
    with pytest.raises(DataError, match="per-image fields"):
        load_task(tmp_path / "f.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="not a task file"):
        load_task(tmp_path / "x.json")


# -- features -----------------------------------------------------------------------------

class CountingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.calls = 0

    def encode_image(self, x: torch.Tensor, project: bool = True) -> torch.Tensor:
        self.calls += 1
        f = x.mean(dim=(2, 3)) * self.w  # [B, 3]
        return f if project else torch.cat([f, f], dim=1)


PRE = T.Compose([T.Resize((4, 4)), T.ToTensor()])


def test_features_skip_unreadable_and_cache_on_disk(tmp_path):
    paths = [_img(tmp_path / f"{i}.png", (i * 40, 0, 0)) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"garbage")
    paths.insert(2, tmp_path / "bad.png")
    paths.append(tmp_path / "missing.png")
    model = CountingModel()
    opts = FeatureOptions(batch_size=2, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    f = extract_image_features(model, paths, PRE, opts)
    assert f.features.shape == (5, 3) and f.index.tolist() == [0, 1, 3, 4, 5]
    assert [Path(p).name for p, _ in f.failed] == ["bad.png", "missing.png"]
    torch.testing.assert_close(f.features[:, 0], torch.tensor([0, 40, 80, 120, 160]) / 255.0)
    calls = model.calls
    again = extract_image_features(model, paths, PRE, opts)
    assert model.calls == calls  # served from the cache
    torch.testing.assert_close(again.features, f.features)
    assert again.failed == f.failed
    # Pre-projection features are cached separately.
    pre = extract_image_features(model, paths, PRE, FeatureOptions(**{**opts.__dict__, "project": False}))
    assert pre.features.shape == (5, 6) and model.calls > calls
    # Changed weights change the key.
    with torch.no_grad():
        model.w.mul_(2)
    doubled = extract_image_features(model, paths, PRE, opts)
    torch.testing.assert_close(doubled.features, 2 * f.features)


def test_fingerprint_depends_on_weights():
    a, b = CountingModel(), CountingModel()
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.w[0] = 1.5
    assert weights_digest(a) != weights_digest(b)


def test_features_with_worker_processes(tmp_path):
    paths = [_img(tmp_path / f"{i}.png", (0, i * 50, 0)) for i in range(4)]
    opts = FeatureOptions(batch_size=3, device="cpu", progress=False, workers=1)
    f = extract_image_features(CountingModel(), paths, PRE, opts)
    assert f.index.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(f.features[:, 1], torch.tensor([0, 50, 100, 150]) / 255.0)

"""End to end: `clipforge eval ...` on a tiny random model and real images built in the test.

Images: scikit-learn's handwritten digits and scikit-image's photos (both ship with the
packages, no download). A random model classifies near chance, so these tests check structure
and consistency with the library functions rather than accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from support.models import save_nano

DIGIT_NAMES = ["zero", "one", "two"]
COMMON = ["--device", "cpu", "--no-progress", "--batch-size", "16"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small problems: one thread avoids thread-pool contention on a shared 2-core machine."""
    import sklearn.linear_model  # noqa: F401  (load scipy's BLAS first: only loaded libraries get limited)
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from sklearn.datasets import load_digits
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("eval_world")
    model_dir = save_nano(root / "model")
    digits = load_digits()
    counts = {"train": 8, "test": 5}
    for split, n in counts.items():
        offset = 0 if split == "train" else 20
        for label, name in enumerate(DIGIT_NAMES):
            idx = np.flatnonzero(digits.target == label)[offset : offset + n]
            (root / split / name).mkdir(parents=True)
            (root / "shifted" / name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                img = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(img).resize((32, 32), Image.NEAREST).save(root / split / name / f"{i}.png")
                if split == "test":  # the shifted set: inverted digits
                    Image.fromarray(255 - img).resize((32, 32)).save(root / "shifted" / name / f"{i}.png")
    # The same test images as a table with name labels, the way the data world writes splits.
    pngs = sorted((root / "test").rglob("*.png"))
    rows = ["image,shape"] + [f"test/{p.parent.name}/{p.name},{p.parent.name}" for p in pngs]
    (root / "test.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    (root / "templates.txt").write_text("a photo of the number {}.\na drawing of a {}\n{}\n")
    (root / "tasks").mkdir()  # a task file as the data world writes them
    (root / "tasks" / "digits.json").write_text(json.dumps(
        {"name": "digits", "label_column": "shape", "classes": DIGIT_NAMES, "templates": ["a {} digit", "{}"]}))
    # Retrieval: skimage photos, two captions each, plus a row whose image is missing.
    photos = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat", "rocket": "a rocket",
              "camera": "a man with a camera", "horse": "a horse"}
    lines = ["image,caption"]
    for name, text in photos.items():
        arr = getattr(skdata, name)()
        Image.fromarray(arr if arr.dtype == np.uint8 else (arr * 255).astype(np.uint8)).convert("RGB").resize(
            (48, 48)).save(root / f"{name}.jpg")
        lines += [f"{name}.jpg,a photo of {text}", f"{name}.jpg,{text}"]
    lines.append("missing.jpg,nothing here")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "model": model_dir}


def _run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_zeroshot_on_class_folders_matches_the_library(world, tmp_path):
    root, out = world["root"], tmp_path / "zs.json"
    assert _run("eval", "zeroshot", "--model", world["model"], "--data", root / "test",
                "--templates", root / "templates.txt", "--out", out, *COMMON) == 0
    r = _load(out)
    assert (r["task"], r["dataset"], r["model"]) == ("zeroshot_classification", "test", str(world["model"]))
    m = r["metrics"]
    assert 0.0 <= m["acc1"] <= 1.0 and "acc5" not in m and m["num_samples"] == 15
    assert r["details"]["classnames"] == sorted(DIGIT_NAMES)
    assert len(r["details"]["per_template"]) == 3
    assert np.array(r["details"]["confusion_matrix"]).sum() == 15
    assert "eval zeroshot" in r["command"] and r["versions"]["clipforge"] == clipforge.__version__

    from clipforge.eval import FeatureOptions, evaluate_zeroshot, load_labelled, load_templates

    model, pre = clipforge.load(world["model"])
    lib = evaluate_zeroshot(model, load_labelled(root / "test"), None, load_templates(root / "templates.txt"),
                            FeatureOptions(device="cpu", progress=False), pre)
    assert lib["metrics"]["acc1"] == pytest.approx(m["acc1"])
    assert lib["details"]["confusion_matrix"] == r["details"]["confusion_matrix"]


def test_zeroshot_on_a_table_with_label_key_and_class_file(world, tmp_path):
    root, out = world["root"], tmp_path / "zs_csv.json"
    assert _run("eval", "zeroshot", "--model", world["model"], "--data", root / "test.csv", "--label-key", "shape",
                "--classes", root / "classes.txt", "--templates", root / "templates.txt", "--out", out, *COMMON) == 0
    r = _load(out)
    assert r["details"]["classnames"] == DIGIT_NAMES and r["metrics"]["num_samples"] == 15
    assert r["dataset"] == "test (shape)"
    # The same through a data-world task file, found by name in tasks/ beside the table.
    assert _run("eval", "zeroshot", "--model", world["model"], "--data", root / "test.csv", "--task", "digits",
                "--out", out, *COMMON) == 0
    r = _load(out)
    assert r["dataset"] == "test (digits)"
    assert [t["template"] for t in r["details"]["per_template"]] == ["a {} digit", "{}"]
    assert r["details"]["classnames"] == DIGIT_NAMES and r["metrics"]["num_samples"] == 15


def test_retrieval_with_several_captions_per_image(world, tmp_path):
    root, out = world["root"], tmp_path / "ret.json"
    assert _run("eval", "retrieval", "--model", world["model"], "--data", root / "captions.csv",
                "--out", out, *COMMON) == 0
    m = _load(out)["metrics"]
    assert m["num_images"] == 6 and m["num_texts"] == 12 and m["num_failed_images"] == 1
    for k in (1, 5, 10):
        assert 0 <= m[f"image_retrieval_recall@{k}"] <= 1 and 0 <= m[f"text_retrieval_recall@{k}"] <= 1
    assert m["image_retrieval_recall@10"] == 1.0  # only 6 images to choose from
    assert m["image_retrieval_recall@1"] <= m["image_retrieval_recall@5"]


def test_linear_probe_few_shot_robustness_and_report(world, tmp_path):
    root, model = world["root"], world["model"]
    cache = tmp_path / "cache"
    assert _run("eval", "linear-probe", "--model", model, "--train", root / "train", "--test", root / "test",
                "--features", "pre", "--backend", "sklearn", "--cache-dir", cache,
                "--out", tmp_path / "res" / "lp.json", *COMMON) == 0
    lp = _load(tmp_path / "res" / "lp.json")
    assert lp["task"] == "linear_probe" and 0 <= lp["metrics"]["acc1"] <= 1
    assert lp["details"]["num_train"] == 24 and lp["details"]["features"] == "pre"
    assert any(cache.iterdir())

    assert _run("eval", "linear-probe", "--model", model, "--train", root / "train", "--test", root / "test",
                "--shots", "1", "2", "--draws", "2", "--zeroshot", "--backend", "sklearn", "--cache-dir", cache,
                "--out", tmp_path / "res" / "fs.json", *COMMON) == 0
    fs = _load(tmp_path / "res" / "fs.json")
    assert fs["task"] == "few_shot" and [r["k"] for r in fs["details"]["shots"]] == [1, 2]
    assert 0 <= fs["metrics"]["zeroshot_acc1"] <= 1
    assert Path(fs["details"]["plot"]).read_bytes().startswith(b"\x89PNG")

    assert _run("eval", "robustness", "--model", model, "--reference", root / "test", "--shifted", root / "shifted",
                "--templates", root / "templates.txt", "--out", tmp_path / "res" / "rob.json", *COMMON) == 0
    rob = _load(tmp_path / "res" / "rob.json")["metrics"]
    assert rob["shifted_drop"] == pytest.approx(rob["reference_acc1"] - rob["shifted_acc1"])

    assert _run("eval", "report", tmp_path / "res") == 0
    assert "## linear_probe" in (tmp_path / "res" / "report.md").read_text()
    assert (tmp_path / "res" / "report.html").stat().st_size > 1000


def test_bad_input_is_a_one_line_error(world, tmp_path, capsys):
    assert _run("eval", "zeroshot", "--model", world["model"], "--data", tmp_path / "nope.csv",
                "--out", tmp_path / "x.json", *COMMON) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipforge eval: error:") and "nope.csv" in err and "\n" not in err

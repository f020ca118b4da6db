"""embed -> index -> search -> dedup through the command line, on real photos (scikit-image,
scikit-learn) with a tiny random model: every photo queried by its own file comes back first.

The photos and the model are built once per module and only read; each test embeds and indexes
into its own directory, so every test runs alone and in any order."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage
import sklearn
from fastapi.testclient import TestClient

import clipforge
from clipforge.cli import main
from clipforge.search import embed as embed_mod
from clipforge.search.service import ServeSettings, create_app
from support.models import save_nano

SKIMAGE = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "horse.png",
           "hubble_deep_field.jpg", "motorcycle_left.png", "retina.jpg", "rocket.jpg"]  # fmt: skip
SKLEARN = ["china.jpg", "flower.jpg"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models on a shared 2-core machine


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    photos = root / "photos"
    (photos / "more").mkdir(parents=True)
    for name in SKIMAGE:
        shutil.copy(Path(skimage.__file__).parent / "data" / name, photos / name)
    for name in SKLEARN:
        shutil.copy(Path(sklearn.__file__).parent / "datasets" / "images" / name, photos / "more" / name)
    shutil.copy(photos / "chelsea.png", photos / "more" / "chelsea_copy.png")  # an exact duplicate
    (photos / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    save_nano(root / "model")
    return root


def _embed_args(world, out, photos=None):
    photos = world / "photos" if photos is None else photos
    return ["embed", "--model", str(world / "model"), "--input", str(photos), "--out", str(out),
            "--part-size", "4", "--batch-size", "3", "--workers", "0", "--no-progress"]  # fmt: skip


def test_embed_resumes_after_interruption(world, tmp_path, monkeypatch, capsys):
    emb = tmp_path / "emb"
    real = embed_mod._write_part
    written = []

    def interrupted(out, part, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the third part is being embedded
        written.append(part)
        real(out, part, *args)

    monkeypatch.setattr(embed_mod, "_write_part", interrupted)
    assert main(_embed_args(world, emb)) == 130
    assert embed_mod.finished_parts(emb) == [0, 1]
    monkeypatch.setattr(embed_mod, "_write_part", real)
    capsys.readouterr()
    assert main(_embed_args(world, emb)) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (summary["parts_skipped"], summary["parts_written"], summary["inputs"]) == (2, 2, 14)

    import pyarrow.parquet as pq

    meta = pq.read_table(emb / "metadata").to_pylist()
    positions = sorted(m["position"] for m in meta)
    skipped = (emb / "skipped.tsv").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(world / "photos" / "more" / "broken.jpg"))
    assert len(positions) == len(set(positions)) == 13  # 14 inputs, one unreadable; nothing twice
    vecs = np.concatenate([np.load(p) for p in sorted((emb / "img_emb").glob("*.npy"))])
    assert vecs.shape == (13, 64) and vecs.dtype == np.float16


def test_index_search_and_dedup(world, tmp_path, capsys):
    assert main(_embed_args(world, tmp_path / "emb")) == 0
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "index"),
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "flat index: 13 items" in out and "exact search (recall 1.0)" in out

    model, preprocess = clipforge.load(world / "model")
    client = TestClient(create_app(tmp_path / "index", model, preprocess, ServeSettings()))
    photos = sorted(p for p in (world / "photos").rglob("*") if p.suffix in (".png", ".jpg") and p.name != "broken.jpg")
    for photo in photos:
        r = client.post("/search", files={"image": (photo.name, photo.read_bytes())}, data={"k": "3"})
        assert r.status_code == 200, r.text
        top = r.json()["results"]
        assert top[0]["score"] > 0.999, photo
        twins = {str(world / "photos" / "chelsea.png"), str(world / "photos" / "more" / "chelsea_copy.png")}
        if str(photo) in twins:
            assert {top[0]["path"], top[1]["path"]} == twins
        else:
            assert top[0]["path"] == str(photo) and top[1]["score"] < top[0]["score"]

    r = client.post("/search", json={"text": "a photo of a cat", "k": 5})
    scores = [h["score"] for h in r.json()["results"]]
    assert r.status_code == 200 and len(scores) == 5 and scores == sorted(scores, reverse=True)

    # Near duplicates as a by-product of the index; --drop removes all but the first.
    assert main(["dedup", "--index", str(tmp_path / "index"), "--out", str(tmp_path / "dups.csv"), "--threshold",
                 "0.9999", "--drop", "--no-progress"]) == 0  # fmt: skip
    rows = (tmp_path / "dups.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[2] for r in rows) == sorted(twins)
    assert "dropped 1 items; 12 left" in capsys.readouterr().out


def test_new_images_are_added_without_rebuild(world, capsys, tmp_path):
    # Its own copy of the photos (this test adds and deletes some), embedded, indexed and deduplicated.
    photos, index = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(world / "photos", photos)
    assert main(_embed_args(world, tmp_path / "emb", photos)) == 0
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--out", str(index), "--no-progress"]) == 0
    assert main(["dedup", "--index", str(index), "--out", str(tmp_path / "dups.csv"), "--threshold", "0.9999",
                 "--drop", "--no-progress"]) == 0  # fmt: skip
    assert "dropped 1 items; 12 left" in capsys.readouterr().out

    shutil.copy(Path(skimage.__file__).parent / "data" / "coins.png", photos / "more" / "coins.png")
    assert main(_embed_args(world, tmp_path / "emb_new", photos) + ["--only-new", str(index)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    # Only the new photo: indexed ones and the dropped duplicate stay out (the broken file is retried).
    assert (summary["inputs"], summary["embedded"], summary["unreadable"]) == (2, 1, 1)
    assert main(["index", "--embeddings", str(tmp_path / "emb"), str(tmp_path / "emb_new"), "--out", str(index),
                 "--no-progress"]) == 0  # fmt: skip
    assert "(+1 added, -0 removed)" in capsys.readouterr().out
    (photos / "rocket.jpg").unlink()
    assert main(["index", "--out", str(index), "--prune-missing"]) == 0
    assert "12 items (+0 added, -1 removed)" in capsys.readouterr().out

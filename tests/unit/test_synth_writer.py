"""Generating a world on disk: CSV and WebDataset layouts, task files, reuse, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.data.synth import SynthConfig, generate_world, load_manifest, make_sample

SMALL = SynthConfig(seed=7, train=40, val=8, test=16, shifted=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(SMALL, out, workers=2, progress=False)


def _rows(out: Path, split: str) -> list[dict]:
    with open(out / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_split_csv_loads_with_images_at_size(world):
    out, manifest = world
    assert set(manifest["splits"]) == {"train", "val", "test", "test_heldout", "test_sketch", "test_noise",
                                       "test_texture", "test_scale_rotation"}
    for split, entry in manifest["splits"].items():
        rows = _rows(out, split)
        assert len(rows) == entry["size"] == getattr(SMALL, split if split in ("train", "val", "test") else "shifted")
        assert list(rows[0]) == ["image", "caption", *manifest["label_columns"]]
        for i, row in enumerate(rows):
            with Image.open(out / row["image"]) as im:  # path relative to the CSV
                assert im.size == (64, 64) and im.mode == "RGB"
            assert row["caption"] == make_sample(SMALL, split, i).caption
            objects = json.loads(row["objects"])
            assert int(row["count"]) == len(objects)
            assert (row["colour"] != "") == (len(objects) == 1)
            held = {tuple(p) for p in manifest["heldout_pairs"]}
            pairs = {(o["colour"], o["shape"]) for o in objects}
            if split == "test_heldout":
                assert (objects[0]["colour"], objects[0]["shape"]) in held
            else:
                assert not pairs & held


def test_task_files_are_valid(world):
    out, manifest = world
    assert set(manifest["tasks"]) == {"colour", "shape", "size", "position", "count", "relation"}
    for name, rel in manifest["tasks"].items():
        task = json.loads((out / rel).read_text())
        assert task["name"] == name and len(set(task["classes"])) == len(task["classes"]) >= 2
        assert task["label_column"] in manifest["label_columns"]
        assert "{}" in task["plain_template"] and "{}" in task["template"]
        assert len(task["templates"]) >= 4 and all("{}" in t for t in task["templates"])
        fields = {k: "x" for k in task["fields"]}
        for t in [task["plain_template"], task["template"], *task["templates"]]:
            t.format("cls", **fields)  # every template fills with the declared placeholders
        classes = (out / "tasks" / task["classes_file"]).read_text().splitlines()
        templates = (out / "tasks" / task["templates_file"]).read_text().splitlines()
        assert classes == task["classes"] and templates == task["templates"]
        assert "train" not in task["splits"] and set(task["splits"]) <= set(manifest["splits"])
        for split in task["splits"]:
            values = {r[task["label_column"]] for r in _rows(out, split)} - {""}
            assert values <= set(task["classes"]), (name, split, values)  # labels are class names
            for row in _rows(out, split):
                assert all(row[col] for col in task["fields"].values()) or not row[task["label_column"]]


def test_same_config_reuses_and_matches_serial_bytes(world, tmp_path):
    out, manifest = world
    stamp = (out / "world.json").stat().st_mtime_ns
    assert generate_world(SMALL, out, workers=2, progress=False) == manifest
    assert (out / "world.json").stat().st_mtime_ns == stamp  # nothing rewritten
    serial = tmp_path / "serial"
    generate_world(SMALL, serial, workers=1, progress=False)
    assert _files(serial) == _files(out)  # same seed, same bytes, whatever the worker count
    generate_world(dataclasses.replace(SMALL, seed=8), tmp_path / "other", workers=1, progress=False)
    assert (tmp_path / "other" / "train" / "000000.png").read_bytes() != (out / "train" / "000000.png").read_bytes()


def test_incomplete_world_is_regenerated(tmp_path):
    cfg = SynthConfig(seed=1, train=6, val=0, test=0, shifted=0, heldout_pairs=0)
    generate_world(cfg, tmp_path, workers=1, progress=False)
    (tmp_path / "train.csv").unlink()
    manifest = generate_world(cfg, tmp_path, workers=1, progress=False)
    assert len(_rows(tmp_path, "train")) == 6
    assert "test_heldout" not in manifest["splits"] and "test_sketch" in manifest["splits"]
    bigger = generate_world(dataclasses.replace(cfg, train=9), tmp_path, workers=1, progress=False)
    assert bigger["splits"]["train"]["size"] == 9 and len(_rows(tmp_path, "train")) == 9


def test_two_hundred_samples_with_two_workers(tmp_path):
    cfg = SynthConfig(seed=9, train=200, val=0, test=0, shifted=0, image_size=32, image_format="jpg")
    manifest = generate_world(cfg, tmp_path, workers=2, progress=False)
    rows = _rows(tmp_path, "train")
    assert len(rows) == 200 == manifest["splits"]["train"]["size"]
    assert [r["image"] for r in rows] == [f"train/{i:06d}.jpg" for i in range(200)]
    with Image.open(tmp_path / rows[-1]["image"]) as im:
        assert im.format == "JPEG" and im.size == (32, 32)


def test_webdataset_shards(tmp_path):
    cfg = SynthConfig(seed=2, train=25, val=0, test=4, shifted=3, format="wds", shard_size=10)
    manifest = generate_world(cfg, tmp_path, workers=2, progress=False)
    entry = manifest["splits"]["train"]
    assert entry["num_shards"] == 3 and entry["shards"] == "train/{00000..00002}.tar"
    assert not (tmp_path / "train.csv").exists()
    names = []
    for k in range(3):
        with tarfile.open(tmp_path / "train" / f"{k:05d}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        names += sorted(members)
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[:-5]
                assert members[f"{key}.txt"].decode() == meta["caption"]
                assert meta["caption"] == make_sample(cfg, "train", meta["index"]).caption
                assert meta["count"] == len(meta["objects"])
    assert len(names) == 75 and names[:3] == ["000000.json", "000000.png", "000000.txt"]
    assert load_manifest(tmp_path)["config"]["format"] == "wds"


def test_cli_writes_a_world_and_rejects_bad_values(tmp_path, capsys):
    out = tmp_path / "w"
    argv = ["data", "synth", "--out", str(out), "--train", "6", "--val", "2", "--test", "2", "--shifted", "2",
            "--workers", "1", "--seed", "3", "--no-progress"]
    assert main(argv) == 0
    assert "world written to" in capsys.readouterr().out
    assert load_manifest(out)["config"]["seed"] == 3 and len(_rows(out, "test_noise")) == 2
    assert main(argv[:-1] + ["--image-size", "500", "--no-progress"]) == 2
    assert "image_size must be between 32 and 224" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "synth", "--out", str(out), "--train", "-5"])
    assert exit_info.value.code == 2
    assert "--train: must be 0 or more" in capsys.readouterr().err


def test_cli_defaults_match_the_config():
    from clipforge.cli import build_parser

    args = build_parser().parse_args(["data", "synth", "--out", "x"])
    defaults = SynthConfig()
    for field in dataclasses.fields(SynthConfig):
        assert getattr(args, field.name) == getattr(defaults, field.name), field.name

"""``clipforge data synth`` flaws and ``clipforge data overlap`` / ``curate`` end to end on a
small world with a random nano model: files, counts and the one-line errors on misuse."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clipforge.cli import main

SYNTH = ["data", "synth", "--train", "80", "--val", "0", "--test", "40", "--shifted", "0", "--heldout-pairs", "0",
         "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene")
    plain, flawed = root / "plain", root / "flawed"
    assert main(SYNTH + ["--out", str(plain)]) == 0
    assert main(SYNTH + ["--out", str(flawed), "--mismatch-rate", "0.25", "--plant-duplicates", "12"]) == 0
    from tests.support.models import save_nano

    return root, plain, flawed, save_nano(root / "nano")


def test_flaws_leave_the_base_world_unchanged(world):
    _, plain, flawed, _ = world
    assert (plain / "train.csv").read_bytes() == (flawed / "train.csv").read_bytes()
    assert (plain / "world.json").read_text() == (flawed / "world.json").read_text()
    record = json.loads((flawed / "flaws.json").read_text())
    with open(flawed / "train_flawed.csv") as f:
        rows = list(csv.DictReader(f))
    with open(flawed / "train.csv") as f:
        base = list(csv.DictReader(f))
    assert len(rows) == 92 and len(record["mismatched"]) == 20 and len(record["planted"]) == 12
    changed = sum(rows[i]["caption"] != base[i]["caption"] for i in record["mismatched"])
    assert changed >= 15  # a derangement: only repeated captions can stay equal
    assert all((flawed / p["image"]).is_file() for p in record["planted"])
    assert {p["kind"] for p in record["planted"]} == {"crop", "jpeg", "resize", "flip", "jitter", "rotate"}


def test_overlap_cli_end_to_end(world, capsys):
    root, _, flawed, nano = world
    out = root / "ov" / "overlap.json"
    rc = main(["data", "overlap", "--train", str(flawed / "train_flawed.csv"), "--test", str(flawed / "test.csv"),
               "--out", str(out), "--model", str(nano), "--task", "colour", "--drop", str(root / "ov" / "clean.csv"),
               "--calibration-images", "30", "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["threshold"]["source"] == "calibrated" and set(report["threshold"]["kinds"]) >= {"crop", "flip"}
    assert report["accuracy"]["all"]["n"] >= 10 and "difference" in report["accuracy"]
    with open(root / "ov" / "clean.csv") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == 92 - report["drop"]["dropped"]
    assert report["drop"]["dropped"] == len(report["train_duplicates"])
    assert out.with_suffix(".png").is_file() and "test items overlap" in capsys.readouterr().out


def test_curate_cli_end_to_end(world, tmp_path):
    root, _, flawed, nano = world
    entries = tmp_path / "entries.txt"
    entries.write_text("red\nblue\ncircle\n")
    out = tmp_path / "cur.csv"
    assert main(["data", "curate", "--input", str(flawed / "train_flawed.csv"), "--out", str(out), "--model", str(nano),
                 "--top-fraction", "0.8", "--metadata", str(entries), "--per-entry", "5", "--work",
                 str(root / "cw"), "--no-progress"]) == 0
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert report["rows_in"] == 92 and report["rows_out"] + sum(report["dropped"].values()) == 92
    assert report["dropped"]["low_clip_score"] == pytest.approx(92 * 0.2, abs=2)
    assert all(e["after"] <= e["before"] for e in report["metadata"]["head"])


@pytest.mark.parametrize("argv, message", [
    (["data", "curate", "--input", "x.csv", "--out", "y.csv"], "nothing to do"),
    (["data", "curate", "--input", "x.csv", "--out", "y.csv", "--min-score", "0.2"], "need --model or --embeddings"),
    (["data", "overlap", "--train", "a", "--test", "b", "--out", "o.json", "--threshold", "2"], "--threshold"),
])
def test_misuse_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_synth_flaws_need_csv(tmp_path, capsys):
    assert main(SYNTH + ["--out", str(tmp_path / "w"), "--format", "wds", "--plant-duplicates", "2"]) == 2
    assert "need --format csv" in capsys.readouterr().err
